"""The demo's data check, and the gate class-weight cap it relies on."""
import click
import pytest
import torch

from cli import demo
from heads.train.engine import pos_weight_from_counts
from heads.train.bilevel import TrainSettings


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


def test_demo_prints_jei_against_the_threshold_baseline_and_single_exits(tmp_path, monkeypatch):
    """The demo's steps 2-3 on a tiny cache: JEI-DNN's sweep and the threshold baseline in one compare run, then the
    sweep table and the matched-cost table of JEI-DNN, threshold and the single exits, and the figures."""
    import dataclasses

    from click.testing import CliRunner

    from cache.synthetic import write_synthetic_cache
    from extract import run as extract_run
    from pipeline import cli
    cache = write_synthetic_cache(tmp_path / "tiny.zarr", {"train": 96, "val": 64, "test": 48}, 3, 8, 4,
                                  chunk_rows=16)
    monkeypatch.setattr(demo, "ensure_fashion_mnist", lambda: None)
    monkeypatch.setattr(extract_run, "run_extraction", lambda s: cache)
    monkeypatch.setattr(demo, "DEMO", dataclasses.replace(demo.DEMO, run=str(tmp_path / "demo")))
    res = CliRunner().invoke(cli, ["demo", "--lambdas", "auto:3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "compare --cache" in res.output and "--methods jei,threshold" in res.output
    table = res.output[res.output.index("test accuracy (%) at matched cost"):]
    assert [line.split()[0] for line in table.splitlines()[3:6]] == ["jei", "threshold", "single-exit"]
    assert (tmp_path / "demo" / "matched_costs.csv").exists() and (tmp_path / "demo" / "accuracy_vs_cost.png").exists()
