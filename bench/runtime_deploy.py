#!/usr/bin/env python
"""The deployment options of the early-exit runtime side by side: eager (contiguous memory), channels_last, and
EarlyExitModel.compile_blocks (torch.compile per block): images/s at batch 1 and 64, the compile time, and how
many exits and predictions differ from eager on the cache's test images.

    OMP_NUM_THREADS=1 python bench/runtime_deploy.py --run RUN --lam 0.025

Medians of --repeats interleaved repeats (the three variants in turn), one torch thread. channels_last applies to
CNN backbones (a ViT's token states are 3-D: nothing changes).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy.runtime import EarlyExitModel  # noqa: E402
from runtime_speed import test_images  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run directory (train / sweep / fit)")
    p.add_argument("--lam", required=True, type=float, help="the selected model nearest this lambda")
    p.add_argument("--images", type=int, default=256, help="test images (timed at batch 64; 48 of them at batch 1)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = EarlyExitModel.from_run(args.run, args.lam)
    x = test_images(base.manifest, None, args.images)
    variants = {"eager": (base, x),
                "channels_last": (copy.deepcopy(base).to(memory_format=torch.channels_last),
                                  x.contiguous(memory_format=torch.channels_last)),
                "compiled blocks": (copy.deepcopy(base), x)}
    with torch.no_grad():
        ref = base(x)
        start = time.perf_counter()
        compiled = variants["compiled blocks"][0].compile_blocks()
        for lo, hi in ((0, 64), (0, 1), (64, 128)):   # the first calls compile (batch 1 is a graph of its own)
            compiled(x[lo:hi])
        compile_s = time.perf_counter() - start
        for name, (model, xs) in variants.items():
            out = model(xs)
            print(f"{name}: exits differ from eager on {int((out.exit_index != ref.exit_index).sum())}/{len(x)}, "
                  f"predictions on {int((out.prediction != ref.prediction).sum())}")
        print(f"compile_blocks and the first calls: {compile_s:.0f} s")
        times = {(name, b): [] for name in variants for b in (1, 64)}
        for _ in range(args.repeats):
            for b in (1, 64):
                n = min(48, len(x)) if b == 1 else len(x)
                for name, (model, xs) in variants.items():
                    start = time.perf_counter()
                    for lo in range(0, n, b):
                        model(xs[lo:lo + b])
                    times[name, b].append(n / (time.perf_counter() - start))
    for b in (1, 64):
        eager = statistics.median(times["eager", b])
        print(f"batch {b}: " + ", ".join(f"{name} {statistics.median(times[name, b]):.1f} img/s "
                                         f"({statistics.median(times[name, b]) / eager:.2f}x)" for name in variants))


if __name__ == "__main__":
    main()
