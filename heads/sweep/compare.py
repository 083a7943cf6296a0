"""`compare`: JEI-DNN and the paper's baselines and ablations from ONE feature cache, evaluated alike, in one run.

    python pipeline.py compare --cache CACHE --out RUN --lambdas 0.01:10 --methods jei,threshold,boosted,l2w
    python pipeline.py report RUN        # figures 2, 3, 5, 9 overlaid, matched_costs.csv
    result = run_compare("cache/x.zarr", CompareSettings(lambdas=(0.01, 0.1, 1.0)), TrainSettings(), "runs/cmp")

What runs, in order, sharing one loaded cache (heads/sweep/session.py Session) and ONE warm-up:
  warm-up   heads.train.bilevel.warmup for max_epochs epochs (snapshots after every epoch): JEI-DNN, fixed-ims and
            diffbranch start from its epoch-warmup_epochs snapshot, threshold-warmup gates exactly those IMs,
            "threshold" gates the IMs after all max_epochs epochs, and the single-exit reference rows are those
            same fully trained IMs (each at its best V2 epoch). The snapshot of epoch w does not depend on how many
            epochs follow, so the JEI-DNN rows equal those of `sweep` with the same settings. With
            warmup_patience (the default recipe) the warm-up stops once the IMs converge, and every user of a
            later snapshot gets the last one: JEI-DNN and both threshold methods then gate the same IMs.
  lambdas   `--lambdas auto` is resolved from that warm-up's IMs (heads/sweep/session.py resolve_lambdas) and used by
            jei, fixed-ims and diffbranch alike.
  jei       the lambda sweep of heads/sweep/ (train_groups, reference_group, evaluate_group, Run.finish): one
            stacked bi-level pass, rows "jei" (+ "jei-threshold" curves of the selected models) and "single-exit".
  baselines heads.baselines.methods.run_baselines, one method at a time (the learned-gate ones on the same lambdas),
            every operating point evaluated with heads.evaluation.evaluate.evaluate against the same per-exit costs.
  apart     the baselines that need no warm-up (APART: boosted, l2w) train from the start in a second process
            (heads/sweep/apart.py) when stage two runs on a CPU with 2 or more threads and the splits fit in memory
            twice: that process gets one thread and its own copy of the splits, this one the other threads, for the
            whole run (so the numbers do not depend on which finishes first). Their rows reach this process through
            RUN/methods/<m>.parquet, as a rerun's do. run_compare(parallel=False) (CLI --one-process) keeps
            everything in this process.
Rows and columns: heads/results/rundir.py (method, p for threshold-gated rows, lam for learned-gate rows).

Run directory and reruns: identical to `sweep` (settings.json with status and the requested `methods`, the JEI-DNN
heads in heads.safetensors, results.parquet last, every file written atomically), plus RUN/methods/<m>.parquet:
the evaluated rows of each baseline, written as soon as that method is done. The settings hash covers the cache,
the training settings, the lambdas, the gate thresholds and the baseline settings, NOT the methods list, because
a method's numbers do not depend on which others run; so a rerun into the same RUN (after a kill, or with more
methods) re-uses the saved JEI-DNN heads (re-evaluated) and every finished baseline, and trains only the rest.
--overwrite retrains everything.
"""
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from heads.results import rundir
from heads.baselines.common import BaselineSettings
from heads.baselines.methods import (LAMBDA_METHODS, METHODS, MethodPoint, fixed_ims_is_jei, gated_points,
                                     run_baselines, threshold_points)
from heads.evaluation.evaluate import evaluate_many
from heads.model.exits import exit_probabilities
from heads.results.matched import MATCHED_COSTS, envelope_at
from heads.sweep.apart import SecondProcess
from heads.sweep.lambdas import (DEFAULT_THRESHOLDS, AutoLambdas, SweepSettings, expand_trials, lambda_identity,
                                 lambda_values)
