"""Read weight files safely and fit them to a model.

`read_checkpoint` turns an official T2T-ViT `.pth.tar`, a timm/PyTorch `.pth`/`.bin` or a `.safetensors` file into
a flat state dict. Pickled files are read with `torch.load(weights_only=True)`: the official T2T-ViT files also
pickle the training script's `argparse.Namespace`, so exactly that one type is allowed in addition to tensors and
plain containers; anything else (a pickled model, a numpy array, a custom class) is refused, never executed.

`adapt_state_dict` fits a state dict to a model built for another image size or class count.
"""
import argparse
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

__all__ = ["CheckpointError", "read_checkpoint", "adapt_state_dict"]

# Where a training script keeps the weights, best first: timm's EMA copy is what the T2T-ViT authors evaluate.
STATE_DICT_KEYS = ("state_dict_ema", "state_dict", "model")
_ZIP_MAGIC = b"PK\x03\x04"    # torch.save's default (zip) format
_PICKLE_PROTO = 0x80          # first byte of torch.save's legacy format (a pickle, protocol >= 2)


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and the problem in one line."""


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The model weights in `path`: state_dict_ema > state_dict > model > a bare state dict; `module.` stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickled(path)
    state_dict = _pick_state_dict(obj, path)
    # DataParallel/DDP wrappers prefix every key with `module.`; the bare model has none.
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _read_safetensors(path: Path) -> dict:
    try:
        return load_safetensors(str(path), device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _read_pickled(path: Path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        # A zip whose central directory (at the end of the file) is missing: the file was cut short.
        raise CheckpointError(f"{path}: truncated checkpoint (incomplete download or copy?)")
    if not magic.startswith(_ZIP_MAGIC) and (not magic or magic[0] != _PICKLE_PROTO):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected a torch.save zip or pickle file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to load with weights_only=False: never pass that on
        unsupported = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"(Unsupported operand \d+)", str(err))
        if unsupported:
            what = unsupported.group(1)
            if what.startswith("Unsupported"):
                what = f"a pickle that asks for more than data ({what})"
            raise CheckpointError(f"{path}: refusing to unpickle {what}; only tensors, plain containers and "
                                  "argparse.Namespace are allowed (weights_only)") from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (the pickle cannot be read)") from None
    except RuntimeError as err:
        if magic.startswith(_ZIP_MAGIC):  # a complete zip archive, but not one written by torch.save
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
        raise CheckpointError(f"{path}: truncated checkpoint ({_first_line(err)})") from None
    except (EOFError, IndexError, struct.error):  # what the legacy (non-zip) reader raises on a short file
        raise CheckpointError(f"{path}: truncated checkpoint (the pickle ends early)") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _pick_state_dict(obj, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        if _is_state_dict(obj):
            return obj
    raise CheckpointError(f"{path}: no state dict found (looked for {', '.join(STATE_DICT_KEYS)} or a bare "
                          "name -> tensor mapping)")


def adapt_state_dict(model: torch.nn.Module, state_dict: dict) -> tuple[dict, bool]:
    """Fit `state_dict` to `model`: resize `pos_embed` to the model's token grid and drop a head of another shape.

    Returns (state dict, head_dropped). When head_dropped, the state dict lacks the classifier's keys
    (`head.weight`/`head.bias`, or timm's `classifier.*`/`fc.*`) and the model keeps its freshly initialised head:
    load with strict=False and check that only those keys are missing.

    Position embedding: interpolated, never regenerated. T2T-ViT's table is a fixed 1-D sinusoid over the
    flattened token index, so regenerating it at a new grid would change which index sits one row below a token
    (row stride 14 at 224 px, 24 at 384 px) under blocks that learned the old layout; bicubic interpolation of
    the 2-D grid keeps the geometry, and is what the official transfer-learning code (and the JEI-DNN authors'
    copy of it) does, so features match models fine-tuned that way.
    """
    state_dict = dict(state_dict)
    target = getattr(model, "pos_embed", None)
    if "pos_embed" in state_dict and target is not None and state_dict["pos_embed"].shape != target.shape:
        state_dict["pos_embed"] = _resize_pos_embed(state_dict["pos_embed"], target.shape, _num_prefix(model))
    ours = model.state_dict()
    theirs = [k for k in state_dict if _is_head_key(model, k)]
    # the checkpoint's head fits only if it has exactly the model's head keys, of the model's shapes (a checkpoint
    # without a head does not fit: the model keeps a fresh one)
    head_dropped = (any(k not in ours or ours[k].shape != state_dict[k].shape for k in theirs)
                    or any(k not in state_dict for k in head_keys(model)))
    if head_dropped:
        for key in theirs:
            del state_dict[key]
    return state_dict, head_dropped


def head_keys(model) -> set[str]:
    """The model's own classifier keys in its state dict (see _is_head_key)."""
    return {k for k in model.state_dict() if _is_head_key(model, k)}


def _is_head_key(model, key: str) -> bool:
    """Whether `key` belongs to the classifier: `head` for ViTs, timm's pretrained_cfg names it for other models
    (`classifier` for EfficientNet, `fc` for ResNet)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return any(key == n or key.startswith(n + ".") for n in names)


def _num_prefix(model) -> int:
    """Entries of pos_embed that belong to prefix tokens (CLS, ...) rather than to the patch grid."""
    if getattr(model, "no_embed_class", False):  # timm ViTs that add no position to the prefix tokens
        return 0
    return getattr(model, "num_prefix_tokens", 1)


def _resize_pos_embed(posemb: torch.Tensor, shape, num_prefix: int) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + G*G, D): bicubic on the square grid, prefix entries kept."""
    old_grid, new_grid = posemb.shape[1] - num_prefix, shape[1] - num_prefix
    old_side, new_side = round(old_grid ** 0.5), round(new_grid ** 0.5)
    if old_side ** 2 != old_grid or new_side ** 2 != new_grid or posemb.shape[2] != shape[2]:
        raise CheckpointError(f"cannot resize pos_embed {tuple(posemb.shape)} to {tuple(shape)}: "
                              "not a square token grid of the same width")
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid, -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
