"""Lambda sweeps and hyperparameter grids of JEI-DNN heads, written to a run directory (cost-targeted fits:
heads/sweep/fit.py).

    lambdas = parse_lambdas("0.01:10")                             # 20 log-spaced points
    grid = parse_grid(["warmup_epochs=1:5", "lr=0.01,0.003"])      # {"warmup_epochs": (1..5), "lr": (...)}
    run = run_sweep("cache/x.zarr", SweepSettings(tuple(lambdas), grid_items(grid)), TrainSettings(), "runs/a")

A sweep is: the lambda-independent warm-up once (one pass serves every warm-up epoch count and every (lr, weight
decay) pair of the grid, heads.train.bilevel.warmup), then every lambda x grid trial in ONE stacked bi-level pass
(heads.train.bilevel.train_stack: lr, weight_decay and warmup_epochs vary per trial inside a stack; a grid over any other
TrainSettings field needs its own stacked pass per value), each trial early-stopped on its own. Every trial is
then evaluated on V2 and test (heads.evaluation.evaluate.evaluate), the trial with the best V2 accuracy of each lambda is
marked `selected`, the selected models also trace gate-threshold curves (method "jei-threshold"), and the warm-up
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
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import torchrun
from heads.results import rundir
from heads.evaluation.evaluate import ExitOutputs, evaluate_many
from heads.model.exits import exit_decision, exit_distribution
from heads.train.kernels import exit_cross_entropy
from heads.model.stack import StackedHeads
from heads.train.stream import MemoryPlan, MemorySettings, plan_memory
from heads.train.bilevel import (TRIAL_KEYS, EpochReport, TrainSettings, make_train_data, open_split, split_outputs,
                         train_stack, warmup)

LAMBDA_FORMS = ("A:B (20 log-spaced points), A:B:N (N points), a,b,c (a list) or one value, all > 0 and A < B; or "
                "auto, auto:N (N lambdas chosen after the warm-up)")
AUTO_POINTS = 12             # lambdas of `--lambdas auto`
AUTO_FIRST_SHARE = 0.99      # the largest auto lambda's targets send at least this share of V1 to exit 1
AUTO_LOW_SLACK = 0.01        # the smallest one's targets ask for the cost lambda -> 0 asks for, less this
DEFAULT_THRESHOLDS = (0.2, 0.35, 0.65, 0.8)   # gate thresholds besides 0.5 for the selected models' curves
WARMUP_FIELDS = ("batch_size", "seed", "device", "warmup_patience")   # the TrainSettings fields the warm-up depends on
REFERENCE_GROUP = "warmup"                         # heads group holding the warm-up IMs (single-exit rows)
ONE_PROCESS = torchrun.OneProcess()

log = logging.getLogger(__name__)


# ---- parsing ---------------------------------------------------------------------------------------------------
def _number(text: str, what: str, kind=float, positive=True):
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{what} {text.strip()!r} must be {'> 0' if positive else '>= 0'}")
    return value


def _log_range(text: str, default_points: int | None, what: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3 and (len(parts) != 2 or default_points is None):
        raise ValueError(f"{what} {text!r} is not of the form A:B{'[:N]' if default_points else ':N'}")
    low, high = (_number(p, what) for p in parts[:2])
    if low >= high:
        raise ValueError(f"{what} {text!r} needs A < B")
    points = _number(parts[2], f"{what} point count", int) if len(parts) == 3 else default_points
    return [float(v) for v in np.geomspace(low, high, points)]


@dataclass(frozen=True)
class AutoLambdas:
    """`--lambdas auto[:N]`: N lambdas chosen after the warm-up from the cache's costs and the warm-up IMs' losses
    (auto_lambdas); a run records this spec in its identity and the chosen values in settings.json and its rows."""
    points: int = AUTO_POINTS

    def __post_init__(self):
        if not 2 <= self.points <= 10_000:
            raise ValueError(f"auto:N needs 2 <= N <= 10000, got {self.points}")

    def __str__(self) -> str:
        return f"auto:{self.points}"


def parse_lambda_spec(text: str) -> "list[float] | AutoLambdas":
    """parse_lambdas, plus `auto` and `auto:N` (AutoLambdas)."""
    head, _, count = str(text).strip().partition(":")
    if head.strip().lower() != "auto":
        return parse_lambdas(text)
    try:
        return AutoLambdas(_number(count, "auto point count", int) if count else AUTO_POINTS)
    except ValueError as err:
        raise ValueError(f"invalid lambdas {str(text).strip()!r} ({err}); accepted: {LAMBDA_FORMS}") from None


def parse_lambdas(text: str) -> list[float]:
    """`A:B` -> 20 log-spaced points, `A:B:N` -> N points, `a,b,c` -> the list, `x` -> [x]; sorted, unique."""
    text = str(text).strip()
    try:
        if ":" in text:
            values = _log_range(text, 20, "range")
        else:
            values = [_number(part, "lambda") for part in text.split(",")]
    except ValueError as err:
        raise ValueError(f"invalid lambdas {text!r} ({err}); accepted: {LAMBDA_FORMS}") from None
    return sorted(set(values))


def _grid_types() -> dict[str, type]:
    """Grid keys: every TrainSettings field but the device, with the type of its default."""
    return {f.name: type(f.default) for f in dataclasses.fields(TrainSettings) if f.name != "device"}


def _grid_values(key: str, kind: type, text: str) -> tuple:
    if kind is int and ":" in text:                                     # integer range, both ends included
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"{key}={text}: an integer range is A:B (both included)")
        low, high = (_number(p, key, int, positive=False) for p in parts)
        if low > high:
            raise ValueError(f"{key}={text}: needs A <= B")
        return tuple(range(low, high + 1))
    if kind is float and ":" in text:
        return tuple(_log_range(text, None, key))
    items = [p.strip() for p in text.split(",")]
    if kind is bool:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if any(p.lower() not in truth for p in items):
            raise ValueError(f"{key}={text}: booleans are true/false")
        return tuple(dict.fromkeys(truth[p.lower()] for p in items))
    if kind in (int, float):
        return tuple(dict.fromkeys(_number(p, key, kind, positive=False) for p in items))
    if not all(items):
        raise ValueError(f"{key}={text}: empty value")
    return tuple(dict.fromkeys(items))


def parse_grid(items) -> dict[str, tuple]:
    """["key=values", ...] -> {key: values}. Values: `a,b,c`; integer fields also `A:B` (inclusive range);
    float fields also `A:B:N` (N log-spaced points). Keys: TrainSettings fields except device."""
    types, grid = _grid_types(), {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not text.strip():
            raise ValueError(f"invalid grid {item!r}: expected key=values, e.g. lr=0.01,0.003 or warmup_epochs=1:5")
        if key not in types:
            raise ValueError(f"unknown grid key {key!r}; known: {', '.join(types)}")
        if key in grid:
            raise ValueError(f"grid key {key!r} given twice")
        grid[key] = _grid_values(key, types[key], text.strip())
    return grid


def grid_items(grid: dict) -> tuple:
    """A grid dict as the hashable tuple SweepSettings holds."""
    return tuple((k, tuple(v)) for k, v in grid.items())


@dataclass(frozen=True)
class SweepSettings:
    lambdas: "tuple[float, ...] | AutoLambdas"
    grid: tuple[tuple[str, tuple], ...] = ()     # ((key, values), ...): every combination is a trial per lambda
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    def __post_init__(self):
        object.__setattr__(self, "lambdas", lambda_values(self.lambdas))
        if not isinstance(self.lambdas, AutoLambdas) and (
                not self.lambdas or any(not (lam > 0 and math.isfinite(lam)) for lam in self.lambdas)):
            raise ValueError(f"lambdas must be finite and > 0, got {self.lambdas}")
        if any(not 0 < t < 1 for t in self.thresholds):
            raise ValueError(f"gate thresholds must lie in (0, 1), got {self.thresholds}")


def lambda_values(lambdas) -> "tuple[float, ...] | AutoLambdas":
    """Lambdas as the settings classes hold them (hashable): the auto spec as it is, any sequence as a tuple."""
    return lambdas if isinstance(lambdas, AutoLambdas) else tuple(lambdas)


def lambda_identity(lambdas) -> "list[float] | str":
    """How a run's identity records its lambdas: the list, or the auto spec (its values follow from the rest)."""
    return str(lambdas) if isinstance(lambdas, AutoLambdas) else list(lambdas)