from heads.sweep.rows import evaluate_trials, select_per_lambda
from heads.sweep.session import REFERENCE_GROUP, Session, reference_group, resolve_lambdas, train_groups
from heads.sweep.sweep import Run, RunResult
from heads.baselines.thresholds import budget_sweep
from heads.train.stream import MemoryPlan, MemorySettings, plan_memory
from heads.train.bilevel import TrainSettings

BUDGET_METHOD = "jei-budget"
COMPARE_METHODS = ("jei", BUDGET_METHOD, *METHODS)
APART = ("boosted", "l2w")        # baselines that need no warm-up: the second process's (module doc)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareSettings:
    lambdas: "tuple[float, ...] | AutoLambdas"         # JEI-DNN's sweep, and the lambdas of fixed-ims / diffbranch
    methods: tuple[str, ...] = COMPARE_METHODS
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # gate thresholds of the selected JEI-DNN models' curves
    baselines: BaselineSettings = BaselineSettings()

    def __post_init__(self):
        object.__setattr__(self, "lambdas", lambda_values(self.lambdas))
        SweepSettings(self.lambdas, (), self.thresholds)       # the sweep's checks of lambdas and thresholds
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names from {', '.join(COMPARE_METHODS)}; got "
                             f"{', '.join(self.methods) or 'none'}")
        if BUDGET_METHOD in self.methods and "jei" not in self.methods:
            raise ValueError(f"{BUDGET_METHOD} moves JEI-DNN's trained models along the cost axis: it needs jei too")


