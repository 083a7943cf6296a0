"""T2T-ViT: registry, published sizes, official names/shapes, and outputs equal to the official code's.

The reference outputs in tests/fixtures/t2t_reference were recorded once from the official implementation
(yitu-opensource/T2T-ViT, see the README there); nothing here compares the project with itself.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import extract  # noqa: F401  (before timm; registers the T2T-ViT family)
import timm
from extract.backbones import load_backbone
from extract.checkpoints import read_checkpoint
from extract.t2t_vit import T2TViT

FIXTURES = Path(__file__).parent / "fixtures" / "t2t_reference"
CHECKPOINT = FIXTURES / "tiny_t2t.pth.tar"
# The tiny configuration the reference checkpoint was made with (see the fixture README).
TINY = dict(img_size=64, num_classes=10, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16)
# Table 1 of Yuan et al. 2021, millions of parameters (1000 classes, 224 px).
PUBLISHED_PARAMS = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5,
                    "t2t_vit_19": 39.2, "t2t_vit_24": 64.1}


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "tiny_t2t_outputs.pt", weights_only=True)


def _tiny_model(**overrides) -> T2TViT:
    model = T2TViT(**{**TINY, **overrides}).eval()
    model.load_state_dict(read_checkpoint(CHECKPOINT), strict=True)
    return model


def test_importing_extract_registers_the_family():
    # A fresh interpreter: nothing but `import extract` may be needed before timm.create_model("t2t_vit_*").
    code = f"import extract, timm; print(all(timm.is_model(n) for n in {sorted(PUBLISHED_PARAMS)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(millions, 1) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_14"])
def test_names_and_shapes_match_the_official_code(name):
    official = json.loads((FIXTURES / "official_state_dict_shapes.json").read_text())[name]
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in timm.create_model(name).state_dict().items()}
    assert ours == official


def test_create_model_with_classes_and_size():
    model = timm.create_model("t2t_vit_7", num_classes=100, img_size=32).eval()
    assert model.pos_embed.shape == (1, 1 + 2 * 2, 256)
    assert model.head.out_features == 100
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert model.attn_scale == 256 ** -0.5  # the released weights' scale is the default
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_pretrained_cfg_is_in_timms_registry():
    # Built through timm's build_model_with_cfg from registered default cfgs, like timm's own models: the
    # config is known by name (timm.data can resolve it without building the model) and is the model's own.
    cfg = timm.models.get_pretrained_cfg("t2t_vit_14")
    assert (cfg.architecture, cfg.input_size, cfg.crop_pct, cfg.interpolation) == ("t2t_vit_14", (3, 224, 224),
                                                                                   0.9, "bicubic")
    assert (cfg.mean, cfg.std, cfg.classifier) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "head")
    assert not cfg.has_weights  # nothing to download: official weights come in through load_backbone(weights=...)
    with torch.device("meta"):
        model = timm.create_model("t2t_vit_14")
    assert model.pretrained_cfg == cfg.to_dict()
    with pytest.raises(ValueError, match="no download"):
        timm.create_model("t2t_vit_7", pretrained=True)


def test_outputs_equal_the_official_implementation(reference):
    model = _tiny_model()
    block_cls = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, out: block_cls.append(out[:, 0]))
    with torch.no_grad():
        logits = model(reference["input"])
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(block_cls, 1), reference["block_cls"], atol=1e-5, rtol=0)


def test_attention_scale_is_a_model_argument(reference):
    head_dim_scale = _tiny_model(attn_scale=(TINY["embed_dim"] // TINY["num_heads"]) ** -0.5)
    with torch.no_grad():
        logits = head_dim_scale(reference["input"])
    torch.testing.assert_close(logits, reference["logits_head_dim_scale"], atol=1e-5, rtol=0)
    # The two scales give measurably different outputs, so the test above can tell them apart.
    assert (reference["logits"] - reference["logits_head_dim_scale"]).abs().max() > 1e-3


def test_official_checkpoint_through_load_backbone(reference):
    tiny = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
    backbone = load_backbone("t2t_vit_7", weights=CHECKPOINT, num_classes=10, img_size=64, **tiny)
    assert backbone.head_is_task_head
    with torch.no_grad():
        reps, logits = backbone(reference["input"])
        expected_reps = backbone.model.norm(reference["block_cls"])
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
    for l, rep in enumerate(reps):
        torch.testing.assert_close(rep, expected_reps[:, l], atol=1e-5, rtol=0)


def test_frozen_tensors_and_gradients():
    model = T2TViT(**{**TINY, "img_size": 32, "drop_path_rate": 0.1}).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # The sinusoid and the Performer projections are fixed, but saved: they are in the official state dict.
    assert frozen == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert frozen <= set(model.state_dict())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("img_size", [0, 40])
def test_image_size_must_be_a_multiple_of_16(img_size):
    with pytest.raises(ValueError, match="multiple of 16"):
        T2TViT(**{**TINY, "img_size": img_size})


def test_forward_intermediates_cls_tokens_equal_the_official_implementation(reference):
    model = _tiny_model()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(reference["input"], return_prefix_tokens=True,
                                                           output_fmt="NLC")
        features = model.forward_features(reference["input"])
    assert len(intermediates) == TINY["depth"]
    block_cls = torch.stack([prefix[:, 0] for _, prefix in intermediates], 1)
    torch.testing.assert_close(block_cls, reference["block_cls"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.forward_head(final), reference["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(final, features, atol=0, rtol=0)
    for spatial, _ in intermediates:
        assert spatial.shape == (2, (64 // 16) ** 2, TINY["embed_dim"])


def test_forward_intermediates_arguments_as_timms_vit(reference):
    model, x = _tiny_model(), reference["input"]
    with torch.no_grad():
        grids = model.forward_intermediates(x, intermediates_only=True)                   # NCHW, every block
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        last = model.forward_intermediates(x, indices=1, stop_early=True, output_fmt="NLC", intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        as_dict = model.forward_intermediates(x, indices=[0], output_dict=True, return_prefix_tokens=True)
    side = 64 // 16
    assert [g.shape for g in grids] == [(2, TINY["embed_dim"], side, side)] * TINY["depth"]
    for g, t in zip(grids, tokens):  # the grid is the token sequence in row-major order
        torch.testing.assert_close(g.flatten(2).transpose(1, 2), t, atol=0, rtol=0)
    (spatial, prefix), = normed
    torch.testing.assert_close(model.norm(reference["block_cls"][:, -1]), prefix[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.norm(tokens[-1]), spatial, atol=1e-6, rtol=0)
    torch.testing.assert_close(last[0], tokens[-1], atol=0, rtol=0)
    torch.testing.assert_close(first[0], grids[0], atol=0, rtol=0)
    assert set(as_dict) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    torch.testing.assert_close(as_dict["image_intermediates_prefix"][0][:, 0], reference["block_cls"][:, 0],
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_and_features_only(reference):
    model = _tiny_model()
    with torch.no_grad():
        expected = model.forward_intermediates(reference["input"], indices=[0], intermediates_only=True)
    assert model.prune_intermediate_layers([0]) == [0]
    assert len(model.blocks) == 1 and isinstance(model.head, torch.nn.Identity)
    # timm's feature extraction wrapper goes through forward_intermediates and prune_intermediate_layers
    features = timm.create_model("t2t_vit_7", features_only=True, out_indices=(1, 3), img_size=32)
    assert len(features.model.blocks) == 4 and features.feature_info.channels() == [256, 256]
    assert features.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 32, 32))
        pruned = model.forward_intermediates(reference["input"], intermediates_only=True)
    assert [m.shape for m in maps] == [(1, 256, 2, 2)] * 2
    torch.testing.assert_close(pruned[0], expected[0], atol=0, rtol=0)
