#!/usr/bin/env python
"""Peak resident memory of one lambda sweep against the bytes of the cache it reads.

    python bench/sweep_memory.py --workdir /tmp/mem           # the sweep_speed cache (40k/10k/10k x 14 x 384)
    python bench/sweep_memory.py --workdir /tmp/mem --small
    python bench/sweep_memory.py --workdir /tmp/mem --memory-budget 0.3     # the same sweep, train streamed

The first call writes the synthetic cache of bench/sweep_speed.py into WORKDIR and stops (so that the sweep's
process starts without the writer's memory); the next call runs the default 20-lambda sweep over it in this
process and prints its wall time, the peak RSS (ru_maxrss) before and after it, what stage two holds resident
(features and logits of train, V1, V2, test) and the float16 bytes of the cache's arrays, plus the test rows'
accuracy/cost per lambda so that two versions of the code can be compared (PYTHONPATH does not help here: the
script puts its own checkout first; copy it into the other checkout's bench/).
"""
import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

from bench.sweep_speed import FULL, SMALL  # noqa: E402
from cache.synthetic import write_synthetic_cache  # noqa: E402
from cache.store import open_cache  # noqa: E402
from heads.train.stream import MemorySettings  # noqa: E402
from heads.sweep.lambdas import SweepSettings, parse_lambdas  # noqa: E402
from heads.sweep.sweep import run_sweep
from heads.train.bilevel import TrainSettings  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the cache is written once and the run goes")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--max-epochs", type=int, default=3, help="epochs do not change the memory; keep it short")
    parser.add_argument("--lambdas", default="0.01:10")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="GB stage two may hold (heads/train/stream.py): splits that do not fit stream from the store")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else FULL
    cache = Path(args.workdir) / ("small.zarr" if args.small else "bench.zarr")
    if not cache.exists():
        write_synthetic_cache(cache, {s: shape[s] for s in ("train", "val", "test")}, shape["exits"], shape["dim"],
                              shape["classes"])
        print(f"wrote {cache}; run the same command again to measure the sweep")
        return
    with open_cache(cache) as c:
        rows = sum(c.num_rows(s) for s in c.splits)
        stored = rows * (sum(c.exit_dims) + c.num_classes) * 2   # float16 features + logits
    run = Path(args.workdir) / "run"
    shutil.rmtree(run, ignore_errors=True)
    before = peak_gib()
    start = time.perf_counter()
    result = run_sweep(cache, SweepSettings(tuple(parse_lambdas(args.lambdas))),
                       TrainSettings(max_epochs=args.max_epochs), run, progress=False,
                       memory=MemorySettings(budget_gb=args.memory_budget))
    took = time.perf_counter() - start
    memory = result.settings["memory"]
    held = memory["resident_gib"] + memory["streaming_buffers_gib"]
    print(f"sweep {took:.1f} s; peak RSS {peak_gib():.2f} GiB (before the sweep {before:.2f} GiB); features and "
          f"logits of every split: {stored / 2 ** 30:.2f} GiB as float16; held (resident splits + streaming "
          f"buffers) {held:.2f} GiB, the bound 1.25 x held + 1 GiB = {1.25 * held + 1:.2f} GiB; placement "
          + ", ".join(f"{s} {'resident' if v['resident'] else 'streamed'}" for s, v in memory["splits"].items()))
    chosen = sorted((r["lam"], r["accuracy"], r["cost_norm"]) for r in result.rows
                    if r["method"] == "jei" and r["split"] == "test")
    print("test accuracy / cost per lambda: " + ", ".join(f"{lam:.3g}: {a:.4f}/{c:.4f}" for lam, a, c in chosen))


if __name__ == "__main__":
    main()
