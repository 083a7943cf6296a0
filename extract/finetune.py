"""Transfer learning of a backbone to the task before it is frozen (the paper's section 5: Yuan et al.'s procedure).

    path = run_finetune(FinetuneSettings(backbone="t2t_vit_14", weights="81.5_T2T_ViT_14.pth.tar",
                                         dataset="cifar100", data_dir="data", out="t2t14-cifar100.pth"))
    # then: python pipeline.py extract --backbone t2t_vit_14 --weights t2t14-cifar100.pth --dataset cifar100

The recipe is that of Yuan et al. (2021)'s transfer_learning.py, which the JEI-DNN authors used:
  - SGD, momentum 0.9, weight decay 5e-4 on every parameter, batch 64 (the paper's batch size everywhere);
  - two learning rates: the new head at 0.05, the pretrained backbone 100x lower (their --transfer-ratio 0.01);
    here `lr` is the backbone's and `head_lr_mult` the ratio. Unlike their script, every trainable parameter of
    the backbone is optimised (their groups hold tokens_to_token, blocks and head only, so cls_token and the
    final norm stay as pretrained there); parameters the architecture keeps fixed (T2T-ViT's sinusoid
    pos_embed, its performer projections) stay fixed;
  - a cosine schedule from each group's rate down to the same absolute `min_lr` = 2e-4 (their CosineAnnealingLR
    with eta_min=2e-4 over 60 epochs); here it advances every step rather than every epoch;
  - stochastic depth 0.1 (their --drop-path default);
  - augmentation `crop` (default): pad by img_size // 8, random crop back, horizontal flip -- their transform,
    and the same one as the cached views of `extract --views` (datasets.py), so fine-tuning and extraction see
    the same kind of image. `rrc`: timm's ImageNet training crop (random resized crop, scale 0.08-1, ratio
    3/4-4/3, + flip), the backbone's pretraining augmentation, harsher on upsampled 32 px images. `none`.
    Augmentation runs on the batch on the device, after the resize to img_size; SVHN is never flipped.
The train split trains, the val split is reported after every epoch (the test split is never touched), and the
last epoch's weights are saved (model selection on val is the user's, from the history in the checkpoint).

The checkpoint (.pth, readable with torch.load(weights_only=True)) holds {"format", "state_dict" (the timm
model's, with the task's head: load_backbone gives head_is_task_head=True), "epoch" (epochs done), "step"
(steps done in the next epoch), "optimizer", "scheduler", "args" (the resolved settings), "history" (per epoch:
train loss/acc, val loss/acc), "running"}. It is replaced atomically at the end of every epoch (and every
`save_every` steps); a rerun with the same settings continues from it, bit for bit on the same device: the
data order of an epoch and the random numbers of a step (augmentation, stochastic depth) are seeded by
(seed, epoch) and (seed, epoch, step) alone, not by what ran before.
"""
import contextlib
import math
import os
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as tv  # after extract/_torchvision.py (package init)
from tqdm import tqdm

from .backbones import backbone_data_config, load_backbone
from .datasets import DATASETS, NO_FLIP, DataSettings, load_splits
from .run import NORMALIZE, _device

log = logging.getLogger(__name__)

FORMAT = "jei-dnn-finetune/1"
AUGMENTS = ("crop", "rrc", "none")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)   # timm's / torchvision's RandomResizedCrop defaults
# Settings that change how a run proceeds but not what it computes: free to differ when resuming.
RUNTIME_ONLY = ("out", "device", "num_workers", "save_every", "until_epoch", "overwrite", "progress")