def expand_trials(lambdas, grid: tuple, start: int = 0) -> list[dict]:
    """One dict per (lambda, grid combination): {"trial": id, "lam": lam, key: value, ...}."""
    keys = [k for k, _ in grid]
    combos = list(itertools.product(*[v for _, v in grid])) if grid else [()]
    trials = []
    for lam in lambdas:
        for combo in combos:
            trials.append({"trial": start + len(trials), "lam": float(lam), **dict(zip(keys, combo))})
    return trials


def check_grid(settings: TrainSettings, grid: tuple) -> None:
    """Every combination must give valid TrainSettings (e.g. warmup_epochs < max_epochs)."""
    for combo in expand_trials([1.0], grid):
        values = {k: v for k, v in combo.items() if k not in ("trial", "lam")}
        try:
            dataclasses.replace(settings, **values)
        except ValueError as err:
            raise ValueError(f"grid combination {values}: {err}") from None


# ---- progress --------------------------------------------------------------------------------------------------
class EpochBar:
    """The tqdm bar of one phase ("warmup" or "bilevel"), fed by heads.train.bilevel's per-epoch reports. Bi-level
    postfix: per lambda (ascending) the best V2 accuracy / normalised cost over that lambda's trials, in percent,
    and how many trials still train."""

    def __init__(self, phase: str, total: int, lambdas: list[float], enabled: bool = True):
        self.lambdas = lambdas
        self.bar = tqdm(total=total, desc=phase, unit="epoch", leave=False, dynamic_ncols=True,
                        disable=not enabled)

    def __call__(self, report: EpochReport):
        self.bar.update(1)
        if report.phase == "warmup":
            self.bar.set_postfix_str("IM acc% " + " ".join(f"{100 * a:.0f}" for a in report.accuracy))
            return
        best = {}
        for lam, acc, cost in zip(self.lambdas, report.accuracy, report.cost):
            if lam not in best or acc > best[lam][0]:
                best[lam] = (acc, cost)
        cells = " ".join(f"{100 * a:.0f}/{100 * c:.0f}" for _, (a, c) in sorted(best.items()))
        self.bar.set_postfix_str(f"active {sum(report.active)}/{len(report.active)} acc/cost% {cells}")

    def close(self):
        self.bar.close()


