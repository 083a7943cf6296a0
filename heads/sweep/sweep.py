"""Lambda sweeps and hyperparameter grids of JEI-DNN heads, written to a run directory: the run's lifecycle
(settings, heads, history, results; resuming; one writer), under torchrun too (cost-targeted fits:
heads/sweep/fit.py; JEI-DNN beside the baselines: heads/sweep/compare.py).

    lambdas = parse_lambdas("0.01:10")                             # heads/sweep/lambdas.py: 20 log-spaced points
    grid = parse_grid(["warmup_epochs=1:5", "lr=0.01,0.003"])      # {"warmup_epochs": (1..5), "lr": (...)}
    run = run_sweep("cache/x.zarr", SweepSettings(tuple(lambdas), grid_items(grid)), TrainSettings(), "runs/a")

The parts: lambdas.py (what to train: lambda and grid parsing, auto lambdas, range diagnostics), session.py (the
data and warm-ups of one process, the stacked passes with their progress bar and history), rows.py (evaluation
rows and the per-lambda selection), this file (the run directory around them).

A sweep is: the lambda-independent warm-up once (one pass serves every warm-up epoch count and every (lr, weight
decay) pair of the grid, heads.train.bilevel.warmup), then every lambda x grid trial in ONE stacked bi-level pass
(heads.train.bilevel.train_stack: lr, weight_decay and warmup_epochs vary per trial inside a stack; a grid over any
other TrainSettings field needs its own stacked pass per value), each trial early-stopped on its own. Every trial is
then evaluated on V2 and test (heads.evaluation.evaluate.evaluate), the trial with the best V2 accuracy of each lambda
is marked `selected`, the selected models also trace gate-threshold curves (method "jei-threshold"), and the warm-up
IMs give the fixed single-exit reference points (method "single-exit"). Columns: heads/results/rundir.py.

Memory: heads/train/stream.py places each split resident or streamed (run_sweep's `memory`; `--memory-budget`,
`--stream/--resident`); a streamed training split changes the batch order, so the run's identity records it.

Several devices: under torchrun (`torchrun --nproc_per_node=N pipeline.py sweep ...`) every rank loads the cache and
runs the same warm-up, then trains every N-th trial of each stacked pass and evaluates them; rank 0 alone owns the
run directory, gathers the heads (merge_groups: the one-process trial order) and the rows, and finishes the run as
one process would. Equal to a one-process run up to the rounding a stack's width brings (README, Stage two).

Interruption: settings.json is written before training; the heads are saved as soon as training ends, with
history.parquet (every trial's warm-up and bi-level epochs, from heads.train's per-epoch reports); the results
last. Rerunning the same command into the same RUN re-uses saved heads of identical settings (training is
skipped, evaluation redone); a run killed during training starts its training again (the warm-up and bi-level
phase keep no mid-epoch state, and the warm-up takes a few epochs of one model).
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import torchrun
from heads.model.stack import StackedHeads
from heads.results import rundir
from heads.sweep.lambdas import SweepSettings, check_grid, expand_trials, lambda_identity, lambda_range_warnings
from heads.sweep.rows import evaluate_group, evaluate_trials, select_per_lambda, single_exit_rows
from heads.sweep.session import (REFERENCE_GROUP, Session, cross_entropy, reference_group, resolve_lambdas,
                                 train_groups)
from heads.train.bilevel import TrainSettings
from heads.train.stream import MemoryPlan, MemorySettings, plan_memory

ONE_PROCESS = torchrun.OneProcess()
log = logging.getLogger(__name__)


# ---- run directory -----------------------------------------------------------------------------------------------
class RunExistsError(ValueError):
    """RUN holds a run made with other settings."""


@dataclass
class RunResult:
    path: Path
    rows: list[dict]
    settings: dict
    warnings: list[str]


class Run:
    """One run directory being produced: its identity (what decides the numbers), status in settings.json,
    trained heads saved as soon as they exist, results written last."""

    def __init__(self, out, cache, command: str, settings: TrainSettings, extra: dict, overwrite: bool,
                 plan: MemoryPlan | None = None):
        self.cache, self.timings = cache, {}
        self.lambdas = None     # the lambdas trained, once known (`--lambdas auto` resolves them after the warm-up)
        self.memory = None if plan is None else plan.describe()
        self.identity = {"command": command, "cache_fingerprint": cache.fingerprint,
                         "train": dataclasses.asdict(settings), **extra, **({} if plan is None else plan.identity())}
        self.digest = rundir.settings_hash(self.identity)
        self.out = Path(out) if out is not None else Path("runs") / f"{command}-{self.digest[:10]}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = rundir.lock_run(self.out)   # released by finish(), or when the process ends
        old = rundir.read_settings(self.out)
        if old is not None and old.get("settings_hash") != self.digest and not overwrite:
            before = old.get("identity", {})
            changed = sorted(k for k in set(self.identity) | set(before) if self.identity.get(k) != before.get(k))
            raise RunExistsError(f"{self.out} holds another run (it differs in: {', '.join(changed)}); "
                                 "choose another --out or pass --overwrite")
        if old is not None and old.get("settings_hash") != self.digest:
            rundir.clear_outputs(self.out)
        saved = None if overwrite else rundir.load_heads(self.out)
        self.saved = saved if saved is not None and saved["settings_hash"] == self.digest else None
        self.write_status("training")

    def write_status(self, status: str, **extra) -> dict:
        m = self.cache.manifest
        settings = {"settings_hash": self.digest, "status": status, "identity": self.identity,
                    "cache": {"path": str(self.cache.path), "fingerprint": self.cache.fingerprint,
                              "backbone": m.get("backbone"), "num_classes": m.get("num_classes"),
                              "dataset": m.get("dataset"),
                              "exits": [{k: e.get(k) for k in ("exit", "name", "dim", "cumulative_total_macs")}
                                        for e in m["exits"]]},
                    "timings": self.timings, **extra}
        if self.lambdas is not None:
            settings["lambdas"] = list(self.lambdas)
        if self.memory is not None:
            settings["memory"] = self.memory
        rundir.write_settings(self.out, settings)
        return settings

    def saved_groups(self, device) -> list[dict]:
        return [{**{k: g[k] for k in ("group", "settings", "trials", "seconds")},
                 "heads": StackedHeads.from_state_dict(g["state"], device)} for g in self.saved["groups"]]

    def save_groups(self, groups: list[dict]) -> None:
        """The heads, and the history of the groups trained now (RUN/history.parquet, in trial and epoch order)."""
        rundir.save_heads(self.out, [{**{k: g[k] for k in ("group", "settings", "trials", "seconds")},
                                      "state": g["heads"].state_dict()} for g in groups], self.digest)
        history = [r for g in groups for r in g.get("history", [])]
        if history:
            phases = {"warmup": 0, "bilevel": 1}
            history.sort(key=lambda r: (r["trial"], phases[r["phase"]], r["epoch"]))
            rundir.write_history(self.out, history, self.digest)

    def finish(self, session: Session, groups: list[dict], rows: list[dict], selected: set, thresholds,
               warn: bool) -> RunResult:
        """Marks the selected trials, adds their threshold curves and the single-exit references, writes
        results.parquet and the final settings.json."""
        start = time.perf_counter()
        # curves of the first pass (evaluate_trials) are kept for the selected trials only
        rows = [r for r in rows if r["method"] != "jei-threshold" or r["trial"] in selected]
        for row in rows:                            # a row may come marked already (fit: its chosen point only)
            row.setdefault("selected", row["method"] != "jei-threshold" and row["trial"] in selected)
        missing = set(selected) - {r["trial"] for r in rows if r["method"] == "jei-threshold"}
        for group in groups:
            if group["group"] != REFERENCE_GROUP and thresholds and missing:
                rows += evaluate_group(session, group, thresholds, only=missing)
        reference = next(g for g in groups if g["group"] == REFERENCE_GROUP)
        rows += single_exit_rows(session, reference)
        for row in rows:
            row.setdefault("selected", False)
        warnings = (lambda_range_warnings(rows, session.costs, cross_entropy(session, reference["heads"], "v2"))
                    if warn else [])
        self.timings["evaluate_seconds"] = self.timings.get("evaluate_seconds", 0.0) + time.perf_counter() - start
        settings = self.write_status("complete", warnings=warnings)
        rundir.write_results(self.out, rundir.uniform_rows(rows), settings)
        self.lock.release()
        return RunResult(self.out, rows, settings, warnings)


def trained_groups(run: Run | None, session: Session, settings: TrainSettings, lambdas, grid: tuple,
                   ranks=ONE_PROCESS) -> tuple[list[dict], list[dict]]:
    """The run's heads groups (sweep trials + the warm-up reference): the saved ones when the run directory holds
    heads of these settings, else trained now (auto lambdas resolved after the warm-up) and saved; and the groups
    this rank trained (under torchrun its share of every pass, merge_groups; run is None on ranks > 0, which get
    no merged groups)."""
    if run is not None and run.saved is not None:
        log.info(f"re-using the trained heads in {run.out} (same settings); delete {rundir.HEADS} there to retrain")
        groups = run.saved_groups(settings.device)
        run.lambdas = sorted({t["lam"] for g in groups for t in g["trials"]})
        return groups, groups
    start = time.perf_counter()
    chosen = ranks.broadcast(resolve_lambdas(session, settings, lambdas, grid, announce=run is not None))
    if run is not None:
        run.lambdas = chosen
        run.write_status("training")
    trials = expand_trials(chosen, grid)
    mine = train_groups(session, trials, grid, settings, share=(ranks.rank, ranks.world))
    if ranks.world > 1:
        parts = ranks.gather([{**g, "heads": g["heads"].state_dict()} for g in mine])
        groups = merge_groups(parts, settings.device) if run is not None else []
    else:
        groups = list(mine)
    if run is None:
        return groups, mine
    groups.append(reference_group(session, settings, trials))
    run.timings.update(train_seconds=time.perf_counter() - start, warmup_seconds=session.warm_seconds)
    run.save_groups(groups)
    return groups, mine


def merge_groups(parts: list[list[dict]], device) -> list[dict]:
    """The groups of a one-process run from every rank's share (heads as state dicts): per pass, the trials of all
    ranks in trial order (as train_groups stacks them in one process), heads likewise."""
    by_number = {}
    for part in parts:
        for g in part:
            by_number.setdefault(g["group"], []).append(g)
    merged = []
    for number in sorted(by_number, key=int):
        pieces = by_number[number]
        trials = [t for p in pieces for t in p["trials"]]
        order = sorted(range(len(trials)), key=lambda i: trials[i]["trial"])
        state = {k: torch.cat([p["heads"][k] for p in pieces]) for k in pieces[0]["heads"]}
        merged.append({"group": number, "settings": pieces[0]["settings"], "trials": [trials[i] for i in order],
                       "heads": StackedHeads.from_state_dict(state, device).select(order),
                       "seconds": max(p["seconds"] for p in pieces),
                       "history": [r for p in pieces for r in p.get("history", [])]})
    return merged


def run_sweep(cache_path, sweep: SweepSettings, settings: TrainSettings, out, command: str = "sweep",
              overwrite: bool = False, progress: bool = True,
              memory: MemorySettings = MemorySettings()) -> RunResult:
    """Train, evaluate and record every lambda x grid trial (module docstring)."""
    from cache.store import open_cache

    check_grid(settings, sweep.grid)
    ranks = torchrun.ranks_of_this_job()
    local = dataclasses.replace(settings, device=ranks.device(settings.device))
    ranks.start(local.device)
    try:
        with open_cache(cache_path) as cache:
            plan = plan_memory(cache, memory)
            extra = {"lambdas": lambda_identity(sweep.lambdas), "thresholds": list(sweep.thresholds),
                     "grid": {k: list(v) for k, v in sweep.grid}}
            run = _on_rank_0(ranks, lambda: Run(out, cache, command, settings, extra, overwrite, plan))
            if ranks.broadcast(run is not None and run.saved is not None):   # rank 0 only re-evaluates
                if ranks.rank:
                    return None
                ranks = ONE_PROCESS
            session = Session(cache, local, progress and ranks.rank == 0, plan)
            groups, mine = trained_groups(run, session, local, sweep.lambdas, sweep.grid, ranks)
            if run is not None:
                run.write_status("evaluating")
            start = time.perf_counter()
            rows = [row for part in ranks.gather(evaluate_trials(session, mine, sweep.thresholds)) for row in part]
            if run is None:
                return None
            run.timings["evaluate_seconds"] = run.timings.get("evaluate_seconds", 0.0) + time.perf_counter() - start
            return run.finish(session, groups, rows, select_per_lambda(rows), sweep.thresholds,
                              warn=len(run.lambdas) > 1)
    finally:
        ranks.close()


def _on_rank_0(ranks, make):
    """make() on rank 0 (None on the others); a failure there stops every rank (the others quietly)."""
    if ranks.rank == 0:
        try:
            made = make()
        except BaseException as err:
            ranks.broadcast({"error": str(err)})
            raise
        ranks.broadcast({})
        return made
    failed = ranks.broadcast()
    if "error" in failed:
        raise torchrun.OtherRankFailed(failed["error"])
    return None
