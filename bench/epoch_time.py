"""One bi-level epoch of the default 20-lambda stack on CIFAR-100/T2T-ViT-14 shapes (40k x 14 exits x 384, K=100),
in memory, without the cache or the evaluation: the quick number behind `bench/sweep_speed.py`'s full sweep.

    python bench/epoch_time.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root
from heads.train.bilevel import TrainSettings, train_stack, warmup  # noqa: E402
from heads.train.data import SplitTensors, TrainData

EXITS, DIM, CLASSES = 14, 384, 100


def random_split(n: int, gen: torch.Generator) -> SplitTensors:
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    features = [torch.randn(n, DIM, generator=gen) for _ in range(EXITS)]
    return SplitTensors(features, labels, torch.randn(n, CLASSES, generator=gen))


def main():
    gen = torch.Generator().manual_seed(0)
    data = TrainData(random_split(40000, gen), random_split(5000, gen), random_split(5000, gen),
                     torch.linspace(0.13, 1, EXITS), CLASSES)
    settings = TrainSettings(max_epochs=2, warmup_epochs=1, patience=10)   # one warm-up + one bi-level epoch
    trials = [{"lam": float(lam)} for lam in torch.logspace(-2, 1, 20)]
    start = time.perf_counter()
    warm = warmup(data, settings, trials=trials)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    train_stack(data, warm, trials, settings)
    print(f"torch threads {torch.get_num_threads()}: warm-up epoch {warm_s:.1f} s, one bi-level epoch of "
          f"{len(trials)} stacked lambdas {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