# ---- training ----------------------------------------------------------------------------------------------------
class Session:
    """One cache loaded for stage two: train/V1/V2 tensors, the test split, the per-exit costs, and the warm-ups
    (one per distinct WARMUP_FIELDS values), computed on first use and shared by every later stacked pass."""

    def __init__(self, cache, settings: TrainSettings, progress: bool = True, plan: MemoryPlan | None = None):
        self.progress, self.plan = progress, plan
        self.data = make_train_data(cache, settings.device, plan=plan)
        self.test = open_split(cache, "test", plan, settings.device)   # float16 as stored; float32 per chunk
        if len(self.test) == 0:
            raise ValueError(f"{cache.path} has an empty test split")
        self.test_labels = self.test.labels.cpu().numpy()
        self.costs = np.array([float(e["cumulative_total_macs"]) for e in cache.manifest["exits"]])
        self.warm, self.warm_seconds = {}, 0.0

    def warmed(self, settings: TrainSettings, trials: list[dict]):
        key = _warm_key(settings)
        if key not in self.warm:
            start = time.perf_counter()
            bar = EpochBar("warmup", max(t.get("warmup_epochs", settings.warmup_epochs) for t in trials), [],
                           self.progress)
            self.warm[key] = warmup(self.data, settings, bar, trials=[_trial_args(t) for t in trials])
            bar.close()
            self.warm_seconds += time.perf_counter() - start
        return self.warm[key]

    def outputs(self, heads: StackedHeads, split: str):
        """(logits (T, N, L, K) numpy, P(G|x) (T, N, L) cpu tensor, labels (N,) numpy) of "v1", "v2" or "test"."""
        part = self.test if split == "test" else getattr(self.data, split)
        logits, g = split_outputs(heads, part)
        labels = self.test_labels if split == "test" else part.labels.cpu().numpy()
        return logits.cpu().numpy(), exit_distribution(g).cpu(), labels


def _warm_key(settings: TrainSettings) -> tuple:
    return tuple(getattr(settings, f) for f in WARMUP_FIELDS)


def _trial_args(trial: dict) -> dict:
    return {k: v for k, v in trial.items() if k in TRIAL_KEYS}