@dataclass(frozen=True)
class FinetuneSettings:
    backbone: str
    dataset: str
    out: str
    weights: str | None = None          # checkpoint file or packaged name (None: random init, for tests)
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None         # None: the backbone's own input size
    normalize: str = "backbone"         # mean/std of the architecture's timm config, or of the dataset
    split_seed: int = 0
    limit: int | None = None            # first `limit` images of every split (quick runs)
    epochs: int = 60                    # Yuan et al.: 60; also the length of the cosine schedule
    batch_size: int = 64
    lr: float = 5e-4                    # the backbone's learning rate (Yuan et al.: 0.05 * 0.01)
    head_lr_mult: float = 100.0         # head lr = lr * head_lr_mult = 0.05
    min_lr: float = 2e-4                # where the cosine schedule ends, for both groups (Yuan et al.)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    drop_path: float = 0.1
    augment: str = "crop"
    seed: int = 0
    device: str | None = None           # None: cuda when available
    num_workers: int = 0
    save_every: int = 0                 # also checkpoint every N steps (0: at the end of every epoch only)
    until_epoch: int | None = None      # stop after this epoch in this invocation (time-limited jobs)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 0 or self.save_every < 0:
            raise ValueError("epochs and batch size must be >= 1, workers and save_every >= 0")
        if not (self.lr > 0 and self.head_lr_mult > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0
                and 0 <= self.drop_path < 1):
            raise ValueError(f"need lr > 0, head_lr_mult > 0, 0 <= momentum < 1, weight_decay >= 0 and "
                             f"0 <= drop_path < 1, got lr={self.lr}, head_lr_mult={self.head_lr_mult}, "
                             f"momentum={self.momentum}, weight_decay={self.weight_decay}, drop_path={self.drop_path}")
        if not 0 <= self.min_lr < self.lr:
            raise ValueError(f"min_lr must be in [0, lr) (the schedule only lowers the rates), got min_lr="
                             f"{self.min_lr} with lr={self.lr}")
        if self.until_epoch is not None and not 1 <= self.until_epoch <= self.epochs:
            raise ValueError(f"until_epoch must be in 1..{self.epochs}, got {self.until_epoch}")


# ---------------------------------------------------------------- seeding independent of history
def _seed(*parts: int) -> int:
    """A 64-bit seed from integers (numpy's SeedSequence: stable across versions and processes)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))


# ---------------------------------------------------------------- augmentation of a normalised batch
def pad_crop_flip(x: torch.Tensor, black: torch.Tensor, flip: bool) -> torch.Tensor:
    """Zero-pad (black, i.e. -mean/std after normalisation) by S // 8, crop S x S at random offsets, mirror half
    the images; one gather for the whole batch. Random numbers from the global CPU generator."""
    b, c, s, _ = x.shape
    p = s // 8
    padded = black.to(x).view(1, c, 1, 1).repeat(b, 1, s + 2 * p, s + 2 * p)
    padded[:, :, p:p + s, p:p + s] = x
    dy, dx = torch.randint(0, 2 * p + 1, (2, b))
    mirror = torch.rand(b) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    ar = torch.arange(s)
    rows = dy[:, None] + ar
    cols = dx[:, None] + torch.where(mirror[:, None], s - 1 - ar, ar)
    rows, cols = rows.to(x.device), cols.to(x.device)
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def random_resized_crop_flip(x: torch.Tensor, flip: bool, interpolation: str) -> torch.Tensor:
    """timm's training crop on every image of the batch: an area of 8-100% at aspect 3/4-4/3 resized back to S,
    then a mirror with probability 1/2 (torchvision's parameter sampling, global CPU generator)."""
    mode = tv.InterpolationMode(interpolation)
    s = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(len(x)):
        top, left, h, w = tv.RandomResizedCrop.get_params(x[i], RRC_SCALE, RRC_RATIO)
        out[i] = tv.functional.resized_crop(x[i], top, left, h, w, [s, s], interpolation=mode, antialias=True)
        if flip and torch.rand(()) < 0.5:
            out[i] = out[i].flip(-1)
    return out


# ---------------------------------------------------------------- model and optimiser
def _trainable_names(name: str, num_classes: int, create_kw: dict) -> set[str]:
    """Parameters the architecture itself trains: load_backbone freezes everything, so the flags come from a
    weightless copy built on the meta device (T2T-ViT keeps pos_embed and its performer projections fixed)."""
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=num_classes, **create_kw)
    return {k for k, p in reference.named_parameters() if p.requires_grad}


