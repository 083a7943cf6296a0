"""One bi-level epoch of the default 20-lambda stack on CIFAR-100/T2T-ViT-14 shapes (40k x 14 exits x 384, K=100),
in memory, without the cache or the evaluation: the quick number behind `bench/sweep_speed.py`'s full sweep.

    python bench/epoch_time.py
"""
import time

import torch

from heads.train import TrainSettings, TrainData, SplitTensors, warmup, train_stack
g = torch.Generator().manual_seed(0)
L, D, K = 14, 384, 100
def split(n):
    y = torch.randint(0, K, (n,), generator=g)
    return SplitTensors([torch.randn(n, D, generator=g) for _ in range(L)], y, torch.randn(n, K, generator=g))
data = TrainData(split(40000), split(5000), split(5000), torch.linspace(0.13, 1, L), K)
s = TrainSettings(max_epochs=2, warmup_epochs=1, patience=10)
trials = [{"lam": float(l)} for l in torch.logspace(-2, 1, 20)]
t = time.perf_counter(); warm = warmup(data, s, trials=trials); tw = time.perf_counter() - t
t = time.perf_counter(); train_stack(data, warm, trials, s); tb = time.perf_counter() - t
print(f"threads {torch.get_num_threads()}: warm-up epoch {tw:.1f} s, one bi-level epoch of 20 stacked lambdas {tb:.1f} s")