def train_groups(session: Session, trials: list[dict], grid: tuple, settings: TrainSettings,
                 first_group: int = 0, share: tuple[int, int] = (0, 1)) -> list[dict]:
    """Trains every trial. Trials that differ only in stackable keys (heads.train.bilevel.TRIAL_KEYS) share one stacked
    pass; returns one heads group per pass: {"group", "settings", "trials", "heads", "seconds"}. share = (rank,
    world): only every world-th trial of each pass from the rank-th on (the warm-ups are those of all trials)."""
    fixed_keys = [k for k, _ in grid if k not in TRIAL_KEYS]
    passes = {}
    for trial in trials:
        passes.setdefault(tuple(trial[k] for k in fixed_keys), []).append(trial)
    plan = [(dataclasses.replace(settings, **dict(zip(fixed_keys, key))), members) for key, members in passes.items()]
    groups = []
    for number, (pass_settings, members) in enumerate(plan, start=first_group):
        sharing = [(s, ms) for s, ms in plan if _warm_key(s) == _warm_key(pass_settings)]
        warm = session.warmed(dataclasses.replace(pass_settings, max_epochs=max(s.max_epochs for s, _ in sharing)),
                              [t for _, ms in sharing for t in ms])
        members = members[share[0]::share[1]]
        if not members:
            continue
        budget = max(pass_settings.max_epochs - t.get("warmup_epochs", pass_settings.warmup_epochs) for t in members)
        bar = EpochBar("bilevel", budget, [t["lam"] for t in members], session.progress)
        identity = [_history_identity(str(number), t, pass_settings) for t in members]
        history, kept = warmup_history(warm, identity), [math.inf] * len(members)
        budgets = [pass_settings.max_epochs - t["warmup_epochs"] for t in identity]

        def progress(report: EpochReport, bar=bar, identity=identity, history=history, kept=kept, budgets=budgets):
            bar(report)
            history.extend(bilevel_history(report, identity, kept, budgets))
        start = time.perf_counter()
        heads = train_stack(session.data, warm, [_trial_args(t) for t in members], pass_settings, progress)
        bar.close()
        groups.append({"group": str(number), "settings": dataclasses.asdict(pass_settings), "trials": members,
                       "heads": heads, "seconds": time.perf_counter() - start, "history": history})
    return groups


# ---- training history (RUN/history.parquet, columns: heads/results/rundir.py) ----------------------------------------
def _history_identity(group: str, trial: dict, settings: TrainSettings) -> dict:
    """What identifies a trial in its history rows: trial id, pass, lam, lr, weight decay, warm-up epochs and any
    other gridded value (as in results.parquet)."""
    return {"trial": trial["trial"], "group": group, "lam": trial["lam"],
            **{k: getattr(settings, k) for k in TRIAL_KEYS if k != "lam"},
            **{k: v for k, v in trial.items() if k not in ("trial", "lam")}}


def warmup_history(warm, identity: list[dict]) -> list[dict]:
    """Per trial, one row per warm-up epoch it starts from (1..its warmup_epochs, at most the epochs the warm-up
    ran), from the WarmState's per-epoch V2 accuracies of its (lr, weight decay) pair."""
    rows = []
    for ident in identity:
        j = warm.optim.index((ident["lr"], ident["weight_decay"]))
        accuracy = warm.v2_accuracy[:, j].double()                         # (epochs, n_ims)
        best = accuracy.cummax(0).values
        for w in range(min(int(ident["warmup_epochs"]), warm.epochs)):
            rows.append({**ident, "phase": "warmup", "epoch": w + 1, "accuracy": float(accuracy[w].mean()),
                         "cost": math.nan, "objective": math.nan, "best_accuracy": float(best[w].mean()),
                         "best_cost": math.nan, "best_objective": math.nan, "improved": None, "active": None,
                         "im_accuracy": accuracy[w].tolist()})
    return rows


def bilevel_history(report: EpochReport, identity: list[dict], kept: list[float], budgets: list[int]) -> list[dict]:
    """One row per trial that trained in this bi-level epoch (its current and kept V2 values); kept: each trial's
    best objective before this epoch, updated (heads.train.train_stack keeps a state whose objective is lower);
    budgets: each trial's bi-level epochs at most."""
    rows = []
    for i, ident in enumerate(identity):
        if math.isnan(report.epoch_objective[i]):
            continue
        improved, kept[i] = report.epoch_objective[i] < kept[i], report.objective[i]
        rows.append({**ident, "phase": "bilevel", "epoch": report.epoch, "accuracy": report.epoch_accuracy[i],
                     "cost": report.epoch_cost[i], "objective": report.epoch_objective[i],
                     "best_accuracy": report.accuracy[i], "best_cost": report.cost[i],
                     "best_objective": report.objective[i],
                     "improved": improved, "active": report.active[i] and report.epoch < budgets[i],
                     "im_accuracy": None})
    return rows


