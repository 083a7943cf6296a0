"""Lambda parsing, grids, and the stage-two CLI (train, sweep, fit) end to end on a tiny synthetic cache."""
import json
import logging
import math

import click
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cache.synthetic import write_synthetic_cache
from cache.store import open_cache
from heads.results import rundir
from cli.heads import COMMANDS
from heads.sweep.lambdas import lambda_range_warnings, parse_grid, parse_lambdas

SIZES = {"train": 96, "val": 64, "test": 48}
N_EXITS = 3
FAST = ["--recipe", "paper", "--max-epochs", "4", "--batch-size", "32", "--bi-switch", "2", "--patience", "2",
        "--device", "cpu", "--no-progress"]
DOCUMENTED = {
    "method", "split", "trial", "exit", "lam", "threshold", "warmup_epochs", "lr", "weight_decay", "selected",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "cost_macs", "cost_norm", "cost_norm_ci_low",
    "cost_norm_ci_high", "ece", "ece_temp", "temperature", "conformal_alphas", "exit_hist", "exit_acc_exited",
    "exit_acc_all", "epochs", "seconds",
    *(f"{kind}_{m}" for kind in ("coverage", "inefficiency", "reported_inefficiency", "reported_coverage",
                                 "reported_alpha_used") for m in ("general", "ims", "strict", "gated")),
}


def cli():
    group = click.Group("test-cli")
    for command in COMMANDS:
        group.add_command(command)
    return group


def invoke(*args):
    return CliRunner().invoke(cli(), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr", SIZES, N_EXITS, 8, 4,
                                 chunk_rows=16)


def results(run):
    table = pq.read_table(run / "results.parquet")
    return table, table.to_pylist()


def numbers(rows):
    """Everything but wall times, NaN-safe, for comparing two runs."""
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows], sort_keys=True, default=str)


# ---- parsing ---------------------------------------------------------------------------------------------------
def test_lambda_forms():
    values = parse_lambdas("0.01:10")
    assert len(values) == 20 and math.isclose(values[0], 0.01) and math.isclose(values[-1], 10)
    assert np.allclose(np.diff(np.log(values)), np.log(1000) / 19)
    assert np.allclose(parse_lambdas("0.1:1:3"), [0.1, 0.1 ** 0.5, 1])
    assert parse_lambdas("2, 0.5,1,0.5") == [0.5, 1.0, 2.0]
    assert parse_lambdas("0.3") == [0.3]
    assert parse_lambdas("1:2:1") == [1.0]


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "nan", "inf", "1:0.5", "1:1", "0.1:1:0", "0.1:1:x",
                                  "1:2:3:4", "1,,2", "0:1", "1,-2"])
def test_bad_lambdas_are_one_line_errors(text):
    with pytest.raises(ValueError, match="accepted: A:B") as err:
        parse_lambdas(text)
    assert "\n" not in str(err.value)


