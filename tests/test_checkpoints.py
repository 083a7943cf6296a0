"""read_checkpoint / adapt_state_dict: which weights are picked, the allowed pickled types, every error path."""
import argparse
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import extract  # noqa: F401  (before timm)
from extract.checkpoints import CheckpointError, adapt_state_dict, read_checkpoint
from extract.t2t_vit import T2TViT

OFFICIAL = Path(__file__).parent / "fixtures" / "t2t_reference" / "tiny_t2t.pth.tar"
TINY = dict(num_classes=10, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16)


def _weights(value=0.0):
    return {"a.weight": torch.full((2, 3), value), "a.bias": torch.zeros(2)}


def test_official_file_prefers_the_ema_weights():
    with torch.serialization.safe_globals([argparse.Namespace]):
        full = torch.load(OFFICIAL, weights_only=True)
    assert isinstance(full["args"], argparse.Namespace)  # the official layout pickles the training args
    state = read_checkpoint(OFFICIAL)
    assert state.keys() == full["state_dict_ema"].keys()
    assert all(torch.equal(state[k], full["state_dict_ema"][k]) for k in state)
    assert not torch.equal(state["head.weight"], full["state_dict"]["head.weight"])
    # Reading must not widen torch's global allowlist.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("layout, expected", [
    ({"state_dict_ema": _weights(1), "state_dict": _weights(2), "model": _weights(3)}, 1),
    ({"state_dict": _weights(2), "model": _weights(3), "epoch": 4}, 2),
    ({"model": _weights(3), "epoch": 4}, 3),
    (_weights(5), 5),
])
def test_state_dict_priority(tmp_path, layout, expected):
    path = tmp_path / "w.pth"
    torch.save(layout, path)
    assert read_checkpoint(path)["a.weight"][0, 0] == expected


def test_module_prefix_is_stripped_and_legacy_format_read(tmp_path):
    path = tmp_path / "ddp.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in _weights(1).items()}}, path,
               _use_new_zipfile_serialization=False)
    assert sorted(read_checkpoint(path)) == ["a.bias", "a.weight"]


def test_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(7), str(path))
    assert read_checkpoint(path)["a.weight"][0, 0] == 7


def _truncated(tmp_path):
    data = OFFICIAL.read_bytes()
    path = tmp_path / "cut.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_legacy(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(_weights(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _text(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    return path


def _foreign_zip(tmp_path):
    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path


def _pickled_module(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    return path


def _pickled_numpy(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"state_dict": _weights(), "stats": np.zeros(3)}, path)
    return path


class _RunsACommand:
    def __reduce__(self):
        return os.system, ("echo unpickled",)


def _protocol5_payload(tmp_path):
    path = tmp_path / "p5.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _RunsACommand()}, f, protocol=5)
    return path


def _no_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"epoch": 3, "state_dict": [1, 2]}, path)
    return path


def _bad_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent.pth", "checkpoint not found"),
    (_truncated, "truncated checkpoint"),
    (_truncated_legacy, "truncated checkpoint"),
    (_text, "not a PyTorch checkpoint"),
    (_foreign_zip, "not a PyTorch checkpoint"),
    (_pickled_module, "refusing to unpickle torch.nn.modules.linear.Linear"),
    (_pickled_numpy, "refusing to unpickle numpy"),
    (_protocol5_payload, "refusing to unpickle a pickle that asks for more than data"),
    (_no_state_dict, "no state dict found"),
    (_bad_safetensors, "not a readable safetensors file"),
])
def test_errors_are_one_clear_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)


def test_adapt_interpolates_pos_embed_and_drops_a_foreign_head():
    state = read_checkpoint(OFFICIAL)  # made for 64 px (4 x 4 tokens) and 10 classes
    model = T2TViT(**{**TINY, "img_size": 96, "num_classes": 7})
    adapted, head_dropped = adapt_state_dict(model, state)
    assert head_dropped and "head.weight" not in adapted and "head.bias" not in adapted
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    # What the official transfer-learning code does: CLS entry kept, the 4x4 grid resized bicubically to 6x6.
    old = state["pos_embed"]
    grid = F.interpolate(old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic")
    expected = torch.cat([old[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
    torch.testing.assert_close(model.pos_embed.data, expected)
    assert adapted is not state and state["pos_embed"].shape == (1, 17, 48)  # the input is left alone


def test_adapt_keeps_a_matching_head():
    state = read_checkpoint(OFFICIAL)
    adapted, head_dropped = adapt_state_dict(T2TViT(**{**TINY, "img_size": 64}), state)
    assert not head_dropped
    assert adapted.keys() == state.keys()


def test_adapt_a_headless_checkpoint_leaves_the_model_its_fresh_head():
    state = {k: v for k, v in read_checkpoint(OFFICIAL).items() if not k.startswith("head.")}
    model = T2TViT(**{**TINY, "img_size": 64})
    adapted, head_dropped = adapt_state_dict(model, state)
    assert head_dropped and adapted.keys() == state.keys()
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
