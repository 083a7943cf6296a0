#!/usr/bin/env python
"""How fast is a lambda sweep from the cache? A synthetic CIFAR-100-on-T2T-ViT-14-shaped cache, the default
20-point sweep at the paper's CIFAR-100 epoch budget, and what it is compared with.

    python bench/sweep_speed.py            # 40k/10k/10k rows, 14 exits, D=384, K=100, max 30 epochs
    python bench/sweep_speed.py --small    # a one-minute smoke run of the same code
    python bench/sweep_speed.py --device cuda

Printed: the sweep's wall time (warm-up, stacked bi-level pass, evaluation), the same epochs' bare matrix-multiply
work (forward + weight-gradient products of every IM for every trial, no autograd, no gates: a floor for this
work), the lambdas trained one at a time with the same code (a few timed, the rest extrapolated), peak memory
(ru_maxrss), and GPU time when the device is CUDA.

Epoch budget: appendix 9.1.2 reads "15 epochs for CIFAR10 and SVHN, 20 for CIFAR100LT and 30 for CIFAR100LT";
the second "CIFAR100LT" is a typo for CIFAR100 (the only dataset left), so CIFAR-100 gets max 30 epochs. The
warm-up is TrainSettings' default (2 epochs) inside that budget.
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

from cache.store import open_cache  # noqa: E402
from cache.synthetic import write_synthetic_cache  # noqa: E402
from heads.cpu import use_threads  # noqa: E402
from heads.sweep.lambdas import SweepSettings, parse_lambdas  # noqa: E402
from heads.sweep.session import Session
from heads.sweep.sweep import run_sweep
from heads.train.bilevel import TrainSettings, train_stack  # noqa: E402

FULL = {"train": 40_000, "val": 10_000, "test": 10_000, "exits": 14, "dim": 384, "classes": 100}
SMALL = {"train": 2_000, "val": 600, "test": 600, "exits": 6, "dim": 64, "classes": 20}

def bare_matmul_epoch(n_train: int, n_exits: int, dim: int, num_classes: int, n_trials: int, batch: int,
                      device: str) -> tuple[float, float]:
    """Seconds of one epoch of the stack's essential products, done two ways: (a loop of one matmul per exit,
    one batched matmul over the exits). Per mini-batch and trained IM: the forward x (B, D) @ W (D, T*K) and the
    weight gradient x^T (D, B) @ dY (B, T*K) (training computes the latter only in CLASSIFIER batches)."""
    n_ims = n_exits - 1                       # the last exit is the frozen backbone head
    tk = n_trials * num_classes
    x = torch.randn(n_ims, n_train, dim, device=device)
    w = torch.randn(n_ims, dim, tk, device=device)
    dy = torch.randn(n_ims, batch, tk, device=device)
    out = torch.empty(n_ims, batch, tk, device=device)          # preallocated: products, not allocations
    grad = torch.empty(n_ims, dim, tk, device=device)
    times = []
    for batched in (False, True):
        _sync(device)
        start = time.perf_counter()
        for lo in range(0, n_train, batch):
            xb = x[:, lo:lo + batch]
            rows = xb.shape[1]
            if batched:
                torch.bmm(xb, w, out=out[:, :rows])
                torch.bmm(xb.transpose(1, 2), dy[:, :rows], out=grad)
            else:
                for l in range(n_ims):
                    torch.mm(xb[l], w[l], out=out[l, :rows])
                    torch.mm(xb[l].T, dy[l, :rows], out=grad[l])
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a quick smoke run on a small cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-epochs", type=int, default=30, help="CIFAR-100 budget of appendix 9.1.2")
    parser.add_argument("--lambdas", default="0.01:10")
    parser.add_argument("--alone", type=int, default=3, help="lambdas trained one at a time, then extrapolated")
    parser.add_argument("--workdir", default=None, help="where to build the cache (default: a temporary folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: stage two's, heads.cpu.use_threads: the free cores)")
    args = parser.parse_args(argv)
    use_threads(args.device, args.threads)
    shape = SMALL if args.small else FULL
    sizes = {s: shape[s] for s in ("train", "val", "test")}
    lambdas = parse_lambdas(args.lambdas)
    settings = TrainSettings(max_epochs=args.max_epochs, device=args.device)
    print(f"shape: {sizes}, {shape['exits']} exits, D={shape['dim']}, K={shape['classes']}; "
          f"{len(lambdas)} lambdas {lambdas[0]:g}..{lambdas[-1]:g}; max_epochs={settings.max_epochs}, "
          f"warmup_epochs={settings.warmup_epochs}, batch {settings.batch_size}; device {args.device}; "
          f"torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        cache = write_synthetic_cache(Path(tmp) / "bench.zarr", sizes, shape["exits"], shape["dim"], shape["classes"])
        print(f"cache written through cache.store in {time.perf_counter() - start:.1f} s")

        gpu = torch.cuda.Event(enable_timing=True) if args.device.startswith("cuda") else None
        if gpu:
            gpu.record()
            gpu_end = torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        result = run_sweep(cache, SweepSettings(tuple(lambdas)), settings, Path(tmp) / "run",
                           progress=not args.no_progress)
        total = time.perf_counter() - start
        if gpu:
            gpu_end.record()
            torch.cuda.synchronize()
        t = result.settings["timings"]
        chosen = sorted((r for r in result.rows if r["method"] == "jei" and r["split"] == "test"),
                        key=lambda r: r["lam"])
        epochs = [r["epochs"] for r in chosen]
        budget = settings.max_epochs - settings.warmup_epochs
        # a trial stops `patience` epochs after its best one (or at the budget); the stack runs until the last stops
        stack_epochs = max(min(e + settings.patience, budget) for e in epochs)
        print(f"sweep: {total:.1f} s wall = warm-up {t['warmup_seconds']:.1f} s + bi-level stack "
              f"{t['train_seconds'] - t['warmup_seconds']:.1f} s + evaluation {t['evaluate_seconds']:.1f} s "
              f"+ loading/writing {total - t['train_seconds'] - t['evaluate_seconds']:.1f} s")
        print(f"best bi-level epoch per lambda (of {budget}; each stops {settings.patience} epochs later): {epochs}; "
              f"the stack ran {stack_epochs} bi-level epochs")
        print("test accuracy / normalised cost per lambda: " +
              ", ".join(f"{r['lam']:.3g}: {r['accuracy']:.3f}/{r['cost_norm']:.2f}" for r in chosen))
        if gpu:
            print(f"GPU time (CUDA events around the sweep): {gpu.elapsed_time(gpu_end) / 1000:.1f} s")

        # bare work of the epochs the stack ran: trials leave the stack when they stop, so an epoch with T' of the
        # T trials still training is charged T'/T of a full-stack epoch (narrower products run at most as fast per
        # multiply-add, so this is a lower bound of the bare time, i.e. it understates our ratio)
        stops = [min(e + settings.patience, budget) for e in epochs]
        trial_epochs = sum(stops)
        epoch_args = (sizes["train"], shape["exits"], shape["dim"], shape["classes"])
        loop_epoch, bmm_epoch = bare_matmul_epoch(*epoch_args, len(lambdas), settings.batch_size, args.device)
        bare_epoch = min(loop_epoch, bmm_epoch)
        warm_loop, warm_bmm = bare_matmul_epoch(*epoch_args, 1, settings.batch_size, args.device)
        bare = bare_epoch * trial_epochs / len(lambdas) + settings.warmup_epochs * min(warm_loop, warm_bmm)
        train_total = t["train_seconds"]
        print(f"bare products of one full-stack epoch: {loop_epoch:.2f} s as a loop over exits, {bmm_epoch:.2f} s "
              f"batched over exits; the faster is the reference")
        bilevel = train_total - t["warmup_seconds"]
        print(f"the stack trained {trial_epochs} trial-epochs ({trial_epochs / len(lambdas):.1f} full-stack epochs) "
              f"in {bilevel:.1f} s: {bilevel * len(lambdas) / trial_epochs:.2f} s per full-stack epoch with the "
              f"per-epoch V1/V2 passes, bare products {bare_epoch:.2f} s")
        print(f"bare products of the same work ({trial_epochs / len(lambdas):.1f} full-stack bi-level epochs + "
              f"{settings.warmup_epochs} warm-up): {bare:.1f} s; training took {train_total:.1f} s: "
              f"{bare / train_total:.2f} x the bare-product speed (target >= 0.5)")

        # lambdas one at a time, same code: the warm-up is shared (as a user would reuse it), each lambda its own
        # pass; the time per trained epoch of a lone lambda, times the trial-epochs the stack trained
        with open_cache(cache) as c:
            session = Session(c, settings, progress=not args.no_progress)
            warm = session.warmed(settings, [{"lam": lam} for lam in lambdas])
            picks = [lambdas[round(i * (len(lambdas) - 1) / max(args.alone - 1, 1))] for i in range(args.alone)]
            alone, alone_epochs = [], []
            for lam in picks:
                start = time.perf_counter()
                heads = train_stack(session.data, warm, [{"lam": lam}], settings)
                alone.append(time.perf_counter() - start)
                alone_epochs.append(min(int(heads.epochs_trained[0]) + settings.patience, budget))
        per_epoch = sum(alone) / sum(alone_epochs)
        one_by_one = per_epoch * trial_epochs + t["warmup_seconds"]
        print(f"one lambda at a time: {', '.join(f'{s:.1f} s for {e} epochs' for s, e in zip(alone, alone_epochs))} "
              f"(lambdas {', '.join(f'{x:.3g}' for x in picks)}): {per_epoch:.2f} s per epoch; the stack's "
              f"{trial_epochs} trial-epochs one at a time: {one_by_one:.1f} s -> the stacked sweep trains "
              f"{one_by_one / train_total:.1f} x faster")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux
    print(f"peak resident memory: {peak:.2f} GiB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
