"""Why DiffBranch sits at one cost for every lambda: its V2 exits per epoch, with the exit distribution of JEI-DNN
(eqs. 7-8, the `diffbranch` baseline) or Scardapane et al.'s product form P(G=l) = g^l prod_{j<l} (1 - g^j).

    python bench/diffbranch_probe.py --cache cache/demo-lite0-fmnist64.zarr --form min --epochs 8
    python bench/diffbranch_probe.py --cache cache/demo-lite0-fmnist64.zarr --form product --epochs 8

Trains heads.baselines.diffbranch.train_diffbranch (paper recipe: 2 warm-up epochs, then joint descent on eq. 9) and
prints, after every epoch and per lambda, V2 accuracy, normalised cost and the exit histogram. Under eqs. 7-8 the mass
P(G=l) is clamped to 0 once the earlier gates have used it up; the gradient of eq. 9 then never reaches the later
exits, and gates that start near 0.5 use it up within the first few exits. With the product form every exit keeps
a gradient. With --form product the exits are decided by g^l > 0.5 (P(E^l|x) = g^l there).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import heads.baselines.methods as baselines  # noqa: E402
from cache.store import open_cache  # noqa: E402
from heads.model.exits import exit_decision, exit_distribution  # noqa: E402
from heads.train.bilevel import TrainSettings, warmup  # noqa: E402
from heads.train.data import make_train_data


def product_distribution(g: torch.Tensor) -> torch.Tensor:
    ones = torch.ones_like(g[..., :1])
    return torch.cat([g, ones], -1) * torch.cumprod(torch.cat([ones, 1 - g], -1), -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--form", choices=["min", "product"], default="min")
    parser.add_argument("--epochs", type=int, default=8, help="max_epochs (2 of them warm-up)")
    parser.add_argument("--lambdas", default="0.0001,0.01,0.1,0.43,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    with open_cache(args.cache) as cache:
        data = make_train_data(cache)
    settings = TrainSettings(max_epochs=args.epochs)
    warm = warmup(data, settings, trials=[{"lam": 0.0}])
    if args.form == "product":
        baselines.exit_distribution = product_distribution    # the training loss of eq. 9
    epoch = [0]

    def metrics(heads, split, lam, ic_norm):
        logits, g = heads.outputs(split.features, split.logits)
        if args.form == "product":
            taken = (torch.cat([g, torch.ones_like(g[..., :1])], -1) > 0.5).int().argmax(-1)
        else:
            taken = exit_decision(exit_distribution(g))
        z = logits.gather(2, taken[..., None, None].expand(-1, -1, 1, logits.shape[-1]))[:, :, 0]
        accuracy = (z.argmax(-1) == split.labels).double().mean(1)
        cost = ic_norm[taken].double().mean(1)
        ce = torch.nn.functional.cross_entropy(z.transpose(1, 2), split.labels[None].expand(len(lam), -1),
                                               reduction="none").double().mean(1)
        epoch[0] += 1
        for t, value in enumerate(lambdas):
            hist = np.bincount(taken[t].numpy(), minlength=len(ic_norm)).tolist()
            print(f"epoch {epoch[0]} lambda {value:g}: V2 accuracy {float(accuracy[t]):.3f} cost {float(cost[t]):.3f}"
                  f" exits {hist}", flush=True)
        return {"objective": ce + lam.double() * cost, "accuracy": accuracy, "cost": cost}

    baselines.exited_metrics = metrics
    baselines.train_diffbranch(data, warm, lambdas, settings)


if __name__ == "__main__":
    main()
