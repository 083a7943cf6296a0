#!/usr/bin/env python
"""Stage one and stage two at ImageNet's shape: how the time and the memory scale, resident against streamed.

    OMP_NUM_THREADS=1 python bench/scale.py --workdir /tmp/scale           # 50k/5k/5k rows, K=1000; ~10 min
    OMP_NUM_THREADS=1 python bench/scale.py --workdir /tmp/scale --small   # the same code in about a minute

What it measures, each part in its own process so that peak RSS (ru_maxrss) is that part's alone:
(a) extraction of a tiny model (ResNet-18, random init, 32 px) over a generated class-folder tree of PNGs, one
    process against `torchrun --nproc_per_node=2` (gloo), wall time including start-up;
(b) on a synthetic ImageNet-shaped cache (bench/sweep_speed.py's writer; K = 1000, 14 exits of D = 384, the
    backbone's logits stored) the loading and ONE bi-level epoch of a lambda stack (no warm-up epoch; the default
    recipe's GATE state, with the V1 class-weight pass and the V2 evaluation of the epoch), resident (--resident)
    and streamed (--memory-budget below the cache's size: train streams, val and test stay resident);
(c) each run's peak RSS against the float16 bytes of the cache and of what it holds, and the issue's bound
    1.25 x (held float16 bytes) + 1 GiB; then the sweep's evaluation of one trial (every metric on V2 and test),
    whose float32 (N, L, K) logits come on top of the features at K = 1000.
Prints one table. The cache and the image tree stay in WORKDIR for a rerun; the extraction caches are rewritten.
"""
import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from anywhere: the packages live at the root

from cache.synthetic import write_synthetic_cache  # noqa: E402

FULL = {"rows": {"train": 50_000, "val": 5_000, "test": 5_000}, "images": 6_000, "lambdas": 4, "budget_gb": 0.25}
SMALL = {"rows": {"train": 5_000, "val": 1_000, "test": 1_000}, "images": 600, "lambdas": 2, "budget_gb": 0.03}
EXITS, DIM, CLASSES = 14, 384, 1000
GIB = 2 ** 30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


# ---- (b), in a child process ----------------------------------------------------------------------------------
def epoch_child(cache_path: str, mode: str, budget_gb: float, lambdas: int) -> dict:
    """Load the cache as `mode` says and train one bi-level epoch of `lambdas` trials; what it took."""
    import torch

    from cache.store import open_cache
    from heads.train.stream import MemorySettings, plan_memory
    from heads.sweep.rows import evaluate_group
    from heads.sweep.session import Session
    from heads.train.bilevel import default_settings, train_stack, warmup
    settings = default_settings(max_epochs=1, warmup_epochs=0, warmup_patience=0)
    before = peak_rss()
    with open_cache(cache_path) as cache:
        plan = plan_memory(cache, MemorySettings("resident" if mode == "resident" else "auto", budget_gb))
        start = time.perf_counter()
        session = Session(cache, settings, progress=False, plan=plan)
        loaded = time.perf_counter() - start
        warm = warmup(session.data, settings)
        start = time.perf_counter()
        heads = train_stack(session.data, warm, [{"lam": float(x)} for x in np.geomspace(0.01, 1, lambdas)],
                            settings)
        epoch = time.perf_counter() - start
        trained = peak_rss()
        start = time.perf_counter()        # the sweep's evaluation of one trial: every metric on V2 and test
        evaluate_group(session, {"trials": [{"trial": 0, "lam": 0.01}], "heads": heads.select(0),
                                 "settings": dataclasses.asdict(settings), "seconds": 0.0})
        evaluated = time.perf_counter() - start
        described = plan.describe()
    held = described["resident_gib"] + described["streaming_buffers_gib"]
    return {"mode": mode, "load_s": loaded, "epoch_s": epoch, "rows": len(session.data.train),
            "eval_s": evaluated, "eval_rows": len(session.data.v2) + len(session.test),
            "before_gib": before / GIB, "peak_gib": trained / GIB, "eval_peak_gib": peak_rss() / GIB, "held_gib": held,
            "cache_gib": sum(described["splits"][s]["gib"] for s in described["splits"]),
            "placement": {s: "resident" if v["resident"] else "streamed" for s, v in described["splits"].items()},
            "finite": bool(all(torch.isfinite(t).all() for t in heads.state_dict().values()))}


