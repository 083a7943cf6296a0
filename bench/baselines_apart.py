#!/usr/bin/env python
"""Why compare trains BoostedNet and L2W-DEN in a second process: one epoch of each (L2W-DEN once, BoostedNet
twice, so the two halves weigh about the same) from a feature cache, three ways, one torch thread each:

    python bench/baselines_apart.py --cache cache/demo-lite0-fmnist64.zarr

  one after the other in this process; in two Python threads of this process (torch releases the interpreter lock
  inside its kernels, not around the Python between them); in a second process (heads/sweep/apart.py, what compare
  uses) beside this one. Each way from the start, the splits loaded from the cache included (the second process
  loads its own copy while this one loads), as in compare. Printed: the wall time of each and its ratio to the
  first.
"""
import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

from cache.store import open_cache  # noqa: E402
from heads.baselines.boosted import train_boosted  # noqa: E402
from heads.baselines.common import BaselineSettings  # noqa: E402
from heads.baselines.l2w import train_l2w  # noqa: E402
from heads.cpu import use_threads  # noqa: E402
from heads.sweep.apart import SecondProcess  # noqa: E402
from heads.sweep.session import Session  # noqa: E402
from heads.train.bilevel import TrainSettings  # noqa: E402

SETTINGS = TrainSettings(max_epochs=1, warmup_epochs=0, device="cpu")
_SESSIONS = {}


def _session(cache_path: str, fresh: bool = False) -> Session:
    if fresh or cache_path not in _SESSIONS:
        _SESSIONS[cache_path] = Session(open_cache(cache_path), SETTINGS, progress=False)
    return _SESSIONS[cache_path]


def l2w_epoch(cache_path: str) -> None:
    train_l2w(_session(cache_path).data, SETTINGS, BaselineSettings())


def boosted_epochs(cache_path: str) -> None:
    for _ in range(2):
        train_boosted(_session(cache_path).data, SETTINGS, BaselineSettings().boost_gamma)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True)
    args = parser.parse_args(argv)
    use_threads("cpu", 1)
    _session(args.cache)                                   # numba's kernels compiled or loaded before any timing

    start = time.perf_counter()
    _session(args.cache, fresh=True)
    l2w_epoch(args.cache)
    boosted_epochs(args.cache)
    serial = time.perf_counter() - start

    start = time.perf_counter()
    _session(args.cache, fresh=True)
    other = threading.Thread(target=boosted_epochs, args=(args.cache,))
    other.start()
    l2w_epoch(args.cache)
    other.join()
    threads = time.perf_counter() - start

    start = time.perf_counter()
    apart = SecondProcess(boosted_epochs, args.cache, "BoostedNet")
    try:
        _session(args.cache, fresh=True)
        l2w_epoch(args.cache)
        apart.result()
    finally:
        apart.stop()
    process = time.perf_counter() - start
    print(f"one after the other: {serial:.2f} s; two Python threads: {threads:.2f} s ({threads / serial:.2f}x); "
          f"a second process: {process:.2f} s ({process / serial:.2f}x)")


if __name__ == "__main__":
    main()
