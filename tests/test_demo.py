"""The demo's data check, and the gate class-weight cap it relies on."""
import click
import pytest
import torch

from heads import demo
from heads.engine import pos_weight_from_counts
from heads.train import TrainSettings


def test_missing_fashion_mnist_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)   # no apt-get: we may not install
    with pytest.raises(click.ClickException, match="apt-get install dataset-fashion-mnist"):
        demo.ensure_fashion_mnist(tmp_path)


def test_present_fashion_mnist_is_left_alone(tmp_path, monkeypatch):
    for name in demo.FASHION_MNIST_FILES:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("must not install"))
    demo.ensure_fashion_mnist(tmp_path)


def test_gate_weight_cap_bounds_the_class_weights():
    # 1 positive in 100 at gate 1, 99 in 100 at gate 2, none at gate 3: ratios 99, 1/99 and 200 before the cap
    positives = torch.tensor([[1.0, 99.0, 0.0]])
    for cap, expected in [(2.0, [2.0, 0.5, 2.0]), (100.0, [99.0, 1 / 99, 100.0]), (1.0, [1.0, 1.0, 1.0])]:
        w = pos_weight_from_counts(positives, 100, cap)
        assert torch.allclose(w, torch.tensor([expected]), rtol=1e-5), (cap, w)
    with pytest.raises(ValueError, match="gate_weight_cap"):
        TrainSettings(gate_weight_cap=0.5)
