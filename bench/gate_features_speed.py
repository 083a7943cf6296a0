#!/usr/bin/env python
"""What a thread-pool launch costs: heads.model.gate_features' serial and parallel kernels by input size, with numba's
thread count matched to torch's (heads.cpu.match_torch_threads) and, for one row, left at numba's default.

    python bench/gate_features_speed.py               # torch threads 2 (numba follows)
    python bench/gate_features_speed.py --threads 1

Medians of 15 calls; the probabilities are a random softmax. On a machine whose cores other jobs also use, a
parallel launch waits until the pool's other threads are scheduled: that wait, not the arithmetic, sets where
PARALLEL_ELEMENTS lies.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

from heads import cpu  # noqa: E402
from heads.model.gate_features import _features_parallel, _features_serial  # noqa: E402


def median_ms(fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (numba's follow them)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    one = torch.softmax(torch.randn(1, 10), -1).numpy()
    out = np.empty((1, 4), np.float32)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    default = median_ms(_features_parallel, one, out)
    cpu.match_torch_threads()
    print(f"torch threads {torch.get_num_threads()}; one row of K=10: parallel kernel with numba's default "
          f"{numba.config.NUMBA_NUM_THREADS} threads {default * 1e3:.1f} us, with torch's count "
          f"{numba.get_num_threads()} {median_ms(_features_parallel, one, out) * 1e3:.1f} us, serial "
          f"{median_ms(_features_serial, one, out) * 1e3:.1f} us")
    for k in (10, 100):
        for rows in (256, 4096, 16384, 65536):
            probs = torch.softmax(torch.randn(rows, k), -1).numpy()
            out = np.empty((rows, 4), np.float32)
            print(f"K={k:>3} rows={rows:>6}: serial {median_ms(_features_serial, probs, out):7.2f} ms, parallel "
                  f"{median_ms(_features_parallel, probs, out):7.2f} ms")


if __name__ == "__main__":
    main()