def warm_heads(session: Session, settings: TrainSettings, warm,
               epochs: int | None = None) -> tuple[StackedHeads, tuple[float, float]]:
    """A one-trial heads stack, and its (lr, weight decay), holding the warm-up IMs of settings' (lr, weight
    decay), or of the first pair warmed when that one was not, after `epochs` warm-up epochs (default: all), each
    IM at its best V2 epoch so far."""
    pair = (settings.lr, settings.weight_decay)
    lr, wd = pair if pair in warm.optim else warm.optim[0]
    epochs = warm.epochs if epochs is None else min(epochs, warm.epochs)
    return warm.start_heads(session.data, [(lr, wd, epochs)], settings.seed, settings.device), (lr, wd)


def reference_group(session: Session, settings: TrainSettings, trials: list[dict]) -> dict:
    """The warm-up IMs after the whole warm-up (each at its best V2 epoch) as a one-trial heads group."""
    heads, (lr, wd) = warm_heads(session, settings, session.warmed(settings, trials))
    return {"group": REFERENCE_GROUP, "settings": {**dataclasses.asdict(settings), "lr": lr, "weight_decay": wd},
            "trials": [], "heads": heads, "seconds": session.warm_seconds}


# ---- evaluation --------------------------------------------------------------------------------------------------
def _evaluate(session: Session, v2, test, exits) -> list[dict]:
    """v2/test: (logits (N, L, K), labels) of one model; exits: (v2 exit, test exit) per exit rule, evaluated
    together (heads.evaluation.evaluate.evaluate_many shares the work that depends on the logits alone)."""
    return evaluate_many([(ExitOutputs(v2[0], v2_exit, v2[1]), ExitOutputs(test[0], test_exit, test[1]))
                          for v2_exit, test_exit in exits], session.costs)


def evaluate_group(session: Session, group: dict, thresholds=(0.5,), only=None) -> list[dict]:
    """Rows (v2 and test) of every trial of a heads group (or of the trial ids in `only`), at each gate threshold:
    method "jei" at 0.5, "jei-threshold" otherwise."""
    heads, rows = group["heads"], []
    for position, trial in enumerate(group["trials"]):
        if only is not None and trial["trial"] not in only:
            continue
        one = heads.select(position)
        (v2, v2_pg, v2_y), (test, test_pg, test_y) = session.outputs(one, "v2"), session.outputs(one, "test")
        results = _evaluate(session, (v2[0], v2_y), (test[0], test_y),
                            [(exit_decision(v2_pg[0], threshold).numpy(), exit_decision(test_pg[0], threshold).numpy())
                             for threshold in thresholds])
        for threshold, result in zip(thresholds, results):
            for split in ("v2", "test"):
                rows.append({"method": "jei" if threshold == 0.5 else "jei-threshold", "split": split,
                             "trial": trial["trial"], "lam": trial["lam"], "threshold": threshold,
                             **{k: group["settings"][k] for k in TRIAL_KEYS if k != "lam"},
                             **{k: v for k, v in trial.items() if k not in ("trial", "lam")},
                             "epochs": int(heads.epochs_trained[position]),
                             "seconds": group["seconds"] / len(group["trials"]), **result[split]})
    return rows


def evaluate_trials(session: Session, groups: list[dict], thresholds=()) -> list[dict]:
    """The first evaluation of a run's trials (every group but the reference): rows at threshold 0.5, and when no
    lambda has more than one trial here (no grid: each will be selected), the curves at `thresholds` in the same
    pass, sharing each trial's outputs; Run.finish adds the curves of selected trials that lack them and drops
    those of trials not selected."""
    trained = [g for g in groups if g["group"] != REFERENCE_GROUP]
    lambdas = [t["lam"] for g in trained for t in g["trials"]]
    curves = tuple(t for t in thresholds if t != 0.5) if len(lambdas) == len(set(lambdas)) else ()
    return [row for g in trained for row in evaluate_group(session, g, (0.5, *curves))]


