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


def test_demo_checks_its_options_before_extracting_and_passes_overwrite_on(monkeypatch):
    from click.testing import CliRunner

    from extract import run as extract_run
    from pipeline import cli
    calls = []
    monkeypatch.setattr(demo, "ensure_fashion_mnist", lambda: None)
    monkeypatch.setattr(extract_run, "run_extraction", lambda s: calls.append(s) or pytest.fail("extracted"))
    res = CliRunner().invoke(cli, ["demo", "--lambdas", "abc"])
    assert res.exit_code == 2 and "--lambdas" in res.output and not calls

    def refuse(s):   # an earlier, interrupted demo with another --limit
        calls.append(s)
        if not s.overwrite:
            raise ValueError(f"{s.out} was built with other settings (dataset.limit: 5 (cache) vs None (now)); "
                             "use --overwrite to replace it")
        raise SystemExit(0)
    monkeypatch.setattr(extract_run, "run_extraction", refuse)
    res = CliRunner().invoke(cli, ["demo"])
    assert res.exit_code == 1 and "use --overwrite" in res.output and "Traceback" not in res.output
    assert CliRunner().invoke(cli, ["demo", "--overwrite"]).exit_code == 0 and calls[-1].overwrite