# ---- (a) ------------------------------------------------------------------------------------------------------
def image_tree(root: Path, n_images: int, classes: int = 4) -> Path:
    """A class-folder tree of n_images random 32 x 32 PNGs (ImageNet's layout, train/ only)."""
    from PIL import Image
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    done.touch()
    return root


def extraction(tree: Path, out: Path, ranks: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["extract", "--backbone", "resnet18", "--img-size", "32", "--dataset", "imagefolder", "--data-dir",
            str(tree), "--device", "cpu", "--out", str(out)]
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29533"]
    start = time.perf_counter()
    res = subprocess.run(launcher + [str(ROOT / "pipeline.py"), *args], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    took = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"extraction on {ranks} rank(s) failed:\n{res.stderr[-2000:]}")
    # the extraction's own last line: rows and seconds from the first batch to the end, start-up left out
    done = re.findall(r"(\d+) rows (?:on \d+ ranks )?in ([\d.]+) s", res.stderr)
    return {"ranks": ranks, "seconds": took, "rows": int(done[-1][0]), "compute": float(done[-1][1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the cache, the image tree and the runs go")
    parser.add_argument("--small", action="store_true", help="a quick smoke run of the same code")
    parser.add_argument("--epoch", nargs=4, metavar=("CACHE", "MODE", "BUDGET_GB", "LAMBDAS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epoch:                                    # a child of (b): one JSON line
        cache, mode, budget, lambdas = args.epoch
        print(json.dumps(epoch_child(cache, mode, float(budget), int(lambdas))))
        return
    shape = SMALL if args.small else FULL
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / ("small.zarr" if args.small else "imagenet-shaped.zarr")
    if not cache.exists():
        start = time.perf_counter()
        write_synthetic_cache(cache, shape["rows"], EXITS, DIM, CLASSES)
        print(f"wrote {cache} in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    tree = image_tree(work / "images", shape["images"])
    extractions = [extraction(tree, work / f"extract-{n}.zarr", n) for n in (1, 2)]
    epochs = []
    for mode in ("resident", "streamed"):
        res = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--epoch", str(cache), mode,
                              str(shape["budget_gb"]), str(shape["lambdas"])], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"the {mode} epoch failed:\n{res.stderr[-2000:]}")
        epochs.append(json.loads(res.stdout.strip().splitlines()[-1]))

    print(f"(a) extraction, ResNet-18 at 32 px, {extractions[0]['rows']} rows")
    for e in extractions:
        print(f"    {e['ranks']} rank(s): {e['seconds']:6.1f} s wall with start-up; extraction {e['compute']:6.1f} s, "
              f"{e['rows'] / e['compute']:6.0f} rows/s")
    rows = epochs[0]["rows"]
    print(f"(b, c) one bi-level epoch, {rows} train rows x {EXITS} exits x D {DIM}, K {CLASSES}, "
          f"{shape['lambdas']} lambdas; cache {epochs[0]['cache_gib']:.2f} GiB float16; streamed budget "
          f"{shape['budget_gb']} GB")
    print(f"    {'mode':9} {'load s':>7} {'epoch s':>8} {'rows/s':>7} {'held GiB':>9} {'peak RSS':>9} "
          f"{'imports':>8} {'bound':>6}  placement")
    for e in epochs:
        bound = 1.25 * e["held_gib"] + 1.0
        verdict = "ok" if e["peak_gib"] <= bound else "OVER"
        print(f"    {e['mode']:9} {e['load_s']:7.1f} {e['epoch_s']:8.1f} {rows / e['epoch_s']:7.0f} "
              f"{e['held_gib']:9.2f} {e['peak_gib']:9.2f} {e['before_gib']:8.2f} {bound:6.2f}  "
              f"{' '.join(f'{s}:{p}' for s, p in e['placement'].items())} [{verdict}]")
    print("held = float16 features and logits kept resident + two streaming buffers; bound = 1.25 x held + 1 GiB; "
          "imports = peak RSS before loading (python, torch, numba)")
    for e in epochs:
        print(f"    {e['mode']}: the evaluation of one trial (V2 + test, {e['eval_rows']} rows, float32 logits of "
              f"every exit) {e['eval_s']:.1f} s, peak RSS after it {e['eval_peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