def _param_groups(model: torch.nn.Module, trainable: set[str], s: FinetuneSettings) -> list[dict]:
    """[backbone group (lr), head group (lr * head_lr_mult)]; the head is timm's get_classifier()."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)   # distilled DeiT: (head, head_dist)
    head_ids = {id(p) for h in heads for p in h.parameters()}
    backbone, head = [], []
    for k, p in model.named_parameters():
        p.requires_grad_(k in trainable)
        if p.requires_grad:
            (head if id(p) in head_ids else backbone).append(p)
    return [{"params": backbone, "lr": s.lr}, {"params": head, "lr": s.lr * s.head_lr_mult}]


def cosine(base_lr: float, min_lr: float, total_steps: int):
    """Multiplier of `base_lr` after t steps: the rate follows half a cosine from base_lr to min_lr."""
    def factor(t: int) -> float:
        progress = min(t, total_steps) / total_steps
        return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr
    return factor


# ---------------------------------------------------------------- checkpoint
def _save_atomic(obj: dict, out: Path) -> None:
    """Write next to `out`, flush to disk, then rename over it: a kill leaves the old file or the new, whole."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def read_finetune_checkpoint(path: Path) -> dict:
    """The whole checkpoint written by run_finetune (weights, optimizer, scheduler, args, history)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file gets the same one-line answer)
        raise ValueError(f"{path} exists but cannot be read ({type(err).__name__}); pass --overwrite to "
                         "restart") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} exists and is not a finetune checkpoint; pass --overwrite to replace it")
    return ckpt


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- the run
def prepare(s: FinetuneSettings):
    """Model (unfrozen, in train mode), splits and the resolved settings that identify the run."""
    create_kw = {"drop_path_rate": s.drop_path}
    # The architecture's timm config, not a packaged file's (no weights here): that is what `extract --weights
    # CKPT` reads for a checkpoint file, and fine-tuning must see the normalisation extraction will use.
    cfg = backbone_data_config(s.backbone, img_size=s.img_size, **create_kw)
    splits = load_splits(DataSettings.for_backbone(s.dataset, cfg, s.normalize, data_dir=s.data_dir,
                                                   split_seed=s.split_seed, limit=s.limit, download=s.download))
    torch.manual_seed(s.seed)   # the new head's (and a random backbone's) initialisation
    backbone = load_backbone(s.backbone, s.weights, num_classes=splits.num_classes, img_size=s.img_size,
                             **create_kw)
    if len(splits.train) < s.batch_size:
        raise ValueError(f"the train split has {len(splits.train)} images, fewer than one batch of {s.batch_size}")
    model = backbone.model.train()
    groups = _param_groups(model, _trainable_names(s.backbone, splits.num_classes, create_kw), s)
    args = {k: v for k, v in asdict(s).items() if k not in RUNTIME_ONLY}
    args.update(img_size=backbone.img_size, num_classes=splits.num_classes, mean=list(splits.train.settings.mean),
                std=list(splits.train.settings.std), interpolation=splits.train.settings.interpolation,
                weights_sha256=backbone.weights_info.get("sha256"), split_hash=splits.describe()["split_hash"])
    return model, groups, splits, args


def evaluate(model, split, batch_size: int, device, autocast, num_workers: int = 0) -> dict:
    """Mean loss and accuracy of `model` (eval mode) on a whole split."""
    model.eval()
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    loss, correct = 0.0, 0
    with torch.no_grad(), autocast:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return {"loss": loss / len(split), "acc": correct / len(split)}


def train_step(model, optimizer, scheduler, x, y, autocast) -> tuple[float, int]:
    with autocast:
        logits = model(x).float()
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item(), int((logits.argmax(1) == y).sum())


def _fresh_progress() -> dict:
    """Where a run stands: epochs done, steps done in the next epoch, per-epoch records, the partial epoch's
    sums (so a resumed epoch reports the same train loss and accuracy)."""
    return {"epoch": 0, "step": 0, "history": [], "running": {"loss_sum": 0.0, "correct": 0, "seen": 0}}


def _resume(out: Path, args: dict, model, optimizer, scheduler) -> dict:
    ckpt = read_finetune_checkpoint(out)
    if diffs := _differences(ckpt["args"], args):
        raise ValueError(f"{out} was fine-tuned with other settings ({'; '.join(diffs)}); pass --overwrite to "
                         "restart")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return {k: ckpt[k] for k in _fresh_progress()}


def make_augment(kind: str, mean, std, flip: bool, interpolation: str):
    """The batch transform of `kind` (see AUGMENTS) for images normalised with mean/std."""
    if kind == "crop":
        # a zero (black) pixel after normalisation: what the padding adds, as in torchvision's RandomCrop
        black = torch.broadcast_to(-torch.tensor(mean) / torch.tensor(std), (3,))
        return lambda x: pad_crop_flip(x, black, flip)
    if kind == "rrc":
        return lambda x: random_resized_crop_flip(x, flip, interpolation)
    return lambda x: x


def _train_epoch(model, optimizer, scheduler, train, progress: dict, s: FinetuneSettings, steps_per_epoch: int,
                 device, autocast, augment, save) -> None:
    """Runs the remaining steps of epoch progress["epoch"], updating `progress`; save() every s.save_every."""
    epoch = progress["epoch"]
    order = epoch_order(len(train), s.seed, epoch)[progress["step"] * s.batch_size:steps_per_epoch * s.batch_size]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train, order.tolist()), batch_size=s.batch_size,
                                         num_workers=s.num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(loader, desc=f"finetune epoch {epoch + 1}/{s.epochs}", initial=progress["step"],
               total=steps_per_epoch, disable=not s.progress, dynamic_ncols=True, file=sys.stderr)
    for x, y in bar:
        torch.manual_seed(_seed(s.seed, epoch, progress["step"]))   # augmentation and stochastic depth
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, correct = train_step(model, optimizer, scheduler, augment(x), y, autocast)
        if not math.isfinite(loss):
            raise ValueError(f"the loss became {loss} at epoch {epoch + 1}, step {progress['step'] + 1}; lower "
                             "--lr (the checkpoint keeps the last good state)")
        r = progress["running"]
        progress["running"] = r = {"loss_sum": r["loss_sum"] + loss * len(y), "correct": r["correct"] + correct,
                                   "seen": r["seen"] + len(y)}
        progress["step"] += 1
        bar.set_postfix(loss=f"{r['loss_sum'] / r['seen']:.3f}", acc=f"{r['correct'] / r['seen']:.3f}")
        if s.save_every and progress["step"] % s.save_every == 0 and progress["step"] < steps_per_epoch:
            save()
    bar.close()


def run_finetune(s: FinetuneSettings) -> Path:
    """Fine-tunes (or resumes fine-tuning) the backbone of `s` on its dataset; returns the checkpoint path."""
    device = _device(s.device)
    out = Path(s.out)
    model, groups, splits, args = prepare(s)
    model.to(device)
    steps_per_epoch = len(splits.train) // s.batch_size   # full batches only: BatchNorm needs more than one image
    optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [cosine(g["lr"], s.min_lr, s.epochs * steps_per_epoch) for g in optimizer.param_groups])
    progress = _fresh_progress()
    if out.exists() and not s.overwrite:
        progress = _resume(out, args, model, optimizer, scheduler)
        if progress["epoch"] >= s.epochs:
            log.info(f"{out} is already complete ({s.epochs} epochs): nothing to do")
            return out
        log.info(f"resuming {out} at epoch {progress['epoch'] + 1}, step {progress['step']}")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        _save_atomic({"format": FORMAT, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "args": args, **progress}, out)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                if device.type == "cuda" else contextlib.nullcontext())
    augment = make_augment(s.augment, args["mean"], args["std"], s.dataset not in NO_FLIP, args["interpolation"])
    while progress["epoch"] < (s.until_epoch or s.epochs):
        started = time.perf_counter()
        _train_epoch(model, optimizer, scheduler, splits.train, progress, s, steps_per_epoch, device, autocast,
                     augment, save)
        val = evaluate(model, splits.val, s.batch_size, device, autocast, s.num_workers)
        r, epoch = progress["running"], progress["epoch"] + 1
        progress["history"].append({
            "epoch": epoch, "train_loss": r["loss_sum"] / r["seen"], "train_acc": r["correct"] / r["seen"],
            "val_loss": val["loss"], "val_acc": val["acc"], "lr_backbone": optimizer.param_groups[0]["lr"],
            "lr_head": optimizer.param_groups[1]["lr"], "seconds": time.perf_counter() - started})
        if s.progress:
            h = progress["history"][-1]
            log.info(f"epoch {epoch}/{s.epochs}: train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f} | "
                     f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}")
        progress.update(_fresh_progress(), epoch=epoch, history=progress["history"])
        save()
    return out
