"""Does the early-exit runtime take the same exits and give the same predictions as stage two's simulation from the
cache, on a real run? (The tiny-model version of this check is tests/test_runtime.py.)

    python bench/runtime_check.py --run runs/demo --lam 0.00123 [--limit 2000]

Runs EarlyExitModel on the run's test images (through the extraction's own transform) and compares, per image, the
exit and the predicted class with what heads.StackedHeads computes from the cached features at the same threshold.
"""
import argparse

import torch

import extract  # noqa: F401  (torchvision guard before timm)
from cache.store import open_cache
from extract.datasets import load_splits
from heads.model.exits import exit_decision, exit_distribution
from heads.results import rundir
from deploy.runtime import EarlyExitModel, data_settings, select_trial, trial_heads


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--lam", type=float, required=True)
    ap.add_argument("--cache", default=None, help="where the run's cache is now, if it moved")
    ap.add_argument("--limit", type=int, default=2000, help="first N test images")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)   # the extraction's arithmetic on this machine (see bench/README.md)

    model = EarlyExitModel.from_run(args.run, args.lam, cache_path=args.cache)
    rows, settings = rundir.read_results(args.run)
    heads = trial_heads(args.run, select_trial(rows, args.lam)["trial"])
    with open_cache(args.cache or settings["cache"]["path"]) as cache:
        test = cache.load_split("test")
    n = min(args.limit, len(test.labels))
    logits, g = heads.outputs([f[:n] for f in test.features], None if heads.trains_last else test.logits[:n])
    sim_exit = exit_decision(exit_distribution(g), model.threshold)[0]
    sim_pred = logits[0][torch.arange(n), sim_exit].argmax(-1)

    split = load_splits(data_settings(model.manifest, None)).test
    exits, preds = [], []
    with torch.no_grad():
        for lo in range(0, n, args.batch_size):
            images = torch.stack([split[i][0] for i in range(lo, min(lo + args.batch_size, n))])
            out = model(images)
            exits.append(out.exit_index)
            preds.append(out.prediction)
    exits, preds = torch.cat(exits), torch.cat(preds)
    print(f"{n} test images, lambda {args.lam}: exits differ on {int((exits != sim_exit).sum())}, predictions differ "
          f"on {int((preds != sim_pred).sum())}; runtime accuracy {float((preds == test.labels[:n]).float().mean()):.4f}, "
          f"exit histogram {torch.bincount(exits, minlength=heads.n_exits).tolist()}")


if __name__ == "__main__":
    main()
