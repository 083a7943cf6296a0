#!/usr/bin/env python
"""Does the early-exit runtime really save time? Images per second of heads.runtime.EarlyExitModel against the
plain full backbone on the CPU, at batch 1 and batch 64, beside the Mul-Add saving the run predicted.

    python bench/runtime_speed.py --run runs/demo --lam 0.5                    # the cache's test images
    python bench/runtime_speed.py --run runs/demo --lam 0.5 --data-dir DIR     # where the dataset's files are
    python bench/runtime_speed.py --run runs/demo --lam 0.5 --random           # random inputs (no dataset needed)

Both are timed in the same process, interleaved (full, runtime, full, ... with the order alternating per repeat)
so that a machine busy with other work slows both alike; each figure is the median over the repeats. "Full" is
the timm module's own forward (backbone.model(x)); the runtime's time includes everything it returns
(calibrated probabilities and conformal sets). Random inputs exit wherever the gates send noise, so their
Mul-Add figure is not the run's; the real test images are the honest measure.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

import extract  # noqa: E402,F401  (before timm/torchvision: see extract/_torchvision.py)
from heads.runtime import EarlyExitModel, RuntimeSettings, data_settings  # noqa: E402

BATCHES = (1, 64)


def test_images(manifest: dict, data_dir, n: int) -> torch.Tensor:
    """The first n rows of the cache's test split, through the extraction's own transform."""
    from extract.datasets import load_splits

    splits = load_splits(data_settings(manifest, data_dir))
    if splits.describe()["split_hash"] != manifest["dataset"]["split_hash"]:
        raise SystemExit("the dataset found is not the one the cache was extracted from (split hash differs); "
                         "pass --data-dir, or --random")
    n = min(n, len(splits.test))
    return torch.stack([splits.test[i][0] for i in range(n)])


def seconds(fn, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            fn(x[lo:lo + batch])
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run directory (train / sweep / fit)")
    p.add_argument("--lam", required=True, type=float, help="the selected model nearest this lambda")
    p.add_argument("--data-dir", default=None, help="the dataset's files (default: the dataset's default place)")
    p.add_argument("--random", action="store_true", help="random normal inputs instead of the test split")
    p.add_argument("--images", type=int, default=256, help="images timed at batch 64 (batch 1: --single of them)")
    p.add_argument("--single", type=int, default=64, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0: torch's default). On a machine other work also uses, several "
                        "threads wait on each other at every small op: batch 1 then runs 100x slower")
    p.add_argument("--cache", default=None, help="where the run's cache is now, if it moved")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    model = EarlyExitModel.from_run(args.run, args.lam, settings=RuntimeSettings(), cache_path=args.cache)
    m, row = model.manifest, model.run_row
    if args.random:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, 3, m["img_size"], m["img_size"], generator=gen)
        source = "random normal inputs"
    else:
        x = test_images(m, args.data_dir, args.images)
        source = f"the first {len(x)} images of the {m['dataset']['name']} test split"
    full = model.backbone.model

    # one untimed pass each: allocator, oneDNN kernel selection, numba
    seconds(full, x[:64], 64)
    seconds(model, x[:64], 64)
    times = {(name, b): [] for name in ("full", "runtime") for b in BATCHES}
    for r in range(args.repeats):
        for b in BATCHES:
            xs = x[:args.single] if b == 1 else x
            pair = [("full", full), ("runtime", model)]
            for name, fn in (pair if r % 2 == 0 else pair[::-1]):
                times[name, b].append(len(xs) / seconds(fn, xs, b))

    out = model(x)
    hist = np.bincount(out.exit_index.numpy(), minlength=model.num_exits)
    costs = np.asarray(model.cumulative_macs)
    realised = float(costs[out.exit_index.numpy()].mean() / costs[-1])
    agree = float((out.prediction == full(x).argmax(-1)).double().mean()) if m["head_is_task_head"] else None

    print(f"run {args.run}  lambda {row['lam']:.4g} (trial {row['trial']}; asked {args.lam:g})  "
          f"{m['backbone']} at {m['img_size']} px, K={m['num_classes']}, L={model.num_exits} exits; "
          f"torch threads {torch.get_num_threads()}; {source}")
    print(f"Mul-Adds of the full network IC^L = {costs[-1] / 1e6:.2f}M. Predicted by the run on its test split: "
          f"{row['cost_norm']:.3f} of IC^L (accuracy {row['accuracy']:.4f}), a Mul-Add speed-up of "
          f"{1 / row['cost_norm']:.2f}x; on these images: {realised:.3f} of IC^L ({1 / realised:.2f}x)")
    print(f"exits taken (1..L): {' '.join(str(int(h)) for h in hist)}"
          + (f"; runtime predictions = full backbone's on {100 * agree:.1f}%" if agree is not None else ""))
    print(f"{'batch':>5}  {'full backbone img/s':>19}  {'early-exit runtime img/s':>24}  {'speed-up':>8}  "
          f"{'Mul-Add saving says':>19}")
    for b in BATCHES:
        f, e = statistics.median(times["full", b]), statistics.median(times["runtime", b])
        print(f"{b:>5}  {f:>19.1f}  {e:>24.1f}  {e / f:>7.2f}x  {1 / realised:>18.2f}x")
    print(f"medians of {args.repeats} interleaved repeats; batch 1 over {min(args.single, len(x))} images, "
          f"batch 64 over {len(x)}")


if __name__ == "__main__":
    main()
