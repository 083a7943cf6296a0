"""`compare` end to end on a tiny synthetic cache (every method, one results.parquet, reruns), `report` on it
(figures 2, 3, 5, 9 and the matched-cost table), and the upper-envelope / area arithmetic on hand-made curves."""
import csv
import dataclasses
import json
import logging
import math
import os

import click
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import heads.sweep.compare as compare_module
import torch
from cache.synthetic import write_synthetic_cache
from heads.results import rundir
from heads.baselines.methods import LAMBDA_METHODS, METHODS
from cli.heads import COMMANDS
from cache.store import open_cache
from heads.sweep.compare import BUDGET_METHOD, COMPARE_METHODS, CompareSettings, parse_methods, run_compare
from heads.results.matched import (
    MATCHED_COSTS, area_under, common_range, envelope_at, matched_costs, matched_table, upper_envelope,
)
from heads.results.report import best_baseline
from heads.sweep.lambdas import SweepSettings
from heads.sweep.sweep import run_sweep
from heads.model.exits import exit_distribution, exit_probabilities
from heads.model.stack import StackedHeads
from heads.baselines.thresholds import DEFAULT_P_GRID, exit_by_thresholds
from heads.train.bilevel import TrainSettings, default_settings

SIZES = {"train": 96, "val": 64, "test": 48}
N_EXITS = 3
LAMBDAS = (0.1, 1.0)
FAST = ["--recipe", "paper", "--max-epochs", "3", "--warmup-epochs", "1", "--batch-size", "32", "--bi-switch", "2",
        "--patience", "2",
        "--device", "cpu", "--no-progress"]
SETTINGS = TrainSettings(max_epochs=3, warmup_epochs=1, batch_size=32, bi_switch=2, patience=2)
THRESHOLD_GATED = ("threshold", "threshold-warmup", "boosted", "l2w")
PNGS = ("accuracy_vs_cost.png", "ece_vs_cost.png", "inefficiency_vs_cost.png", "alpha_vs_alpha.png",
        "exit_decomposition.png", "ablation.png", "exit_decomposition_compare.png")


def invoke(*args):
    group = click.Group("test-cli")
    for command in COMMANDS:
        group.add_command(command)
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr", SIZES, N_EXITS, 8, 4,
                                 chunk_rows=16)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    result = invoke("compare", "--cache", cache, "--out", out, "--lambdas", "0.1,1", *FAST)
    assert result.exit_code == 0, result.output
    return out, result.output


def rows_of(out):
    return pq.read_table(out / "results.parquet").to_pylist()


def numbers(rows):
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows], sort_keys=True, default=str)