def single_exit_rows(session: Session, group: dict) -> list[dict]:
    """One row per exit and split: every sample exits there (warm-up IMs; the backbone's head at exit L)."""
    heads = group["heads"]
    (v2, _, v2_y), (test, _, test_y) = session.outputs(heads, "v2"), session.outputs(heads, "test")
    warm_epochs, rows = int(heads.epochs_trained[0]), []
    results = _evaluate(session, (v2[0], v2_y), (test[0], test_y),
                        [(np.full(len(v2_y), exit_), np.full(len(test_y), exit_)) for exit_ in range(heads.n_exits)])
    for exit_, result in enumerate(results):
        for split in ("v2", "test"):
            rows.append({"method": "single-exit", "split": split, "exit": exit_ + 1, "threshold": math.nan,
                         "warmup_epochs": warm_epochs, "lr": group["settings"]["lr"],
                         "weight_decay": group["settings"]["weight_decay"], "epochs": warm_epochs,
                         "seconds": group["seconds"], **result[split]})
    return rows


def select_per_lambda(rows: list[dict]) -> set[int]:
    """Trial ids with the best V2 accuracy among the trials of their lambda (ties: cheaper, then lower id)."""
    best = {}
    for r in rows:
        if r["method"] == "jei" and r["split"] == "v2":
            key = (r["accuracy"], -r["cost_norm"], -r["trial"])
            if r["lam"] not in best or key > best[r["lam"]][0]:
                best[r["lam"]] = (key, r["trial"])
    return {trial for _, trial in best.values()}


def target_cost(ce: np.ndarray, ic_norm: np.ndarray, lam: float) -> float:
    """Mean normalised cost of the exits the surrogate targets pick at `lam`: per sample (rows of ce, (N, L)
    per-exit cross-entropies) l* = argmin_l CE_l + lam IC_norm^l (section 4.1)."""
    return float(ic_norm[np.argmin(ce + lam * ic_norm[None, :], axis=1)].mean())


def auto_lambdas(ce: np.ndarray, ic_norm: np.ndarray, points: int, first_share: float = AUTO_FIRST_SHARE,
                 slack: float = AUTO_LOW_SLACK) -> list[float]:
    """`--lambdas auto`: `points` log-spaced lambdas whose surrogate targets (target_cost; ce (N, L) per-exit
    cross-entropies of the warm-up IMs on V1) span the cost axis. The largest sends at least first_share of the
    samples to exit 1: per sample, exit 1 is the argmin of CE_l + lam IC_norm^l once lam >= max_l (CE_1 - CE_l) /
    (IC_norm^l - IC_norm^1), and the largest is that quantile. The smallest is the largest lambda whose targets ask
    for no less than `slack` below what lam -> 0 asks (the most accurate exits the targets know): trained gates
    spend less than their targets ask, so the accurate end needs the targets' own accurate end, not merely the
    cost of the best single exit."""
    ce, ic_norm = np.asarray(ce, dtype=np.float64), np.asarray(ic_norm, dtype=np.float64)
    gain = (ce[:, :1] - ce[:, 1:]) / (ic_norm[None, 1:] - ic_norm[0])
    per_sample = np.maximum(gain.max(axis=1), 0.0)
    high = float(np.quantile(per_sample, first_share))
    positive = per_sample[per_sample > 0]
    if high <= 0 or positive.size == 0:      # exit 1 already wins everywhere: any small range spans nothing
        high = max(high, 1e-3)
        return [float(v) for v in np.geomspace(high / 1e3, high, points)]
    goal = target_cost(ce, ic_norm, 0.0) - slack
    low, top = float(positive.min()) * 1e-3, high          # target_cost(low) is target_cost(0): no gain is that small
    for _ in range(60):                                    # target_cost falls as lambda grows: bisect in log space
        mid = math.sqrt(low * top)
        if target_cost(ce, ic_norm, mid) >= goal:
            low = mid
        else:
            top = mid
    return [float(v) for v in np.geomspace(min(low, high / 10), high, points)]


def cross_entropy(session: Session, heads: StackedHeads, split: str) -> np.ndarray:
    """(N, L) per-exit cross-entropy on a split ("v1", "v2", "test") of a one-trial heads stack."""
    logits, _, labels = session.outputs(heads, split)
    return exit_cross_entropy(torch.from_numpy(logits[0]).double(), torch.from_numpy(labels).long()).numpy()


