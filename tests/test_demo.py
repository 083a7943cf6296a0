"""The demo's data check, and the gate class-weight cap it relies on."""
import click
import pytest
import torch

from heads import demo
from heads.train import TrainSettings, gate_pos_weight


def test_missing_fashion_mnist_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)   # no apt-get: we may not install
    with pytest.raises(click.ClickException, match="apt-get install dataset-fashion-mnist"):
        demo.ensure_fashion_mnist(tmp_path)


def test_present_fashion_mnist_is_left_alone(tmp_path, monkeypatch):
    for name in demo.FASHION_MNIST_FILES:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("must not install"))
    demo.ensure_fashion_mnist(tmp_path)


def test_gate_weight_cap_bounds_the_class_weights(monkeypatch):
    import heads.train as train
    # 1 positive in 100 at gate 1, 99 in 100 at gate 2: ratios 99 and 1/99 before the cap
    targets = torch.zeros(1, 100, 2)
    targets[0, 0, 0] = 1
    targets[0, 1:, 1] = 1
    monkeypatch.setattr(train, "_chunk_outputs", lambda heads, split: [(None, None, None)])
    monkeypatch.setattr(train, "exit_cross_entropy", lambda logits, labels: None)
    monkeypatch.setattr(train, "exit_costs", lambda ce, lam, ic: None)
    monkeypatch.setattr(train, "gate_targets", lambda costs, rule: targets)
    split = type("S", (), {"__len__": lambda self: 100})()
    for cap, expected in [(2.0, [2.0, 0.5]), (100.0, [99.0, 1 / 99]), (1.0, [1.0, 1.0])]:
        w = gate_pos_weight(None, split, None, None, "subsequent", cap)
        assert torch.allclose(w, torch.tensor([expected]), rtol=1e-5), (cap, w)
    with pytest.raises(ValueError, match="gate_weight_cap"):
        TrainSettings(gate_weight_cap=0.5)
