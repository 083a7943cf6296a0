"""`extract` (fill a feature cache) and `costs` (per-exit Mul-Adds) commands.

    python pipeline.py extract --backbone t2t_vit_7 --weights ckpt.pth.tar --dataset cifar10 --data-dir data
    torchrun --nproc_per_node=4 pipeline.py extract ...    # one rank per GPU (torchrun.py)
    python pipeline.py costs --backbone t2t_vit_14 --num-classes 100 --img-size 224 --json
"""
import json

import click


SOURCE_OPTIONS = (
    click.option("--backbone", required=True,
                 help="timm model name (t2t_vit_7, vit_tiny_patch16_224, resnet18, ...)."),
    click.option("--weights", default=None, help="Checkpoint file, or a packaged name (efficientnet-lite0). "
                 "Default: random init (seeded)."),
    click.option("--dataset", required=True, help="cifar10, cifar100, cifar100-lt, svhn, fashion-mnist or imagefolder."),
    click.option("--data-dir", default=None, help="Where the dataset's files are (default: per dataset)."),
    click.option("--download", is_flag=True, help="Let torchvision fetch a missing CIFAR/SVHN/Fashion-MNIST."),
)


def source_options(f):
    """The backbone and dataset options that `extract` and `finetune` share."""
    for option in reversed(SOURCE_OPTIONS):
        f = option(f)
    return f


@click.command("extract")
@source_options
@click.option("--img-size", type=int, default=None, help="Input size (default: the backbone's).")
@click.option("--num-classes", type=int, default=None, help="Head size (default: the dataset's class count).")
@click.option("--tokens", type=click.Choice(["cls", "cls+mean", "all"]), default="cls", show_default=True,
              help="What an exit stores of a ViT: normed CLS token, + mean of patch tokens, or every token.")
@click.option("--views", type=int, default=0, show_default=True,
              help="Extra random-crop+flip views of every training image, cached as extra rows.")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--normalize", type=click.Choice(["backbone", "dataset"]), default="backbone", show_default=True,
              help="Mean/std of the backbone's pretrained config or of the dataset.")
@click.option("--limit", type=int, default=None, help="Only the first N images of every split (quick runs).")
@click.option("--out", default=None, help="Cache path (default: cache/<backbone>-<dataset>-<fingerprint>.zarr|.h5).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --out instead of resuming it.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--chunk-rows", type=int, default=64, show_default=True,
              help="Rows per stored chunk (batch size and chunk rows must divide one another).")
@click.option("--num-workers", type=int, default=None,
              help="DataLoader worker processes (default: 0 on a CPU; on a GPU, the CPUs shared among the ranks, "
                   "at most 8 per rank).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def extract_cmd(backbone, weights, dataset, data_dir, download, img_size, num_classes, tokens, views, split_seed,
                normalize, limit, out, fmt, overwrite, batch_size, chunk_rows, num_workers, device, progress):
    """Run a frozen backbone once over a dataset and write (or resume) its feature cache."""
    import torch

    from cache.store import CacheError
    from torchrun import OtherRankFailed
    from extract.run import ExtractionError, ExtractSettings, run_extraction
    try:
        settings = ExtractSettings(
            backbone=backbone, dataset=dataset, weights=weights, data_dir=data_dir, img_size=img_size,
            num_classes=num_classes, tokens=tokens, views=views, split_seed=split_seed, normalize=normalize,
            limit=limit, download=download, out=out, fmt=fmt, overwrite=overwrite, batch_size=batch_size,
            chunk_rows=chunk_rows, num_workers=num_workers, device=device, progress=progress)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        path = run_extraction(settings)
    except OtherRankFailed:   # torchrun: the rank that failed printed why
        raise SystemExit(1) from None
    except (ValueError, CacheError, ExtractionError) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:   # zarr's writes raise ENOSPC and the like without a file name: name the cache
        err.filename = err.filename or out or "cache/"
        raise
    except torch.OutOfMemoryError:
        raise click.ClickException(f"out of memory at batch size {batch_size}; lower --batch-size "
                                   "(the cache resumes where it stopped)") from None
    if path is not None:   # None: a torchrun rank other than 0
        click.echo(str(path))


@click.command("costs")
@click.option("--backbone", required=True, help="timm model name.")
@click.option("--num-classes", type=int, required=True, help="K: the IMs' output width.")
@click.option("--img-size", type=int, default=None, help="Input size (default: the backbone's).")
@click.option("--tokens", type=click.Choice(["cls", "cls+mean", "all"]), default="cls", show_default=True,
              help="Exit representation (changes what each exit reads, so its cost).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object instead of a table.")
def costs_cmd(backbone, num_classes, img_size, tokens, as_json):
    """Cumulative Mul-Adds at every exit: backbone alone, and with the IMs and gates of the exits passed."""
    from extract.costs import backbone_costs, format_costs
    try:
        costs = backbone_costs(backbone, num_classes, img_size, tokens=tokens)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(costs, indent=2))
        return
    click.echo(format_costs(costs))