def resolve_lambdas(session: Session, settings: TrainSettings, spec, grid: tuple = (),
                    announce: bool = True) -> list[float]:
    """Explicit lambdas as given; AutoLambdas from the warm-up (run first when needed) of the IMs the bi-level phase
    starts from: auto_lambdas on their V1 losses (logged at INFO when `announce`, else at DEBUG)."""
    if not isinstance(spec, AutoLambdas):
        return sorted(float(x) for x in spec)
    warm = session.warmed(settings, expand_trials([1.0], grid))
    heads, _ = warm_heads(session, settings, warm, settings.warmup_epochs)
    logits, _, labels = session.outputs(heads, "v2")
    accuracy = (logits[0].argmax(-1) == labels[:, None]).mean(0)
    ic_norm = session.costs / session.costs[-1]
    best = int(np.argmax(accuracy))
    ce = cross_entropy(session, heads, "v1")
    lambdas = auto_lambdas(ce, ic_norm, spec.points)
    say = log.info if announce else log.debug
    say(f"lambdas auto: {spec.points} from {lambdas[0]:.3g} to {lambdas[-1]:.3g}; the targets ask for cost "
        f"{target_cost(ce, ic_norm, lambdas[0]):.3f} to {target_cost(ce, ic_norm, lambdas[-1]):.3f} on V1 (the best "
        f"single exit on V2: exit {best + 1} at cost {ic_norm[best]:.3f})")
    return lambdas


def lambda_range_warnings(rows: list[dict], costs: np.ndarray, ce: np.ndarray | None = None) -> list[str]:
    """Whether the selected models cover the cost axis (on V2): the smallest lambda should be as accurate as the
    best single exit unless it already costs ~ the full network; the largest should come down near the first
    exit's cost. Each miss gives a warning; the last line suggests a wider range. ce (N, L): V2 per-exit
    cross-entropies of the warm-up IMs; with it, a miss at the accurate end that a smaller lambda is unlikely to
    fix says so instead of suggesting one: when the targets at the smallest lambda already equal those at
    lambda -> 0, or when the trained model spends much less (> 0.1 of IC^L) than its own targets ask for."""
    chosen = sorted((r for r in rows if r["method"] == "jei" and r["split"] == "v2" and r["selected"]),
                    key=lambda r: r["lam"])
    singles = [r["accuracy"] for r in rows if r["method"] == "single-exit" and r["split"] == "v2"]
    if len(chosen) < 2 or not singles:
        return []
    low, high, first = chosen[0], chosen[-1], costs[0] / costs[-1]
    lo_lam, hi_lam, found = low["lam"], high["lam"], []
    if low["cost_norm"] < 0.9 and low["accuracy"] < max(singles):
        miss = (f"the smallest lambda {low['lam']:.3g} already costs only {low['cost_norm']:.2f} of the full "
                f"network and is less accurate on V2 ({low['accuracy']:.3f}) than the best single exit "
                f"({max(singles):.3f}): the sweep misses the accurate end")
        ic_norm = np.asarray(costs, dtype=np.float64) / costs[-1]
        at_low, at_zero = (None, None) if ce is None else (target_cost(ce, ic_norm, low["lam"]),
                                                            target_cost(ce, ic_norm, 0.0))
        if at_low is not None and (at_zero - at_low < 0.02 or low["cost_norm"] < at_low - 0.1):
            found.append(f"{miss}. A smaller lambda is unlikely to reach it: the surrogate targets (warm-up IMs, V2) "
                         f"ask for a mean cost of {at_low:.2f} at {low['lam']:.3g} ({at_zero:.2f} at lambda -> 0) "
                         f"and the trained gates spend {low['cost_norm']:.2f}, short of their own targets (see the "
                         f"exit decomposition: under eq. 30 IMs that receive no exit mass are not trained; "
                         f"--im-loss uniform trains every IM)")
        else:
            found.append(miss)
            lo_lam = low["lam"] / 10
    if high["cost_norm"] > first + 0.25 * (1 - first):
        found.append(f"the largest lambda {high['lam']:.3g} still costs {high['cost_norm']:.2f} of the full network "
                     f"(the first exit costs {first:.2f}): the sweep misses the cheap end")
        hi_lam = high["lam"] * 10
    if (lo_lam, hi_lam) != (low["lam"], high["lam"]):
        found.append(f"suggested range: --lambdas {lo_lam:.3g}:{hi_lam:.3g}")
    return found


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