def test_grid_forms_and_errors():
    grid = parse_grid(["warmup_epochs=1:3", "lr=0.01,0.003", "weight_decay=5e-4,0", "targets=subsequent,ifmin",
                       "full-gradient=true,false", "batch_size=16,32"])
    assert grid == {"warmup_epochs": (1, 2, 3), "lr": (0.01, 0.003), "weight_decay": (5e-4, 0.0),
                    "targets": ("subsequent", "ifmin"), "full_gradient": (True, False), "batch_size": (16, 32)}
    assert np.allclose(parse_grid(["lr=0.001:0.1:3"])["lr"], [0.001, 0.01, 0.1])
    for bad, message in (("colour=red", "unknown grid key"), ("lr", "expected key=values"),
                         ("warmup_epochs=3:1", "A <= B"), ("lr=0.1:0.01:3", "A < B"), ("lr=fast", "not a number"),
                         ("device=cpu", "unknown grid key"), ("full_gradient=maybe", "true/false")):
        with pytest.raises(ValueError, match=message):
            parse_grid([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["lr=0.1", "lr=0.2"])


def test_cli_rejects_bad_input(tiny_cache, tmp_path):
    result = invoke("sweep", "--cache", tiny_cache, "--lambdas", "1:0.1", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and "accepted: A:B" in result.output
    result = invoke("sweep", "--cache", tiny_cache, "--grid", "colour=red", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and "unknown grid key 'colour'" in result.output
    result = invoke("sweep", "--cache", tiny_cache, "--grid", "warmup_epochs=1:9", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and "warmup_epochs must lie in" in result.output
    result = invoke("fit", "--cache", tiny_cache, "--target-cost", "1.5", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and "(0, 1]" in result.output
    result = invoke("train", "--cache", tmp_path / "missing.zarr", "--lam", "1", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and "missing.zarr" in result.output   # a bad --cache is a usage error


# ---- sweep ------------------------------------------------------------------------------------------------------
def test_sweep_records_every_trial_and_is_reproducible(tiny_cache, tmp_path, caplog):
    args = ["sweep", "--cache", tiny_cache, "--lambdas", "0.1,1", "--grid", "warmup_epochs=1:2",
            "--grid", "lr=0.01,0.003", "--grid", "bi_switch=2,5", *FAST]
    first = invoke(*args, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    table, rows = results(tmp_path / "a")
    assert DOCUMENTED <= set(table.column_names) and "bi_switch" in table.column_names

    jei = [r for r in rows if r["method"] == "jei"]
    assert len(jei) == 2 * 2 * 2 * 2 * 2                 # lambdas x warmup x lr x bi_switch x splits
    assert {(r["warmup_epochs"], r["lr"], r["bi_switch"], r["weight_decay"]) for r in jei} == {
        (w, lr, b, 5e-4) for w in (1, 2) for lr in (0.01, 0.003) for b in (2, 5)}   # gridded and resolved values
    assert {(r["trial"], r["split"]) for r in jei} == {(t, s) for t in range(16) for s in ("v2", "test")}
    for lam in (0.1, 1.0):
        for split in ("v2", "test"):
            chosen = [r for r in jei if r["lam"] == lam and r["split"] == split and r["selected"]]
            assert len(chosen) == 1
        v2 = [r for r in jei if r["lam"] == lam and r["split"] == "v2"]
        assert chosen[0]["trial"] == max(v2, key=lambda r: (r["accuracy"], -r["cost_norm"], -r["trial"]))["trial"]
    singles = [r for r in rows if r["method"] == "single-exit"]
    assert sorted((r["exit"], r["split"]) for r in singles) == sorted(
        (e, s) for e in range(1, N_EXITS + 1) for s in ("v2", "test"))
    assert [r["cost_norm"] for r in singles if r["split"] == "test"][-1] == pytest.approx(1.0)
    curve = [r for r in rows if r["method"] == "jei-threshold"]
    assert len(curve) == 2 * 4 * 2 and all(r["trial"] in {c["trial"] for c in jei if c["selected"]} for r in curve)
    for r in rows:
        assert sum(r["exit_hist"]) == r["n_samples"] == SIZES["test" if r["split"] == "test" else "val"] // (
            1 if r["split"] == "test" else 2)
        assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]

    with open_cache(tiny_cache) as cache:
        fingerprint = cache.fingerprint
    assert table.schema.metadata[rundir.META_FINGERPRINT].decode() == fingerprint
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["status"] == "complete" and settings["cache"]["fingerprint"] == fingerprint
    assert json.loads(table.schema.metadata[rundir.META_SETTINGS])["settings_hash"] == settings["settings_hash"]
    heads = rundir.load_heads(tmp_path / "a")
    assert sorted(t["trial"] for g in heads["groups"] for t in g["trials"]) == list(range(16))
    assert len(heads["groups"]) == 3                      # one stacked pass per bi_switch value + the warm-up IMs
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]

    second = invoke(*args, "--out", tmp_path / "b")
    assert numbers(results(tmp_path / "b")[1]) == numbers(rows)
    caplog.set_level(logging.INFO, logger="heads")
    again = invoke(*args, "--out", tmp_path / "a")       # same RUN: heads are re-used, numbers unchanged
    assert "re-using the trained heads" in caplog.text
    assert numbers(results(tmp_path / "a")[1]) == numbers(rows)
    assert second.output.splitlines()[0] == first.output.splitlines()[0]


def test_run_directory_of_other_settings_is_refused(tiny_cache, tmp_path):
    assert invoke("train", "--cache", tiny_cache, "--lam", "1", "--out", tmp_path / "r", *FAST).exit_code == 0
    result = invoke("train", "--cache", tiny_cache, "--lam", "2", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 1 and "holds another run" in result.output and "lambdas" in result.output
    result = invoke("train", "--cache", tiny_cache, "--lam", "2", "--out", tmp_path / "r", "--overwrite", *FAST)
    assert result.exit_code == 0
    assert {r["lam"] for r in results(tmp_path / "r")[1] if r["method"] == "jei"} == {2.0}


def test_train_with_a_trained_last_head_and_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_cache(tmp_path / "cache" / "only.zarr", SIZES, N_EXITS, 8, 4, chunk_rows=16,
                          head_is_task_head=False)
    result = invoke("train", "--lam", "0.5", *FAST)
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    assert run.name.startswith("train-")
    rows = results(run)[1]
    assert [r["split"] for r in rows if r["method"] == "jei"] == ["v2", "test"]
    assert all(r["selected"] for r in rows if r["method"] == "jei")
    heads = rundir.load_heads(run)
    assert sum(k.startswith("im_weight.") for k in heads["groups"][0]["state"]) == N_EXITS   # last IM trained too


# ---- fit and range checks ----------------------------------------------------------------------------------------
def test_fit_moves_the_most_accurate_model_to_the_target_cost(tiny_cache, tmp_path):
    """fit: the sweep's selected models get per-exit thresholds on P(E|x) fitted on V1 to the target; the chosen one
    is the most accurate of those on V2 and spends about the target on V2 and test."""
    result = invoke("fit", "--cache", tiny_cache, "--target-cost", "0.6", "--lambdas", "0.01,0.3,3",
                    "--thresholds", "none", "--out", tmp_path / "fit", *FAST)
    assert result.exit_code == 0, result.output
    assert "chosen: lambda" in result.output
    rows = results(tmp_path / "fit")[1]
    budget = [r for r in rows if r["method"] == "jei-budget"]
    assert {r["lam"] for r in budget} == {r["lam"] for r in rows if r["method"] == "jei"}
    chosen = [r for r in budget if r["selected"]]
    assert sorted(r["split"] for r in chosen) == ["test", "v2"]
    v2 = next(r for r in chosen if r["split"] == "v2")
    assert v2["accuracy"] == max(r["accuracy"] for r in budget if r["split"] == "v2")
    for r in chosen:
        assert abs(r["cost_norm"] - 0.6) < 0.1, r["cost_norm"]
        assert len(r["exit_thresholds"]) == N_EXITS
    # the chosen model's own rows are marked too, no other trial's
    assert {r["trial"] for r in rows if r["selected"]} == {v2["trial"]}
    assert not [r for r in rows if r["method"] == "jei-threshold"]


def test_fit_refuses_a_target_below_the_first_exit(tiny_cache, tmp_path):
    result = invoke("fit", "--cache", tiny_cache, "--target-cost", "0.01", "--lambdas", "1", "--out",
                    tmp_path / "fit", *FAST)
    assert result.exit_code != 0 and "first exit's cost" in result.output


def test_lambda_range_warnings():
    costs = np.array([20.0, 60.0, 100.0])

    def row(method, accuracy, cost, lam=None, exit_=None):
        return {"method": method, "split": "v2", "selected": method == "jei", "lam": lam, "exit": exit_,
                "accuracy": accuracy, "cost_norm": cost}
    singles = [row("single-exit", a, c, exit_=e) for e, (a, c) in enumerate([(0.5, 0.2), (0.7, 0.6), (0.9, 1)])]
    covered = [row("jei", 0.9, 0.95, lam=0.01), row("jei", 0.5, 0.25, lam=10.0)]
    assert lambda_range_warnings(covered + singles, costs) == []
    narrow = [row("jei", 0.8, 0.6, lam=0.1), row("jei", 0.7, 0.5, lam=1.0)]
    found = lambda_range_warnings(narrow + singles, costs)
    assert "accurate end" in found[0] and "cheap end" in found[1]
    assert found[-1] == "suggested range: --lambdas 0.01:10"
    # per-exit CE of 2 V2 samples: both have their lowest CE at exit 2 (cost 0.6) whatever lambda <= 0.1 is, so a
    # smaller lambda cannot change the targets: no lower range is suggested
    settled = np.array([[2.0, 0.1, 0.5], [3.0, 0.2, 0.4]])
    found = lambda_range_warnings(narrow + singles, costs, settled)
    assert "unlikely to reach it" in found[0] and "0.60 at 0.1 (0.60 at lambda -> 0)" in found[0]
    assert found[-1] == "suggested range: --lambdas 0.1:10"
    # here the last exit is best at lambda -> 0 (cost 1) but not at lambda 0.1 (CE gap 0.03 < 0.1 * 0.4): a
    # smaller lambda moves the targets, and the model (cost 0.6) follows its targets (0.6)
    movable = np.array([[2.0, 0.5, 0.47], [3.0, 0.5, 0.47]])
    found = lambda_range_warnings(narrow + singles, costs, movable)
    assert "unlikely" not in found[0] and found[-1] == "suggested range: --lambdas 0.01:10"
    # targets at 0.1 ask for 0.8 (exits 2 and 3), the model spends 0.6: it falls short of its own targets
    short = np.array([[2.0, 0.5, 0.47], [2.0, 0.9, 0.3]])
    found = lambda_range_warnings(narrow + singles, costs, short)
    assert "short of their own targets" in found[0] and found[-1] == "suggested range: --lambdas 0.1:10"


def test_interrupted_runs_keep_settings_and_resume(tiny_cache, tmp_path, monkeypatch, caplog):
    import heads.sweep.rows as rows
    import heads.sweep.session as session
    import heads.sweep.sweep as sweep

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    settings = sweep.TrainSettings(max_epochs=3, batch_size=32, bi_switch=2, patience=2)
    job = sweep.SweepSettings((0.1, 1.0))
    with monkeypatch.context() as m:
        m.setattr(session, "train_stack", killed)
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(tiny_cache, job, settings, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "settings.json").read_text())["status"] == "training"
    assert not (tmp_path / "r" / "results.parquet").exists()
    with monkeypatch.context() as m:                      # killed after training: the heads are kept
        m.setattr(rows, "evaluate_many", killed)
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(tiny_cache, job, settings, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "settings.json").read_text())["status"] == "evaluating"
    caplog.set_level(logging.INFO, logger="heads")
    caplog.clear()
    result = sweep.run_sweep(tiny_cache, job, settings, tmp_path / "r", progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("heads")]
    assert "re-using the trained heads" in messages[0] and result.settings["status"] == "complete"
    fresh = sweep.run_sweep(tiny_cache, job, settings, tmp_path / "fresh", progress=False)
    assert numbers(result.rows) == numbers(fresh.rows)


def test_auto_lambdas_parse_and_bad_counts_are_one_line_errors():
    from heads.sweep.lambdas import AUTO_POINTS, AutoLambdas, parse_lambda_spec
    assert parse_lambda_spec("auto") == AutoLambdas(AUTO_POINTS)
    assert parse_lambda_spec(" AUTO:5 ") == AutoLambdas(5)
    assert parse_lambda_spec("0.1,1") == [0.1, 1.0]
    for text in ("auto:1", "auto:x", "auto:0", "auto:-3"):
        with pytest.raises(ValueError, match="accepted: A:B") as err:
            parse_lambda_spec(text)
        assert "\n" not in str(err.value)


def test_sweep_by_default_uses_auto_lambdas_and_the_converged_recipe(tiny_cache, tmp_path, caplog):
    args = ["sweep", "--cache", tiny_cache, "--lambdas", "auto:4", "--warmup-epochs", "6", "--max-epochs", "8",
            "--batch-size", "32", "--device", "cpu", "--no-progress", "--thresholds", "none", "--out", tmp_path / "a"]
    import torch
    caplog.set_level(logging.INFO, logger="heads")
    first = invoke(*args, "--threads", "2")
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)      # the option reached torch; restored
    assert first.exit_code == 0, first.output
    assert threads == 2 and "lambdas auto: 4 from" in caplog.text
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["identity"]["lambdas"] == "auto:4"
    train = settings["identity"]["train"]
    assert (train["im_loss"], train["targets"], train["warmup_patience"]) == ("uniform", "ifmin", 3)
    lambdas = settings["lambdas"]
    assert len(lambdas) == 4 and lambdas == sorted(lambdas) and lambdas[0] < lambdas[-1]
    rows = results(tmp_path / "a")[1]
    assert sorted({r["lam"] for r in rows if r["method"] == "jei"}) == lambdas
    caplog.clear()
    again = invoke(*args)
    assert again.exit_code == 0 and "re-using the trained heads" in caplog.text
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["lambdas"] == lambdas


@pytest.mark.parametrize("grid", [(), (("lr", (0.01, 0.02)),)])
def test_curves_in_the_first_pass_give_the_rows_of_a_separate_pass(tiny_cache, tmp_path, monkeypatch, grid):
    """Without a grid the selected models' threshold curves come from the first evaluation pass; the run's rows
    are those of evaluating at 0.5 first and the curves of the selected trials after (row order aside). With a
    grid (not every trial selected) the curves still belong to the selected trials only."""
    import heads.sweep.sweep as sweep
    settings = sweep.TrainSettings(max_epochs=3, batch_size=32, bi_switch=2, patience=2)
    job = sweep.SweepSettings((0.1, 1.0, 3.0), grid, (0.3, 0.7))
    fast = sweep.run_sweep(tiny_cache, job, settings, tmp_path / "a", progress=False)
    real = sweep.evaluate_group
    monkeypatch.setattr(sweep, "evaluate_trials", lambda session, groups, thresholds=(): [
        row for g in groups if g["group"] != sweep.REFERENCE_GROUP for row in real(session, g)])
    separate = sweep.run_sweep(tiny_cache, job, settings, tmp_path / "b", progress=False)

    def ordered(rows):
        return sorted(json.loads(numbers(rows)), key=lambda r: json.dumps(r, sort_keys=True))
    assert ordered(fast.rows) == ordered(separate.rows)
    curves = {r["trial"] for r in fast.rows if r["method"] == "jei-threshold"}
    chosen = {r["trial"] for r in fast.rows if r["method"] == "jei" and r["selected"]}
    assert curves == chosen and len(chosen) == 3
    assert not any(r["selected"] for r in fast.rows if r["method"] == "jei-threshold")


# ---- training history and messages -----------------------------------------------------------------------------
def test_sweep_writes_the_history_of_every_trial_and_epoch(tiny_cache, tmp_path):
    """history.parquet: one row per trial and epoch trained, warm-up and bi-level; the bi-level rows run until the
    trial stopped (its kept epoch + patience, or its budget), the kept epoch is the results' `epochs` and its V2
    accuracy and cost are those results.parquet reports; a rerun that re-uses the heads keeps the history."""
    import heads.sweep.sweep as sweep
    settings = sweep.TrainSettings(max_epochs=6, warmup_epochs=2, batch_size=32, bi_switch=2, patience=2)
    job = sweep.SweepSettings((0.1, 1.0), (("lr", (0.01, 0.03)),), ())
    result = sweep.run_sweep(tiny_cache, job, settings, tmp_path / "r", progress=False)
    table = pq.read_table(tmp_path / "r" / rundir.HISTORY)
    assert table.schema.metadata[rundir.META_HASH].decode() == result.settings["settings_hash"]
    assert {"trial", "group", "lam", "lr", "weight_decay", "warmup_epochs", "phase", "epoch", "accuracy", "cost",
            "objective", "best_accuracy", "best_cost", "best_objective", "improved", "active",
            "im_accuracy"} == set(table.column_names)
    history = table.to_pylist()
    keys = [(h["trial"], h["phase"], h["epoch"]) for h in history]
    assert len(keys) == len(set(keys))
    jei = {r["trial"]: r for r in result.rows if r["method"] == "jei" and r["split"] == "v2"}
    assert len(jei) == 4 and {h["trial"] for h in history} == set(jei)
    budget = settings.max_epochs - settings.warmup_epochs
    for trial, row in jei.items():
        mine = [h for h in history if h["trial"] == trial]
        assert all(h[k] == row[k] for h in mine for k in ("lam", "lr", "weight_decay", "warmup_epochs"))
        warm = [h for h in mine if h["phase"] == "warmup"]
        assert [h["epoch"] for h in warm] == list(range(1, settings.warmup_epochs + 1))
        assert all(len(h["im_accuracy"]) == N_EXITS - 1 and math.isnan(h["objective"]) for h in warm)
        bilevel = [h for h in mine if h["phase"] == "bilevel"]
        ran = min(budget, row["epochs"] + settings.patience)
        assert [h["epoch"] for h in bilevel] == list(range(1, ran + 1))
        assert max(h["epoch"] for h in bilevel if h["improved"]) == row["epochs"]
        kept = bilevel[row["epochs"] - 1]
        assert kept["accuracy"] == kept["best_accuracy"] == bilevel[-1]["best_accuracy"]
        assert kept["accuracy"] == pytest.approx(row["accuracy"], abs=1e-9)
        assert kept["cost"] == pytest.approx(row["cost_norm"], rel=1e-6)      # training: float32 costs
        assert bilevel[-1]["best_objective"] == kept["objective"] == min(h["objective"] for h in bilevel)
        assert all(h["active"] for h in bilevel[:-1]) and not bilevel[-1]["active"]
    selected = [r for r in jei.values() if r["selected"]]
    assert len(selected) == 2
    for row in selected:                                   # the selected state's V2 accuracy is in the history
        assert any(h["trial"] == row["trial"] and h["phase"] == "bilevel" and h["epoch"] == row["epochs"]
                   and h["best_accuracy"] == pytest.approx(row["accuracy"], abs=1e-9) for h in history)
    before = (tmp_path / "r" / rundir.HISTORY).read_bytes()
    sweep.run_sweep(tiny_cache, job, settings, tmp_path / "r", progress=False)   # re-uses the heads
    assert (tmp_path / "r" / rundir.HISTORY).read_bytes() == before


def test_quiet_drops_messages_and_keeps_the_results(tiny_cache, tmp_path):
    from pipeline import cli as pipeline_cli
    args = ["sweep", "--cache", tiny_cache, "--lambdas", "0.1,1", "--out", tmp_path / "r", *FAST]
    first = CliRunner().invoke(pipeline_cli, [str(a) for a in args])
    assert first.exit_code == 0, first.output
    quiet = CliRunner().invoke(pipeline_cli, ["--quiet", *map(str, args)])
    assert quiet.exit_code == 0, quiet.output
    assert "re-using the trained heads" not in quiet.output
    assert "run directory:" in quiet.output and "test accuracy" in quiet.output        # the result: stdout
    loud = CliRunner().invoke(pipeline_cli, [str(a) for a in args])
    assert loud.exit_code == 0 and "re-using the trained heads" in loud.output
    both = CliRunner().invoke(pipeline_cli, ["--quiet", "--verbose", *map(str, args)])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_log_lines_are_plain_for_info_and_prefixed_above(capsys):
    import pipeline
    say = logging.getLogger("heads.sweep.sweep")
    pipeline.configure_logging(logging.INFO)
    say.debug("hidden")
    say.info("plain")
    say.warning("careful")
    logging.getLogger("numba.core").info("not ours")
    assert capsys.readouterr().err == "plain\nWARNING: careful\n"
    pipeline.configure_logging(logging.WARNING)                # --quiet
    say.info("plain")
    say.error("broken")
    pipeline.configure_logging(logging.DEBUG)                  # --verbose; one handler, however often configured
    say.debug("detail")
    assert capsys.readouterr().err == "ERROR: broken\nDEBUG: detail\n"


def test_tensorboard_gets_the_history_or_a_one_line_error(tiny_cache, tmp_path, monkeypatch):
    import sys
    import types
    from pathlib import Path
    args = ["sweep", "--cache", tiny_cache, "--lambdas", "0.1,1", "--out", tmp_path / "r", *FAST,
            "--tensorboard", tmp_path / "tb"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)          # not installed
    missing = invoke(*args)
    assert missing.exit_code == 1 and "tensorboard package is not installed" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()                                     # refused before any work
    written = []

    class Writer:
        def __init__(self, log_dir):
            self.folder = Path(log_dir)

        def add_scalar(self, tag, value, step):
            written.append((self.folder.parent, self.folder.name, tag, value, step))

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    history = pq.read_table(tmp_path / "r" / rundir.HISTORY).to_pylist()
    assert len([w for w in written if w[2].endswith("/accuracy") and "best" not in w[2]]) == len(history)
    for h in history:
        warm = sum(g["phase"] == "warmup" for g in history if g["trial"] == h["trial"])
        step = h["epoch"] + (warm if h["phase"] == "bilevel" else 0)
        assert (tmp_path / "tb", f"trial-{h['trial']}-lam-{h['lam']:g}", f"{h['phase']}/accuracy", h["accuracy"],
                step) in written