# ---- compare -----------------------------------------------------------------------------------------------------
def test_compare_writes_every_method_into_one_parquet(run, cache, tmp_path):
    out, output = run
    rows = rows_of(out)
    assert {r["method"] for r in rows} == {*COMPARE_METHODS, "jei-threshold", "single-exit"}
    for method in THRESHOLD_GATED:                   # one row per budget p and split, p in its own column
        mine = [r for r in rows if r["method"] == method]
        assert sorted((r["p"], r["split"]) for r in mine) == sorted((p, s) for p in DEFAULT_P_GRID
                                                                    for s in ("v2", "test"))
        assert all(r["lam"] is None and math.isnan(r["threshold"]) for r in mine)
        assert all(math.isclose(sum(r["budget_fractions"]), 1.0) and len(r["exit_thresholds"]) == N_EXITS
                   and sum(r["v1_exit_hist"]) == SIZES["val"] // 2 for r in mine)
    for method in (*LAMBDA_METHODS, "jei"):          # one row per lambda and split
        mine = [r for r in rows if r["method"] == method]
        assert sorted((r["lam"], r["split"]) for r in mine) == sorted((lam, s) for lam in LAMBDAS
                                                                      for s in ("v2", "test"))
        assert all(r["p"] is None and r["threshold"] == 0.5 for r in mine)
    for r in rows:                                   # the same evaluation for everyone
        assert sum(r["exit_hist"]) == r["n_samples"] == (SIZES["test"] if r["split"] == "test" else SIZES["val"] // 2)
        assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] and 0 < r["cost_norm"] <= 1
        assert len(r["coverage_gated"]) == len(r["conformal_alphas"])

    # the shared warm-up: the single exits are the fully warmed-up IMs that "threshold" gates
    some_threshold = next(r for r in rows if r["method"] == "threshold" and r["split"] == "test")
    singles = sorted((r for r in rows if r["method"] == "single-exit" and r["split"] == "test"),
                     key=lambda r: r["exit"])
    assert [r["accuracy"] for r in singles] == pytest.approx(some_threshold["exit_acc_all"], abs=1e-12)

    # the JEI-DNN part is the sweep's, not a copy of it: same rows as `sweep` with the same settings
    sweep = run_sweep(cache, SweepSettings(LAMBDAS), SETTINGS, tmp_path / "sweep", progress=False)
    for method in ("jei", "jei-threshold"):
        assert numbers([r for r in rows if r["method"] == method]) == numbers(
            [{k: r.get(k) for k in rows[0]} for r in sweep.rows if r["method"] == method])

    settings = json.loads((out / "settings.json").read_text())
    assert settings["status"] == "complete" and settings["methods"] == list(COMPARE_METHODS)
    assert settings["identity"]["command"] == "compare"
    assert sorted(p.stem for p in (out / rundir.PARTS).iterdir()) == sorted(METHODS)   # jei-budget: no training
    assert not [p for p in out.rglob("*.tmp")]
    history = pq.read_table(out / rundir.HISTORY).to_pylist()          # the JEI-DNN trials' training curves
    assert {h["trial"] for h in history} == {r["trial"] for r in rows if r["method"] == "jei"}
    assert "[boosted]" in output and "p=0.05" in output and "accuracy at matched cost" in output


def test_jei_budget_gates_a_selected_model_on_its_exit_probabilities_fitted_to_each_budget(run, cache):
    """jei-budget: one selected JEI-DNN model, per-exit thresholds on its P(E^l|x) fitted on V1 for every budget p;
    applying a row's thresholds to that model's test P(E^l|x) gives the row's test exits."""
    out, _ = run
    rows = rows_of(out)
    mine = [r for r in rows if r["method"] == BUDGET_METHOD]
    assert sorted((r["p"], r["split"]) for r in mine) == sorted((p, s) for p in DEFAULT_P_GRID for s in ("v2", "test"))
    selected = {(r["trial"], r["lam"]) for r in rows if r["method"] == "jei" and r["selected"]}
    assert len({(r["trial"], r["lam"]) for r in mine}) == 1 and (mine[0]["trial"], mine[0]["lam"]) in selected
    assert all(sum(r["v1_exit_hist"]) == SIZES["val"] // 2 for r in mine)
    # the V1 exit shares follow p: cheap budgets send more samples out early than dear ones
    first_share = {r["p"]: r["v1_exit_hist"][0] for r in mine if r["split"] == "test"}
    assert first_share[DEFAULT_P_GRID[0]] > first_share[DEFAULT_P_GRID[-1]]

    index = rundir.load_heads(out)
    group = next(g for g in index["groups"] if any(t["trial"] == mine[0]["trial"] for t in g["trials"]))
    position = [t["trial"] for t in group["trials"]].index(mine[0]["trial"])
    heads = StackedHeads.from_state_dict(group["state"]).select(position)
    with open_cache(cache) as c:
        test = c.load_split("test")
    _, g = heads.outputs(test.features, test.logits)
    conf = exit_probabilities(exit_distribution(g[0]).double())
    for r in (r for r in mine if r["split"] == "test"):
        exits = exit_by_thresholds(conf, torch.tensor(r["exit_thresholds"], dtype=torch.float64))
        assert np.bincount(exits.numpy(), minlength=N_EXITS).tolist() == r["exit_hist"], r["p"]


def test_report_on_a_compare_run_overlays_methods_and_writes_the_matched_costs(run):
    out, _ = run
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"wrote {out / name}" in result.output
    with open(out / rundir.MATCHED) as f:
        table = list(csv.DictReader(f))
    methods = [*COMPARE_METHODS, "single-exit"]
    assert sorted((r["method"], float(r["cost_norm"])) for r in table) == sorted(
        (m, c) for m in methods for c in MATCHED_COSTS)
    text = result.output[result.output.index("accuracy at matched cost"):]
    assert all(any(line.startswith(m) for line in text.splitlines()) for m in methods)

    # every matched value lies on the method's envelope: at least the best point no dearer than c, at most the best
    # point overall, and NaN exactly below the method's cheapest point
    test = [r for r in rows_of(out) if r["split"] == "test"]
    for entry in table:
        c, acc = float(entry["cost_norm"]), float(entry["accuracy"])
        pts = [r for r in test if r["method"] == entry["method"]
               and (r["method"] != "jei" or r["selected"])]
        costs = [r["cost_norm"] for r in pts]
        if c < min(costs):
            assert math.isnan(acc)
            continue
        floor = max(r["accuracy"] for r in pts if r["cost_norm"] <= c)
        assert floor - 1e-12 <= acc <= max(r["accuracy"] for r in pts) + 1e-12
        assert float(entry["accuracy_ci_low"]) <= acc + 1e-12 <= float(entry["accuracy_ci_high"]) + 2e-12
    lo, hi = float(table[0]["auc_cost_low"]), float(table[0]["auc_cost_high"])
    for method in ("threshold", "boosted", "l2w"):
        pts = [r for r in test if r["method"] == method]
        assert min(r["cost_norm"] for r in pts) <= lo and max(r["cost_norm"] for r in pts) >= hi


def trained_methods(monkeypatch) -> list:
    """The methods compare asks run_baselines to train from now on, in order (a list that fills as it runs)."""
    trained = []
    real = compare_module.run_baselines

    def counting(data, test, methods, *args, **kwargs):
        trained.extend(methods)
        return real(data, test, methods, *args, **kwargs)
    monkeypatch.setattr(compare_module, "run_baselines", counting)
    return trained


def test_rerun_reuses_finished_methods_and_trains_only_new_ones(cache, tmp_path, monkeypatch, caplog):
    trained = trained_methods(monkeypatch)
    job = CompareSettings(LAMBDAS, ("jei", "threshold", "fixed-ims"), ())
    first = run_compare(cache, job, SETTINGS, tmp_path / "r", progress=False)
    assert trained == ["threshold", "fixed-ims"]
    trained[:] = []
    more = CompareSettings(LAMBDAS, ("jei", "threshold", "fixed-ims", "boosted"), ())
    caplog.set_level(logging.INFO, logger="heads")
    caplog.clear()
    second = run_compare(cache, more, SETTINGS, tmp_path / "r", progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert trained == ["boosted"]                        # the others come from heads.safetensors and methods/
    assert any("re-using the trained heads" in m for m in messages)
    assert any("re-using the finished threshold rows" in m for m in messages)
    assert numbers([r for r in second.rows if r["method"] != "boosted"]) == numbers(first.rows)
    assert json.loads((tmp_path / "r" / "settings.json").read_text())["methods"] == list(more.methods)
    trained[:] = []
    run_compare(cache, job, SETTINGS, tmp_path / "r", overwrite=True, progress=False)
    assert trained == ["threshold", "fixed-ims"]          # --overwrite retrains


def test_a_second_process_trains_boosted_and_l2w_with_the_one_process_numbers(cache, tmp_path, monkeypatch, caplog):
    """With 2 threads on a CPU, boosted and l2w train in a second process (one thread each, for the whole run):
    every row equals the one-process run's on one thread, and this process trained the others only."""
    job = CompareSettings(LAMBDAS, COMPARE_METHODS, ())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_compare(cache, job, SETTINGS, tmp_path / "one", progress=False, parallel=False)
        torch.set_num_threads(2)
        trained = trained_methods(monkeypatch)
        caplog.set_level(logging.INFO, logger="heads")
        two = run_compare(cache, job, SETTINGS, tmp_path / "two", progress=False, parallel=True)
        assert torch.get_num_threads() == 2                      # given back after the run
    finally:
        torch.set_num_threads(before)
    assert any("boosted, l2w train in a second process" in r.getMessage() for r in caplog.records)
    assert "boosted" not in trained and "l2w" not in trained and "threshold" in trained
    assert numbers(two.rows) == numbers(one.rows)
    timings = json.loads((tmp_path / "two" / "settings.json").read_text())["timings"]["baseline_seconds"]
    assert set(timings) == set(METHODS)


def test_an_interrupt_stops_the_second_process_and_the_rerun_finishes_the_same(cache, tmp_path, monkeypatch):
    """Ctrl-C while the second process trains: it is stopped (no orphan keeps training), torch's threads are
    given back, and a rerun into the same run directory gives the uninterrupted run's rows."""
    import heads.sweep.apart as apart_module
    job = CompareSettings(LAMBDAS, COMPARE_METHODS, ())
    started = []

    class Recorded(apart_module.SecondProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)
    monkeypatch.setattr(compare_module, "SecondProcess", Recorded)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = run_compare(cache, job, SETTINGS, tmp_path / "one", progress=False, parallel=False)
        torch.set_num_threads(2)
        with monkeypatch.context() as m:
            m.setattr(compare_module, "_jei_groups", interrupted)
            with pytest.raises(KeyboardInterrupt):
                run_compare(cache, job, SETTINGS, tmp_path / "r", progress=False, parallel=True)
        assert len(started) == 1 and not started[0]._process.is_alive()
        assert torch.get_num_threads() == 2
        again = run_compare(cache, job, SETTINGS, tmp_path / "r", progress=False, parallel=True)
    finally:
        torch.set_num_threads(before)
    assert numbers(again.rows) == numbers(want.rows)


def test_no_second_process_when_the_splits_do_not_fit_twice(cache, tmp_path, monkeypatch, caplog):
    """Resident splits that fit the memory budget once but not twice: boosted trains here, and the log says why."""
    from heads.train.stream import MemorySettings, plan_memory
    trained = trained_methods(monkeypatch)
    caplog.set_level(logging.INFO, logger="heads")
    with open_cache(cache) as c:
        held = sum(plan_memory(c, MemorySettings("resident")).split_bytes.values())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_compare(cache, CompareSettings(LAMBDAS, ("boosted",), ()), SETTINGS, tmp_path / "r", progress=False,
                    memory=MemorySettings("resident", 1.5 * held / 2 ** 30), parallel=True)
    finally:
        torch.set_num_threads(before)
    assert trained == ["boosted"]
    assert any("boosted train in this process: the resident splits" in r.getMessage() for r in caplog.records)


def test_second_process_returns_raises_dies_and_stops_as_told():
    import time

    from heads.sweep.apart import SecondProcess, SecondProcessError
    quick = SecondProcess(abs, -3, "abs")
    assert quick.result() == 3 and quick.ready()
    failing = SecondProcess(int, "x", "int")
    with pytest.raises(ValueError, match="invalid literal"):       # the child's exception, raised here
        failing.result()
    dying = SecondProcess(os._exit, 3, "a test")
    with pytest.raises(SecondProcessError, match="exit code 3"):
        dying.result()
    sleeping = SecondProcess(time.sleep, 60, "sleep")
    assert not sleeping.ready()
    start = time.perf_counter()
    sleeping.stop()
    assert time.perf_counter() - start < 10 and not sleeping._process.is_alive()


def test_bad_requests_are_one_line_errors(cache, tmp_path):
    assert parse_methods("boosted, jei") == ("jei", "boosted") and parse_methods("all") == COMPARE_METHODS
    for text in ("jei,nope", "", "jei,all"):
        with pytest.raises(ValueError, match="choose from"):
            parse_methods(text)
    with pytest.raises(ValueError, match="distinct"):
        CompareSettings(LAMBDAS, ("jei", "jei"))
    with pytest.raises(ValueError, match="lambdas"):
        CompareSettings((), ("jei",))
    result = invoke("compare", "--cache", cache, "--out", tmp_path / "x", "--methods", "jei,msdnet", *FAST)
    assert result.exit_code == 2 and "msdnet" in result.output


# ---- upper envelope, matched costs, area -------------------------------------------------------------------------
def test_upper_envelope_keeps_points_better_than_every_cheaper_one():
    cost = [0.5, 0.2, 0.4, 0.6, 0.4, 0.9, 0.3]
    acc = [0.70, 0.50, 0.65, 0.68, 0.60, 0.80, 0.50]
    # 0.3 ties the cheaper 0.2 (not better), 0.4/0.60 loses to 0.4/0.65, 0.6 is worse than 0.5
    assert upper_envelope(cost, acc).tolist() == [1, 2, 0, 5]
    assert upper_envelope([1.0], [0.3]).tolist() == [0]
    with pytest.raises(ValueError):
        upper_envelope([0.1, 0.2], [0.5])


def test_envelope_interpolates_bounds_holds_flat_and_is_nan_below_the_cheapest_point():
    cost = [0.2, 0.4, 0.6, 0.8]
    acc = [0.50, 0.70, 0.90, 0.85]                 # the last point is dearer and worse: the envelope stays flat
    low, high = [0.40, 0.60, 0.85, 0.80], [0.60, 0.80, 0.95, 0.90]
    a, lo, hi = envelope_at(cost, acc, [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.85], low, high)
    assert np.allclose(a, [np.nan, 0.50, 0.60, 0.80, 0.90, 0.90, 0.90], equal_nan=True)   # flat past the last too
    assert np.allclose(lo, [np.nan, 0.40, 0.50, 0.725, 0.85, 0.85, 0.85], equal_nan=True)
    assert np.allclose(hi, [np.nan, 0.60, 0.70, 0.875, 0.95, 0.95, 0.95], equal_nan=True)
    (only,) = envelope_at(cost, acc, 0.3)
    assert only.shape == (1,) and only[0] == pytest.approx(0.6)


def test_area_under_the_envelope_on_hand_made_curves():
    cost, acc = [0.2, 0.4, 0.6, 0.8], [0.50, 0.70, 0.90, 0.85]
    # trapezoids 0.2-0.4: 0.12, 0.4-0.6: 0.16, then flat 0.9 over 0.6-0.8: 0.18
    assert area_under(cost, acc, 0.2, 0.8) == pytest.approx(0.12 + 0.16 + 0.18)
    assert area_under(cost, acc, 0.3, 0.5) == pytest.approx(0.2 * 0.70)      # linear: mean of 0.6 and 0.8
    assert math.isnan(area_under(cost, acc, 0.1, 0.5)) and math.isnan(area_under(cost, acc, 0.5, 0.5))
    # a dominated point inside the range changes nothing
    assert area_under([*cost, 0.5], [*acc, 0.3], 0.2, 0.8) == pytest.approx(0.46)


def _row(method, cost, acc, **extra):
    return {"method": method, "split": "test", "cost_norm": cost, "accuracy": acc, "accuracy_ci_low": acc - 0.05,
            "accuracy_ci_high": acc + 0.05, **extra}


def test_matched_costs_on_hand_made_rows_use_the_common_range():
    rows = [_row("jei", c, a, selected=True, lam=lam) for c, a, lam in ((0.3, 0.6, 3.0), (0.7, 0.9, 0.1))]
    rows += [_row("jei", 0.5, 0.99, selected=False, lam=1.0)]                # an unselected grid trial: left out
    rows += [_row("threshold", c, a, p=c) for c, a in ((0.25, 0.5), (0.5, 0.7), (0.9, 0.95))]
    rows += [_row("fixed-ims", 0.45, 0.6, lam=1.0), _row("fixed-ims", 0.45, 0.6, lam=2.0)]   # one cost: no curve
    rows += [_row("single-exit", c, a, exit=i + 1) for i, (c, a) in enumerate(((0.1, 0.3), (0.55, 0.6), (1, 0.9)))]
    rows += [{**_row("jei", 0.3, 0.1, selected=True, lam=3.0), "split": "v2"}]   # other split: ignored
    assert common_range({"a": [{"cost_norm": 0.3}, {"cost_norm": 0.7}], "single-exit": [{"cost_norm": 0.5}]}) == \
        (0.3, 0.7)
    table = matched_costs(rows, costs=(0.3, 0.5, 0.8))
    by = {(r["method"], r["cost_norm"]): r for r in table}
    assert by[("jei", 0.5)]["accuracy"] == pytest.approx(0.75) and by[("jei", 0.8)]["accuracy"] == 0.9  # held
    assert by[("threshold", 0.3)]["accuracy"] == pytest.approx(0.54)
    assert by[("threshold", 0.8)]["accuracy_ci_high"] == pytest.approx(0.7 + 0.25 * 0.3 / 0.4 + 0.05)
    assert by[("fixed-ims", 0.5)]["accuracy"] == 0.6 and math.isnan(by[("fixed-ims", 0.3)]["accuracy"])  # at 0.45
    assert {(r["auc_cost_low"], r["auc_cost_high"]) for r in table} == {(0.3, 0.7)}   # jei and threshold overlap
    assert by[("jei", 0.3)]["auc"] == pytest.approx(0.4 * 0.75)
    assert by[("threshold", 0.3)]["auc"] == pytest.approx(0.2 * (0.54 + 0.7) / 2 + 0.2 * (0.7 + 0.825) / 2)
    assert math.isnan(by[("fixed-ims", 0.3)]["auc"])
    assert by[("single-exit", 0.3)]["auc"] == pytest.approx(area_under([0.1, 0.55, 1], [0.3, 0.6, 0.9], 0.3, 0.7))
    assert by[("jei", 0.3)]["auc_mean_accuracy"] == pytest.approx(0.75)
    assert best_baseline(table) == "threshold"
    text = matched_table(table)
    assert "[0.300, 0.700]" in text and len(text.splitlines()) == 2 + 4
    with pytest.raises(ValueError, match="no operating points"):
        matched_costs(rows, split="v1")


def test_common_range_leaves_out_a_narrow_method_that_overlaps_nobody():
    span = lambda a, b: [{"cost_norm": a}, {"cost_norm": b}]   # noqa: E731
    points = {"jei": span(0.25, 0.5), "threshold": span(0.06, 0.9), "diffbranch": span(0.14, 0.21)}
    assert common_range(points) == (0.25, 0.5)                 # diffbranch dropped: it overlaps jei nowhere
    assert common_range({**points, "diffbranch": span(0.14, 0.3)}) == (0.25, 0.3)   # overlapping: kept


def test_recipe_converged_trains_only_the_gates_on_converged_ims_and_explicit_options_win(cache, tmp_path,
                                                                                          monkeypatch, caplog):
    """--recipe converged, the default: the IMs warmed up until they stop improving, then the GATE state only, so
    its JEI-DNN models are the fixed-ims ablation's exactly (test_baselines shows they train the same; here they
    are re-used, not trained again); an option given explicitly overrides the recipe."""
    trained = trained_methods(monkeypatch)
    common = ["--cache", cache, "--lambdas", "0.1,1", "--methods", "jei,fixed-ims", "--batch-size", "32",
              "--device", "cpu", "--no-progress"]
    caplog.set_level(logging.INFO, logger="heads")
    result = invoke("compare", *common, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert trained == [] and "never leaves the GATE state" in caplog.text
    train = json.loads((tmp_path / "r" / "settings.json").read_text())["identity"]["train"]
    assert train == dataclasses.asdict(default_settings(batch_size=32, device="cpu"))
    assert (train["warmup_patience"], train["im_loss"], train["targets"]) == (3, "uniform", "ifmin")
    n_batches = math.ceil(SIZES["train"] / 32)
    assert train["bi_switch"] > n_batches * train["max_epochs"]
    rows = rows_of(tmp_path / "r")

    def points(method):
        return sorted((r["lam"], r["split"], r["accuracy"], r["cost_norm"], tuple(r["exit_hist"]))
                      for r in rows if r["method"] == method)
    assert points("jei") == points("fixed-ims") and len(points("jei")) == 2 * len(LAMBDAS)

    result = invoke("compare", *common, "--out", tmp_path / "o", "--recipe", "converged", "--warmup-epochs", "3")
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "o" / "settings.json").read_text())["identity"]["train"]
    assert (train["warmup_epochs"], train["im_loss"]) == (3, "uniform")
