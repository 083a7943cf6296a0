"""Per-epoch accuracy of every IM during a long warm-up (eq. 17), and where the convergence rule of
`--warmup-patience` would stop it.

    python bench/warmup_curve.py --cache cache/demo-lite0-fmnist64.zarr --epochs 40 --lrs 0.01,0.003,0.001

Prints, per lr, the test accuracy of every IM at a few epochs (each IM at its best V2 epoch so far, as the warm-up
keeps it) and, for patience 2-5, the epoch at which `heads.train.bilevel.warmup` would stop and the IMs' mean test
accuracy there. One torch thread (the warm-up's own speed is not what this measures).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache.store import open_cache  # noqa: E402
from heads.model.stack import StackedHeads  # noqa: E402
from heads.train.bilevel import WARMUP_MIN_GAIN, TrainSettings, warmup  # noqa: E402
from heads.train.data import make_train_data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lrs", default="0.01,0.003,0.001")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs = [float(x) for x in args.lrs.split(",")]
    with open_cache(args.cache) as cache:
        data = make_train_data(cache)
        test = cache.load_split("test")
    feats, labels = [f.float() for f in test.features], test.labels.numpy()
    last = None if data.trains_last else test.logits.float()
    settings = TrainSettings(max_epochs=args.epochs + 1, warmup_epochs=args.epochs)
    start = time.perf_counter()
    warm = warmup(data, settings, trials=[{"lam": 0.0, "lr": lr, "warmup_epochs": args.epochs} for lr in lrs])
    print(f"warm-up: {time.perf_counter() - start:.1f} s for {args.epochs} epochs x {len(lrs)} lrs")
    test_acc = np.zeros((args.epochs + 1, len(lrs), len(data.exit_dims)))
    for w in range(1, args.epochs + 1):
        for j, lr in enumerate(lrs):
            heads = StackedHeads.init(data.exit_dims, data.num_classes, 1, data.trains_last, 0, "cpu")
            heads.im_weight, heads.im_bias = warm.initial_ims(lr, settings.weight_decay, w)
            logits, _ = heads.outputs(feats, last)
            test_acc[w, j] = (logits[0].argmax(-1).numpy() == labels[:, None]).mean(0)
    v2 = warm.v2_accuracy.numpy()                                   # (epochs, lrs, IMs)
    for j, lr in enumerate(lrs):
        print(f"lr {lr:g}: test accuracy % of IM 1..L (best V2 epoch so far)")
        for w in sorted({2, 5, 10, 15, 20, 30, args.epochs} & set(range(1, args.epochs + 1))):
            print(f"  epoch {w:3d}: " + " ".join(f"{100 * a:.1f}" for a in test_acc[w, j])
                  + f"   mean {100 * test_acc[w, j].mean():.2f}")
        level = np.maximum.accumulate(v2[:, j], axis=0).mean(1)
        for n in (2, 3, 4, 5):
            stop = next((e + 1 for e in range(n, args.epochs) if level[e] - level[e - n] < WARMUP_MIN_GAIN),
                        args.epochs)
            print(f"  --warmup-patience {n}: stops after epoch {stop}, IMs' mean test accuracy "
                  f"{100 * test_acc[stop, j].mean():.2f} %")


if __name__ == "__main__":
    main()
