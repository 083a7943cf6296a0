"""`finetune`: transfer an ImageNet backbone to the task (Yuan et al.'s recipe) before it is frozen and extracted.

    python pipeline.py finetune --backbone t2t_vit_14 --weights 81.5_T2T_ViT_14.pth.tar --dataset cifar100 \\
        --data-dir data --out t2t14-cifar100.pth
    python pipeline.py extract --backbone t2t_vit_14 --weights t2t14-cifar100.pth --dataset cifar100 --data-dir data
"""
import logging

import click

from cli.extract import source_options

log = logging.getLogger(__name__)


@click.command("finetune")
@source_options
@click.option("--out", required=True, help="Checkpoint to write (.pth); resumed when it exists.")
@click.option("--img-size", type=int, default=None, help="Input size (default: the backbone's). Extract at the same.")
@click.option("--normalize", type=click.Choice(["backbone", "dataset"]), default="backbone", show_default=True,
              help="Mean/std of the architecture's config or of the dataset. Extract with the same.")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images of every split (quick runs).")
@click.option("--epochs", type=int, default=60, show_default=True, help="Also the length of the cosine schedule.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Learning rate of the backbone.")
@click.option("--head-lr-mult", type=float, default=100.0, show_default=True,
              help="The new head's learning rate is lr x this.")
@click.option("--min-lr", type=float, default=2e-4, show_default=True,
              help="Where the cosine schedule ends, for backbone and head alike.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--drop-path", type=float, default=0.1, show_default=True, help="Stochastic depth rate.")
@click.option("--augment", type=click.Choice(["crop", "rrc", "none"]), default="crop", show_default=True,
              help="crop: pad S/8 + random crop + flip (Yuan et al.); rrc: random resized crop + flip (timm).")
@click.option("--seed", type=int, default=0, show_default=True, help="Head init, data order, augmentation.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Also checkpoint every N steps (0: at the end of every epoch only).")
@click.option("--until-epoch", type=int, default=None,
              help="Stop after this epoch in this run (time-limited jobs); rerun to continue.")
@click.option("--overwrite", is_flag=True, help="Restart instead of resuming an existing --out.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def finetune_cmd(**options):
    """Fine-tune a pretrained backbone and a new head on the dataset's train split (SGD, cosine schedule)."""
    import torch

    from extract.finetune import FinetuneSettings, run_finetune
    try:
        settings = FinetuneSettings(**options)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        path = run_finetune(settings)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except torch.OutOfMemoryError:
        raise click.ClickException(f"out of memory at batch size {settings.batch_size}; lower --batch-size "
                                   "(with --overwrite: the batch size is a setting of the run)") from None
    # extraction must read the images as fine-tuning did: same size, same normalisation
    same = "".join(f" {flag} {value}" for flag, value in (("--data-dir", settings.data_dir),
                                                          ("--img-size", settings.img_size),
                                                          ("--normalize", settings.normalize)) if value)
    log.info(f"next: python pipeline.py extract --backbone {settings.backbone} --weights {path} "
               f"--dataset {settings.dataset}{same}")
    click.echo(str(path))
