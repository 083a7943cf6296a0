#!/usr/bin/env python
"""Does the early-exit runtime really save time? Images per second of deploy.runtime.EarlyExitModel against the
plain full backbone and against the blocks-only limit, on the CPU, at batch 1 and batch 64, in both thread
configurations (OMP_NUM_THREADS unset, and 1).

    python bench/runtime_speed.py --run runs/demo --lam 0.5                    # the cache's test images
    python bench/runtime_speed.py --run runs/demo --lam 0.5 --data-dir DIR     # where the dataset's files are
    python bench/runtime_speed.py --run runs/demo --lam 0.5 --random           # random inputs (no dataset needed)
    python bench/runtime_speed.py --backbone vit_tiny_patch16_224 --images 64 --single 16   # random weights

The limit: the same backbone blocks run only as far as each sample's exit (the exits the runtime took), the batch
compacted where samples leave, no IMs and no gates (the backbone's own head for the samples that reach the last
exit). No early-exit runtime can beat it with these exits; "of limit" is the runtime's fraction of it.

All three are timed in the same process, interleaved (the order rotates per repeat) so that a machine busy with
other work slows them alike; each figure is the median over the repeats, each ratio the median of the ratios
within a repeat. "Full" is the timm module's own forward (backbone.model(x)); the runtime's time includes
everything it returns (calibrated probabilities and conformal sets). Each thread configuration runs in its own process (OpenMP reads OMP_NUM_THREADS once, at start-up).

--backbone: a timm / T2T-ViT backbone with random weights and random heads whose gates send the samples out over
the middle third of the exits (by their IM's max probability), for timing a family without a trained run. Random
inputs exit wherever the gates send noise, so their Mul-Add figure is not a run's; real test images are the
honest measure.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the packages live at the root

import extract  # noqa: E402,F401  (before timm/torchvision: see extract/_torchvision.py)
from deploy.runtime import EarlyExitModel, RuntimeSettings, data_settings  # noqa: E402

BATCHES = (1, 64)
THREAD_CONFIGS = {"unset": None, "1": "1"}   # OMP_NUM_THREADS of each child process


def test_images(manifest: dict, data_dir, n: int) -> torch.Tensor:
    """The first n rows of the cache's test split, through the extraction's own transform."""
    from extract.datasets import load_splits

    splits = load_splits(data_settings(manifest, data_dir))
    if splits.describe()["split_hash"] != manifest["dataset"]["split_hash"]:
        raise SystemExit("the dataset found is not the one the cache was extracted from (split hash differs); "
                         "pass --data-dir, or --random")
    n = min(n, len(splits.test))
    return torch.stack([splits.test[i][0] for i in range(n)])


# ---- the limit: blocks only, up to each sample's exit ---------------------------------------------------------
def blocks_only_plan(exits: torch.Tensor, n_exits: int) -> list:
    """Per block l, None (nobody leaves) or the rows (among those still running) that go on after it; prepared
    outside the timed region, so the limit pays for nothing but the blocks and the compaction."""
    plan, alive = [], exits
    for l in range(n_exits - 1):
        stay = torch.nonzero(alive != l).squeeze(1)
        plan.append(None if stay.numel() == alive.numel() else stay)
        alive = alive[stay]
    return plan


def blocks_only(backbone, x: torch.Tensor, plan: list) -> None:
    state = backbone.stem(x)
    for l, stay in enumerate(plan):
        state = backbone.block(l, state)
        if stay is not None:
            if stay.numel() == 0:
                return
            state = state.index_select(0, stay)
    backbone.classify(backbone.block(len(plan), state))


# ---- a model without a run ------------------------------------------------------------------------------------
def synthetic_model(name: str, img_size: int, num_classes: int, x: torch.Tensor) -> EarlyExitModel:
    """Random-weight backbone `name`, random IMs, and gates g^l = sigmoid(20 (max prob_l - its median on x)) over
    the middle third of the exits (closed before it, open at its end)."""
    from extract.backbones import load_backbone
    from extract.costs import exit_costs
    from heads.evaluation.evaluate import Calibration
    from heads.model.stack import StackedHeads

    torch.manual_seed(0)
    bb = load_backbone(name, None, num_classes=num_classes, img_size=img_size)
    heads = StackedHeads.init(bb.exit_dims, num_classes, 1, trains_last=not bb.head_is_task_head, seed=0)
    n_exits = bb.num_exits
    lo, hi = n_exits // 3, max(n_exits // 3, 2 * n_exits // 3 - 1)
    with torch.no_grad():
        reps, _ = bb(x)
        logits, _ = heads.outputs([r for r in reps[:len(heads.im_weight)]], gates=False)
    confidence = torch.softmax(logits[0, :, :-1], dim=-1).max(-1).values.median(0).values
    heads.gate_weight.zero_()
    heads.gate_bias.fill_(-30.0)
    heads.gate_weight[0, lo:hi, 0] = 20.0
    heads.gate_bias[0, lo:hi] = -20.0 * confidence[lo:hi]
    heads.gate_bias[0, hi] = 30.0
    manifest = {"backbone": name, "img_size": img_size, "num_classes": num_classes, "exits": exit_costs(bb),
                "head_is_task_head": bb.head_is_task_head}
    calibration = Calibration(1.0, 0.05, "gated", (0.5,) * n_exits)
    return EarlyExitModel(bb, heads, calibration, manifest=manifest)


# ---- timing ---------------------------------------------------------------------------------------------------
def seconds(fn, batches) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for args in batches:
            fn(*args)
    return time.perf_counter() - start


def measure(args) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.run is not None:
        model = EarlyExitModel.from_run(args.run, args.lam, settings=RuntimeSettings(), cache_path=args.cache)
        m = model.manifest
        size = m["img_size"]
    else:
        size = args.img_size
    if args.run is None or args.random:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, 3, size, size, generator=gen)
        source = "random normal inputs"
    else:
        x = test_images(m, args.data_dir, args.images)
        source = f"the first {len(x)} images of the {m['dataset']['name']} test split"
    if args.run is None:
        model = synthetic_model(args.backbone, size, args.classes, x)
        m = model.manifest
    bb, full = model.backbone, model.backbone.model
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if args.compile:
        model.compile_blocks()   # the same block modules serve the full backbone and the limit

    with torch.no_grad():
        exits = model(x).exit_index
    inputs, counts = {}, {}   # per batch size: the argument tuples of each contender, and the images they hold
    for b in BATCHES:
        n = counts[b] = min(args.single, len(x)) if b == 1 else len(x)
        chunks = [slice(lo, min(lo + b, n)) for lo in range(0, n, b)]
        inputs[b] = {"full": [(x[c],) for c in chunks], "runtime": [(x[c],) for c in chunks],
                     "limit": [(bb, x[c], blocks_only_plan(exits[c], model.num_exits)) for c in chunks]}
    contenders = {"full": full, "runtime": model, "limit": blocks_only}
    for name, fn in contenders.items():   # one untimed pass each: allocator, oneDNN kernel selection, compilation
        seconds(fn, inputs[BATCHES[-1]][name][:1])
        seconds(fn, inputs[1][name][:2])
    times = {(name, b): [] for name in contenders for b in BATCHES}
    names = list(contenders)
    for r in range(args.repeats):
        order = names[r % 3:] + names[:r % 3]
        for b in BATCHES:
            for name in order:
                times[name, b].append(counts[b] / seconds(contenders[name], inputs[b][name]))

    hist = np.bincount(exits.numpy(), minlength=model.num_exits)
    costs = np.asarray(model.cumulative_macs)
    realised = float(costs[exits.numpy()].mean() / costs[-1])
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    label = (f"run {args.run}  lambda {model.run_row['lam']:.4g} (trial {model.run_row['trial']}; asked "
             f"{args.lam:g})" if args.run is not None else f"random-weight {args.backbone} (gates by hand)")
    print(f"{label}  {m['backbone']} at {size} px, K={m['num_classes']}, L={model.num_exits} exits; "
          f"OMP_NUM_THREADS {omp}, torch threads {torch.get_num_threads()}"
          f"{', channels_last' if args.channels_last else ''}{', compiled blocks' if args.compile else ''}; {source}")
    said = ""
    if model.run_row is not None:
        row = model.run_row
        said = (f"Predicted by the run on its test split: {row['cost_norm']:.3f} of IC^L (accuracy "
                f"{row['accuracy']:.4f}), a Mul-Add speed-up of {1 / row['cost_norm']:.2f}x; ")
    print(f"Mul-Adds of the full network IC^L = {costs[-1] / 1e6:.2f}M. {said}on these images: {realised:.3f} of "
          f"IC^L ({1 / realised:.2f}x)")
    print(f"exits taken (1..L): {' '.join(str(int(h)) for h in hist)}")
    print(f"{'batch':>5}  {'full img/s':>10}  {'runtime img/s':>13}  {'limit img/s':>11}  {'runtime/full':>12}  "
          f"{'limit/full':>10}  {'of limit':>8}")
    for b in BATCHES:
        f, e, lim = (statistics.median(times[name, b]) for name in ("full", "runtime", "limit"))
        # ratios within each repeat (its contenders ran seconds apart), then their median: load that changes from
        # one repeat to the next moves the ratio of two medians, taken from different repeats, more than this
        of_full, lim_full, of_lim = (statistics.median(u / v for u, v in zip(times[a, b], times[c, b]))
                                     for a, c in (("runtime", "full"), ("limit", "full"), ("runtime", "limit")))
        print(f"{b:>5}  {f:>10.1f}  {e:>13.1f}  {lim:>11.1f}  {of_full:>11.2f}x  {lim_full:>9.2f}x  {of_lim:>7.0%}")
    print(f"medians of {args.repeats} interleaved repeats (the ratios: medians of the per-repeat ratios); batch 1 "
          f"over {counts[1]} images, batch 64 over {counts[64]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory (train / sweep / fit)")
    src.add_argument("--backbone", help="time a random-weight timm backbone with hand-set gates instead of a run")
    p.add_argument("--lam", type=float, help="with --run: the selected model nearest this lambda")
    p.add_argument("--img-size", type=int, default=224, help="with --backbone: input size")
    p.add_argument("--classes", type=int, default=10, help="with --backbone: number of classes")
    p.add_argument("--data-dir", default=None, help="the dataset's files (default: the dataset's default place)")
    p.add_argument("--random", action="store_true", help="random normal inputs instead of the test split")
    p.add_argument("--images", type=int, default=256, help="images timed at batch 64 (batch 1: --single of them)")
    p.add_argument("--single", type=int, default=64, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0: torch's default). On a machine other work also uses, several "
                        "threads wait on each other at every small op: batch 1 then runs 100x slower")
    p.add_argument("--omp", choices=["both", *THREAD_CONFIGS], default="both",
                   help="OMP_NUM_THREADS of the measurement: both (one process each, default), unset or 1")
    p.add_argument("--channels-last", action="store_true", help="run the backbone in channels_last (CNNs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone blocks (EarlyExitModel.compile_blocks) for all three")
    p.add_argument("--cache", default=None, help="where the run's cache is now, if it moved")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # measure here, in this process
    args = p.parse_args(argv)
    if args.run is not None and args.lam is None:
        p.error("--run needs --lam (the selected model nearest that lambda)")
    if min(args.images, args.single, args.repeats) < 1:
        p.error("--images, --single and --repeats must be >= 1")
    if args.child:
        measure(args)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    for config in (THREAD_CONFIGS if args.omp == "both" else [args.omp]):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if THREAD_CONFIGS[config] is not None:
            env["OMP_NUM_THREADS"] = THREAD_CONFIGS[config]
        subprocess.run([sys.executable, __file__, *argv, "--child"], env=env, check=True)
        print()


if __name__ == "__main__":
    main()