def parse_methods(text: str) -> tuple[str, ...]:
    """"jei,threshold,..." -> the names in COMPARE_METHODS order; "all" -> every method."""
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if names == ["all"]:
        return COMPARE_METHODS
    unknown = [m for m in names if m not in COMPARE_METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from all, {', '.join(COMPARE_METHODS)}")
    return tuple(m for m in COMPARE_METHODS if m in names)


class CompareRun(Run):
    """A sweep run directory whose settings.json also lists the requested methods (kept out of the hash)."""

    def __init__(self, out, cache, settings: TrainSettings, compare: CompareSettings, overwrite: bool,
                 plan: MemoryPlan | None = None):
        self.methods = list(compare.methods)
        identity = {"lambdas": lambda_identity(compare.lambdas), "thresholds": list(compare.thresholds), "grid": {},
                    "baselines": dataclasses.asdict(compare.baselines)}
        super().__init__(out, cache, "compare", settings, identity, overwrite, plan)

    def write_status(self, status: str, **extra) -> dict:
        return super().write_status(status, methods=self.methods, **extra)


def shared_warmup(session: Session, settings: TrainSettings):
    """The one warm-up of the run: max_epochs epochs, held by the session for every later user (module doc)."""
    longer = dataclasses.replace(settings, max_epochs=settings.max_epochs + 1)
    return session.warmed(longer, [{"lam": 0.0, "warmup_epochs": settings.max_epochs}])


def _jei_groups(session: Session, run: CompareRun, compare: CompareSettings, settings: TrainSettings) -> list[dict]:
    """Saved heads groups when they hold what is asked (JEI-DNN when requested), else trained now and saved."""
    want_jei = "jei" in compare.methods
    saved = run.saved_groups(settings.device) if run.saved is not None else []
    if saved and (not want_jei or any(g["group"] != REFERENCE_GROUP for g in saved)):
        log.info(f"re-using the trained heads in {run.out} (same settings); delete {rundir.HEADS} there to retrain")
        return [g for g in saved if want_jei or g["group"] == REFERENCE_GROUP]
    trials = expand_trials(compare.lambdas, ())
    start = time.perf_counter()
    shared_warmup(session, settings)
    groups = train_groups(session, trials, (), settings) if want_jei else []
    groups.append(reference_group(session, settings, trials))
    run.timings.update(train_seconds=time.perf_counter() - start, warmup_seconds=session.warm_seconds)
    run.save_groups(groups)
    return groups


def budget_points(session: Session, groups: list[dict], selected: set, p_grid) -> list[MethodPoint]:
    """Method "jei-budget": one of JEI-DNN's selected models moved along the cost axis after training. Per-exit
    thresholds on its learned exit probabilities P(E^l|x) are fitted on V1 to each budget p of the MSDNet grid
    (heads/baselines/thresholds.py, as for the max-softmax baselines), instead of the fixed rule P(E^l|x) > 0.5. Of the
    selected models (one per lambda) the one whose V2 curve is most accurate on average over the matched costs is
    kept: selection on V2 only."""
    best = None
    for model in selected_models(session, groups, selected):
        score = _v2_curve_score(session, model.logits["v2"], model.labels["v2"], model.confidence, p_grid)
        if best is None or score > best[0]:
            best = (score, model)
    if best is None:
        return []
    model = best[1]
    return threshold_points(BUDGET_METHOD, model.logits, model.labels, p_grid, model.extra,
                            confidence=model.confidence)


class SelectedModel(NamedTuple):
    """One selected JEI-DNN model's outputs on V1, V2 and test: logits (N, L, K) numpy, labels (N,), its learned
    P(E^l|x) (N, L) float64, and the extra fields of its rows (lam, trial, epochs, train_seconds)."""
    logits: dict
    labels: dict
    confidence: dict
    extra: dict


def selected_models(session: Session, groups: list[dict], selected: set):
    """Yields a SelectedModel for every trial in `selected` of the JEI-DNN heads groups."""
    for group in groups:
        if group["group"] == REFERENCE_GROUP:
            continue
        for position, trial in enumerate(group["trials"]):
            if trial["trial"] not in selected:
                continue
            one = group["heads"].select(position)
            out = {split: session.outputs(one, split) for split in ("v1", "v2", "test")}
            yield SelectedModel({split: z[0] for split, (z, _, _) in out.items()},
                                {split: y for split, (_, _, y) in out.items()},
                                {split: exit_probabilities(p_g[0].double()) for split, (_, p_g, _) in out.items()},
                                {"train_seconds": group["seconds"] / len(group["trials"]),
                                 "epochs": int(one.epochs_trained[0]), "lam": trial["lam"], "trial": trial["trial"]})


def _v2_curve_score(session: Session, logits, labels, conf: dict, p_grid) -> float:
    """Mean V2 accuracy of a budgeted model's upper envelope at the matched costs (0 where it does not reach)."""
    ic_norm = session.costs / session.costs[-1]
    predicted = logits.argmax(-1)
    rows = np.arange(len(labels))
    points = [(float(ic_norm[pt["v2"]].mean()), float((predicted[rows, pt["v2"]] == labels).mean()))
              for pt in budget_sweep(conf["v1"], {"v2": conf["v2"]}, p_grid)]
    accuracy = envelope_at([c for c, _ in points], [a for _, a in points], MATCHED_COSTS)[0]
    return float(np.nan_to_num(accuracy, nan=0.0).mean())


def point_rows(session: Session, points: list[MethodPoint], settings: TrainSettings) -> list[dict]:
    """Two rows (v2, test) per operating point of one baseline method, evaluated like JEI-DNN's."""
    rows = []
    results = evaluate_many([(pt.v2, pt.test) for pt in points], session.costs)   # the points share logits
    for pt, metrics in zip(points, results):
        gated = pt.method in LAMBDA_METHODS
        base = {"method": pt.method, "trial": None, "lam": pt.param if gated else None,
                "p": None if gated else pt.param,
                "threshold": 0.5 if gated else math.nan, "lr": settings.lr, "weight_decay": settings.weight_decay,
                "warmup_epochs": settings.warmup_epochs if gated or pt.method == "threshold-warmup" else None,
                "epochs": int(pt.extra["epochs"]), "seconds": pt.extra["train_seconds"] / len(points)}
        if not gated:
            base.update(budget_fractions=pt.extra["fractions"], exit_thresholds=pt.extra["thresholds"],
                        v1_exit_hist=pt.extra["v1_exit_hist"])
        if pt.method == BUDGET_METHOD:
            base.update(trial=pt.extra["trial"], lam=pt.extra["lam"], warmup_epochs=settings.warmup_epochs)
        rows += [{**base, "split": split, **metrics[split]} for split in ("v2", "test")]
    return rows


def _jei_as_fixed_ims(session: Session, groups: list[dict], compare: CompareSettings,
                      settings: TrainSettings) -> dict | None:
    """JEI-DNN's heads group when it is exactly what fixed-ims would train (baselines.fixed_ims_is_jei, the same
    lambdas in the same order, from the same warm-up), else None."""
    if not fixed_ims_is_jei(session.data, settings):
        return None
    jei = [g for g in groups if g["group"] != REFERENCE_GROUP]
    if len(jei) != 1 or [t["lam"] for t in jei[0]["trials"]] != [float(x) for x in compare.lambdas]:
        return None
    return jei[0]


def _baseline_rows(session: Session, run: CompareRun, compare: CompareSettings, settings: TrainSettings,
                   groups: list[dict], reuse: bool, apart: "SecondProcess | None" = None) -> list[dict]:
    test = session.test
    by_method, seconds = {}, run.timings.setdefault("baseline_seconds", {})
    methods = [m for m in compare.methods if m in METHODS]
    away = apart.job.methods if apart is not None else ()
    # this process's own methods first, then the second process's: waiting for it comes last
    for method in tqdm(sorted(methods, key=lambda m: m in away), desc="baselines", unit="method", leave=False,
                       disable=not session.progress):
        if method in away:
            if not apart.ready():
                log.info(f"waiting for the second process ({apart.what})")
            seconds.update(apart.result())        # the second process's methods: wait, then read their rows
            done = rundir.read_part(run.out, method, run.digest)
            if done is None:
                raise RuntimeError(f"the second process finished without writing {run.out / rundir.PARTS}/"
                                   f"{method}.parquet; rerun with --one-process")
        elif (done := rundir.read_part(run.out, method, run.digest) if reuse else None) is not None:
            log.info(f"re-using the finished {method} rows in {run.out / rundir.PARTS}")
        else:
            start = time.perf_counter()
            jei = _jei_as_fixed_ims(session, groups, compare, settings) if method == "fixed-ims" else None
            if jei is not None:
                log.info("fixed-ims: under these settings JEI-DNN never leaves the GATE state, so its models are these")
                points = gated_points(method, jei["heads"], compare.lambdas, session.data.v2, test,
                                      {"train_seconds": jei["seconds"]})
            else:
                points = run_baselines(session.data, test, [method], settings, compare.baselines, compare.lambdas,
                                       warm=shared_warmup(session, settings))
            done = point_rows(session, points, settings)
            seconds[method] = time.perf_counter() - start
            rundir.write_part(run.out, method, done, run.digest)
            run.write_status("training")        # the timings so far
        by_method[method] = done
    return [row for method in methods for row in by_method[method]]


@dataclass(frozen=True)
class ApartJob:
    """What the second process needs: it opens the cache itself and places the splits as this process does."""
    cache_path: str
    out: str
    digest: str
    methods: tuple[str, ...]
    settings: TrainSettings
    baselines: BaselineSettings
    plan: MemoryPlan


def train_apart(job: ApartJob) -> dict:
    """The second process's work: each of job.methods trained, evaluated and written to RUN/methods/<m>.parquet as
    soon as it is done, exactly as _baseline_rows does it in one process; returns {method: seconds}."""
    from cache.store import open_cache

    seconds = {}
    with open_cache(job.cache_path) as cache:
        session = Session(cache, job.settings, progress=False, plan=job.plan)
        for method in job.methods:
            start = time.perf_counter()
            points = run_baselines(session.data, session.test, [method], job.settings, job.baselines)
            rows = point_rows(session, points, job.settings)
            seconds[method] = time.perf_counter() - start
            rundir.write_part(Path(job.out), method, rows, job.digest)
    return seconds


def _start_apart(cache_path, run: CompareRun, compare: CompareSettings, settings: TrainSettings, plan: MemoryPlan,
                 reuse: bool, parallel: bool) -> SecondProcess | None:
    """The second process for the APART methods still to train, or None (module doc: when it is used)."""
    if not parallel or torch.device(settings.device).type != "cpu" or torch.get_num_threads() < 2:
        return None
    methods = tuple(m for m in compare.methods if m in APART
                    and not (reuse and rundir.read_part(run.out, m, run.digest) is not None))
    if not methods:
        return None
    held = sum(b for split, b in plan.split_bytes.items() if plan.resident[split])
    if 2 * held > plan.budget_bytes:   # said, being the one reason a user can act on
        log.info(f"{', '.join(methods)} train in this process: the resident splits ({held / 2 ** 30:.2f} GiB) do "
                 f"not fit twice in the memory budget ({plan.budget_bytes / 2 ** 30:.2f} GiB, --memory-budget)")
        return None
    log.info(f"{', '.join(methods)} train in a second process on one of the {torch.get_num_threads()} threads")
    job = ApartJob(str(cache_path), str(run.out), run.digest, methods, settings, compare.baselines, plan)
    return SecondProcess(train_apart, job, " and ".join(methods))


def run_compare(cache_path, compare: CompareSettings, settings: TrainSettings, out, overwrite: bool = False,
                progress: bool = True, memory: MemorySettings = MemorySettings(), parallel: bool = False
                ) -> RunResult:
    """Train, evaluate and record every requested method (module docstring); returns the run's rows. parallel:
    train the APART methods in a second process when the machine allows it (the CLI's default; this function's
    is False, one process)."""
    from cache.store import open_cache

    threads = torch.get_num_threads()
    apart = None
    try:
        with open_cache(cache_path) as cache:
            plan = plan_memory(cache, memory)
            run = CompareRun(out, cache, settings, compare, overwrite, plan)
            apart = _start_apart(cache_path, run, compare, settings, plan, not overwrite, parallel)
            if apart is not None:
                torch.set_num_threads(threads - 1)   # the second process has one; for the whole run (module doc)
            session = Session(cache, settings, progress, plan)
            saved = [t["lam"] for g in (run.saved or {}).get("groups", []) for t in g["trials"]]
            if saved:                                                 # the lambdas those heads were trained for
                run.lambdas = sorted(set(saved))
            else:
                if isinstance(compare.lambdas, AutoLambdas):
                    shared_warmup(session, settings)                  # first: the auto lambdas start from its IMs
                run.lambdas = resolve_lambdas(session, settings, compare.lambdas, ())
            compare = dataclasses.replace(compare, lambdas=tuple(run.lambdas))
            run.write_status("training")
            groups = _jei_groups(session, run, compare, settings)
            baseline_rows = _baseline_rows(session, run, compare, settings, groups, not overwrite, apart)
            run.write_status("evaluating")
            start = time.perf_counter()
            rows = evaluate_trials(session, groups, compare.thresholds)
            selected = select_per_lambda(rows)
            if BUDGET_METHOD in compare.methods:
                rows += point_rows(session, budget_points(session, groups, selected, compare.baselines.p_grid),
                                   settings)
            run.timings["evaluate_seconds"] = time.perf_counter() - start
            return run.finish(session, groups, rows + baseline_rows, selected, compare.thresholds,
                              warn="jei" in compare.methods and len(compare.lambdas) > 1)
    finally:
        if apart is not None:
            apart.stop()
            torch.set_num_threads(threads)
