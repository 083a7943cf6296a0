"""`report`: the paper-style PNGs and the plain table from a run directory (a tiny sweep made once here)."""
import click
import pytest
from click.testing import CliRunner

from cache.synthetic import write_synthetic_cache
from cli.heads import report_cmd
from heads.results.report import curves, decomposition_row, results_table, write_plots
from heads.results.rundir import read_results
from heads.sweep.lambdas import SweepSettings
from heads.sweep.sweep import run_sweep
from heads.train.bilevel import TrainSettings

PNGS = ("accuracy_vs_cost.png", "ece_vs_cost.png", "inefficiency_vs_cost.png", "alpha_vs_alpha.png",
        "exit_decomposition.png")
LAMBDAS = (0.05, 0.5, 5.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cache = write_synthetic_cache(root / "c.zarr", {"train": 96, "val": 64, "test": 48}, 3, 8, 4, chunk_rows=16)
    settings = TrainSettings(max_epochs=3, batch_size=32, bi_switch=2, patience=2)
    run_sweep(cache, SweepSettings(LAMBDAS, (("lr", (0.01, 0.003)),), (0.3, 0.7)), settings, root / "run",
              progress=False)
    return root / "run"


def report(*args):
    group = click.Group("test-cli")
    group.add_command(report_cmd)
    return CliRunner().invoke(group, ["report", *map(str, args)], catch_exceptions=False)


def test_report_writes_the_pngs_and_the_table(run):
    result = report(run)
    assert result.exit_code == 0, result.output
    for name in PNGS:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {run / name}" in result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("sweep on ")
    table = [line.split() for line in lines if line.split() and line.split()[0] in {f"{x:.4g}" for x in LAMBDAS}]
    assert len(table) == len(LAMBDAS)                    # one line per lambda: its selected trial
    rows, _ = read_results(run)
    for fields, lam in zip(table, LAMBDAS):
        chosen = next(r for r in rows if r["method"] == "jei" and r["selected"] and r["split"] == "test"
                      and r["lam"] == lam)
        assert float(fields[2]) == pytest.approx(100 * chosen["accuracy"], abs=0.006)
        assert float(fields[5]) == pytest.approx(chosen["cost_norm"], abs=6e-4)
        assert int(fields[-1]) == chosen["epochs"]


def test_decomposition_picks_the_lambda_and_overlays_methods(run, tmp_path):
    rows, _ = read_results(run)
    test = [r for r in rows if r["split"] == "test"]
    assert decomposition_row(test)["lam"] == 0.5                     # the middle lambda by default
    assert decomposition_row(test, 4.0)["lam"] == 5.0                # nearest in log space
    with pytest.raises(ValueError, match="> 0"):
        decomposition_row(test, 0.0)
    # a second method in the same table (what `compare` will write) gets its own curve and table section
    other = [{**r, "method": "other", "selected": False, "accuracy": r["accuracy"] / 2}
             for r in test if r["method"] == "jei" and r["selected"]]
    lines = curves(test + other)
    assert list(lines) == ["jei", "other"] and len(lines["other"]) == len(LAMBDAS)
    assert [p["cost_norm"] for p in lines["jei"]] == sorted(p["cost_norm"] for p in lines["jei"])
    text = results_table(test + other)
    assert "[jei]" in text and "[other]" in text
    paths = write_plots(test + other, tmp_path, lam=5.0)
    assert sorted(p.name for p in paths) == sorted(PNGS) and all(p.stat().st_size > 1000 for p in paths)


def test_report_errors(tmp_path, run):
    result = report(tmp_path)
    assert result.exit_code == 1 and "holds no results.parquet" in result.output
    result = report(run, "--split", "v2", "--no-plots", "--lam", "5")
    assert result.exit_code == 0 and "v2 accuracy" in result.output
