"""One process's training session on a cache: the data loaded once (resident or streamed), the warm-ups it ran,
the stacked bi-level passes of a sweep's trials (train_groups) with their progress bar and per-epoch history, and
the warm-up IMs as a heads group.

    session = Session(cache, settings)
    groups = train_groups(session, expand_trials(lambdas, grid), grid, settings)   # [{"group", "heads", ...}]
"""
import dataclasses
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from heads.model.exits import exit_distribution
from heads.model.stack import StackedHeads
from heads.sweep.lambdas import AutoLambdas, auto_lambdas, expand_trials, target_cost
from heads.train.bilevel import EpochReport, TRIAL_KEYS, TrainSettings, train_stack, warmup
from heads.train.data import make_train_data, open_split, split_outputs
from heads.train.kernels import exit_cross_entropy
from heads.train.stream import MemoryPlan


WARMUP_FIELDS = ("batch_size", "seed", "device", "warmup_patience")   # the TrainSettings fields the warm-up depends on
REFERENCE_GROUP = "warmup"                         # heads group holding the warm-up IMs (single-exit rows)
log = logging.getLogger(__name__)


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
        history = warmup_history(warm, identity)
        budgets = [pass_settings.max_epochs - t["warmup_epochs"] for t in identity]

        def progress(report: EpochReport, bar=bar, identity=identity, history=history, budgets=budgets):
            bar(report)
            history.extend(bilevel_history(report, identity, budgets))
        start = time.perf_counter()
        heads = train_stack(session.data, warm, [_trial_args(t) for t in members], pass_settings, progress)
        bar.close()
        groups.append({"group": str(number), "settings": dataclasses.asdict(pass_settings), "trials": members,
                       "heads": heads, "seconds": time.perf_counter() - start, "history": history})
    return groups


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


def bilevel_history(report: EpochReport, identity: list[dict], budgets: list[int]) -> list[dict]:
    """One row per trial that trained in this bi-level epoch (its current and kept V2 values, whether train_stack
    kept this epoch's state); budgets: each trial's bi-level epochs at most."""
    rows = []
    for i, ident in enumerate(identity):
        if math.isnan(report.epoch_objective[i]):
            continue
        rows.append({**ident, "phase": "bilevel", "epoch": report.epoch, "accuracy": report.epoch_accuracy[i],
                     "cost": report.epoch_cost[i], "objective": report.epoch_objective[i],
                     "best_accuracy": report.accuracy[i], "best_cost": report.cost[i],
                     "best_objective": report.objective[i],
                     "improved": report.improved[i], "active": report.active[i] and report.epoch < budgets[i],
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
