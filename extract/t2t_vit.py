"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT", ICCV 2021), registered with timm's model registry.

    import extract, timm
    model = timm.create_model("t2t_vit_14", num_classes=100, img_size=224)
    final, per_block = model.forward_intermediates(images)   # as timm's VisionTransformer.forward_intermediates

A re-implementation of the Performer variant of the official yitu-opensource/T2T-ViT models: parameter names,
shapes and the order of floating-point operations follow the official code, so that the released `.pth.tar`
checkpoints load with strict key matching and give the same outputs (tests/test_t2t_vit.py checks this against
outputs recorded from the official code). Only the Performer tokens-to-token module is provided (t2t_vit_7 ... 24);
the `t2t_vit_t_*` transformer-T2T variants are not.

Attention scale: the official `Attention` uses `qk_scale or head_dim ** -0.5`, but the official factories set
`qk_scale = embed_dim ** -0.5` whenever `pretrained=True`, and the released ImageNet weights were trained that way.
Here the scale is the `attn_scale` argument and defaults to `embed_dim ** -0.5` so the released weights are right
out of the box; pass `attn_scale=head_dim ** -0.5` to reproduce a model trained from scratch with the official code.
"""
import math

import numpy as np
import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ["T2TViT", "sinusoid_position_table"]


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sinusoidal table of "Attention is all you need", shape (1, num_positions, dim), float32.

    Computed in float64 and rounded once, as the official numpy code does, so tables match to the last bit.
    """
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    rate = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)
    angle = position / rate
    angle[:, 0::2] = np.sin(angle[:, 0::2])
    angle[:, 1::2] = np.cos(angle[:, 1::2])
    return torch.from_numpy(angle).float().unsqueeze(0)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with dropout after each linear (names fc1/fc2 as in the official code)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with an explicit scale (see the module docstring) and no qkv bias by default."""

    def __init__(self, dim: int, num_heads: int, scale: float, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # Explicit product rather than F.scaled_dot_product_attention: same op order as the official model,
        # so outputs match it bit for bit on CPU, and the Mul-Add counter sees both attention products.
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, scale: float, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, scale, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TokenPerformer(nn.Module):
    """One tokens-to-token re-structurisation step: single-head Performer attention (positive random features)
    from `dim` input channels to `emb` output channels, with v as the skip connection, then an MLP.

    The random projection `w` (m x emb, orthogonal rows scaled by sqrt(m)) is a frozen nn.Parameter, as in the
    official code, so it is part of the state dict and a checkpoint fixes it.
    """

    def __init__(self, dim: int, emb: int, kernel_ratio: float = 0.5, drop: float = 0.1):
        super().__init__()
        self.emb = emb
        self.kqv = nn.Linear(dim, 3 * emb)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(emb)
        self.epsilon = 1e-8  # keeps the normaliser of the linearised attention away from zero
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(drop))
        self.m = int(emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x):
        # phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel (Performer).
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, self.m) / 2
        wx = torch.einsum("bti,mi->btm", x.float(), self.w)
        return torch.exp(wx - half_sq_norm) / math.sqrt(self.m)

    def attend(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)                      # (B, T, m)
        denom = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)          # (B, T, 1)
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)                              # (B, emb, m)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (denom.repeat(1, 1, self.emb) + self.epsilon)
        return v + self.dp(self.proj(y))  # the token width changes here, so v (not x) is the skip connection

    def forward(self, x):
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Tokens-to-token stem: unfold 7x7/4 -> Performer -> fold to a grid, unfold 3x3/2 -> Performer -> fold,
    unfold 3x3/2 -> linear projection to embed_dim. Overall stride 16: a 224 px image gives 14 x 14 tokens."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, token_dim: int = 64):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
        self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.attention1 = TokenPerformer(dim=in_chans * 7 * 7, emb=token_dim)
        self.attention2 = TokenPerformer(dim=token_dim * 3 * 3, emb=token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.num_patches = (img_size // 16) ** 2

    @staticmethod
    def _to_grid(x):
        B, T, C = x.shape
        side = math.isqrt(T)
        return x.transpose(1, 2).reshape(B, C, side, side)

    def forward(self, x):
        x = self.soft_split0(x).transpose(1, 2)
        x = self.soft_split1(self._to_grid(self.attention1(x))).transpose(1, 2)
        x = self.soft_split2(self._to_grid(self.attention2(x))).transpose(1, 2)
        return self.project(x)


class T2TViT(nn.Module):
    """T2T-ViT with the Performer tokens-to-token stem, a CLS token and a fixed sinusoidal position embedding.

    Args:
        attn_scale: attention logit scale; None means embed_dim ** -0.5, the value the released ImageNet
            checkpoints were trained with (the official code's `qk_scale` when `pretrained=True`).
        Others as in timm's VisionTransformer. img_size must be a multiple of 16.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 attn_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, token_dim: int = 64):
        super().__init__()
        if img_size <= 0 or img_size % 16:
            raise ValueError(f"T2T-ViT needs an image size that is a positive multiple of 16, got {img_size}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the CLS token
        self.img_size = img_size
        self.attn_scale = embed_dim ** -0.5 if attn_scale is None else attn_scale
        self.tokens_to_token = T2TModule(img_size, in_chans, embed_dim, token_dim)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A parameter (not a buffer) that is never trained: this keeps `pos_embed` in the official state dict.
        self.pos_embed = nn.Parameter(sinusoid_position_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Stochastic depth grows with depth (on the CPU, so that models can also be built on the meta device).
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, self.attn_scale, qkv_bias, drop_rate, attn_drop_rate, dp)
            for dp in drop_path])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=16) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_embed(self, x):
        """Tokens entering the first block: T2T tokens, the CLS token in front, the position embedding added."""
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x):
        """All tokens after the final norm, (B, 1 + num_patches, embed_dim)."""
        x = self.forward_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False):
        """Block outputs as timm's VisionTransformer.forward_intermediates gives them (same arguments, same results).

        indices: the last n blocks if an int, all if None, those listed otherwise (negative from the end).
        norm: apply the final norm to each intermediate. output_fmt: "NCHW" (the square token grid, img_size / 16
        a side) or "NLC". Intermediates exclude the CLS token; return_prefix_tokens pairs each with its CLS token
        (B, 1, D). stop_early: stop after the last block asked for. Returns (final normed tokens, intermediates),
        the intermediates alone (intermediates_only), or a dict with 'image_intermediates',
        'image_intermediates_prefix' (with return_prefix_tokens) and 'image_features' (unless intermediates_only).
        timm's attention-mask arguments are not offered: T2T-ViT's attention takes no mask.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.forward_embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            B, T, _ = x.shape
            side = math.isqrt(T - self.num_prefix_tokens)  # the T2T stem's square grid
            intermediates = [y.reshape(B, side, side, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head if asked); as timm's ViT."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x, pre_logits: bool = False):
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = "", **kwargs) -> dict:
    """timm-style pretrained config: ImageNet normalisation and the official evaluation crop (0.9, bicubic).

    No url: nothing is downloaded; the released `.pth.tar` files are loaded with
    extract.load_backbone(weights=...). Not `fixed_input_size`: img_size is a model argument (a multiple of 16).
    """
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "tokens_to_token.soft_split0", "classifier": "head", **kwargs,
    }


# Published configurations (Table 1 of Yuan et al. 2021). kwargs may override any of them, e.g. for tiny test models.
_CONFIGS = {
    "t2t_vit_7": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
}

# Read by timm's register_model (it looks up `default_cfgs` in the entry point's module), so it must come first.
default_cfgs = generate_default_cfgs({name: _cfg() for name in _CONFIGS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    if pretrained:
        raise ValueError(f"{variant}: no download; load the official .pth.tar with extract.load_backbone(weights=...)")
    out_indices = kwargs.pop("out_indices", 3)  # features_only=True: the last 3 blocks, as for timm's ViTs
    return build_model_with_cfg(T2TViT, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **{**_CONFIGS[variant], **kwargs})


@register_model
def t2t_vit_7(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_7", pretrained, **kwargs)


@register_model
def t2t_vit_10(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_10", pretrained, **kwargs)


@register_model
def t2t_vit_12(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_12", pretrained, **kwargs)


@register_model
def t2t_vit_14(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_14", pretrained, **kwargs)


@register_model
def t2t_vit_19(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_19", pretrained, **kwargs)


@register_model
def t2t_vit_24(pretrained=False, **kwargs) -> T2TViT:
    return _create("t2t_vit_24", pretrained, **kwargs)
