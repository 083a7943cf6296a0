"""What a sweep trains: lambdas and hyperparameter grids as the command line gives them, `--lambdas auto`'s choice
from the warm-up IMs' surrogate targets, and the diagnostics of a lambda range that missed the cost axis.

    lambdas = parse_lambdas("0.01:10")                             # 20 log-spaced points
    grid = parse_grid(["warmup_epochs=1:5", "lr=0.01,0.003"])      # {"warmup_epochs": (1..5), "lr": (...)}
    sweep = SweepSettings(tuple(lambdas), grid_items(grid))
    trials = expand_trials(sweep.lambdas, sweep.grid)              # [{"trial": 0, "lam": ..., "lr": ...}, ...]
"""
import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from heads.train.bilevel import TrainSettings


LAMBDA_FORMS = ("A:B (20 log-spaced points), A:B:N (N points), a,b,c (a list) or one value, all > 0 and A < B; or "
                "auto, auto:N (N lambdas chosen after the warm-up)")
AUTO_POINTS = 12             # lambdas of `--lambdas auto`
AUTO_FIRST_SHARE = 0.99      # the largest auto lambda's targets send at least this share of V1 to exit 1
AUTO_LOW_SLACK = 0.01        # the smallest one's targets ask for the cost lambda -> 0 asks for, less this
DEFAULT_THRESHOLDS = (0.2, 0.35, 0.65, 0.8)   # gate thresholds besides 0.5 for the selected models' curves


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
