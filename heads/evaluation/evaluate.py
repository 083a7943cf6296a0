"""Everything the paper reports for one trained early-exit model, on V2 and test (section 3, appendices 9.1-9.3).

    results = evaluate(v2, test, cumulative_costs)        # {"v2": {...}, "test": {...}}
    calib = calibrate(v2, alpha=0.05, method="gated")      # what a runtime needs: temperature + thresholds
    pred, probs, sets = predict_with_sets(exited_logits, exit_index, calib)

Temperature and conformal thresholds are fitted on V2 only and applied unchanged to both splits, so the V2
numbers are in-sample and the test numbers are the honest ones. Conformal sets use the model's own (untempered)
probabilities, as in the paper; temperature scaling only enters the ECE comparison and the probabilities that
predict_with_sets returns. Within a sample temperature preserves the order of classes, so a set is always the
top-m classes under either probability.

Keys of each per-split dict (all JSON/Parquet friendly: int, float, or list; NaN where a value is undefined):
  n_samples                      int    samples in the split
  accuracy                       float  accuracy of the exited predictions
  accuracy_ci_low/_ci_high       float  95% interval (bootstrap over 10 partitions, metrics.bootstrap_ci)
  cost_macs                      float  expected inference cost, eq. 1, in Mul-Adds (IC^l of each sample's exit)
  cost_macs_ci_low/_ci_high      float  its 95% interval
  cost_norm                      float  cost_macs / IC^L (1.0 = every sample runs the whole network)
  cost_norm_ci_low/_ci_high      float  its 95% interval
  temperature                    float  T fitted on V2 exited logits (the same number in both dicts)
  ece                            float  eq. 19 ECE of the exited max probability, n_bins equal-mass bins
  ece_temp                       float  the same after temperature scaling with T
  exit_hist                      list[int]    samples exiting at each exit (length L, sums to n_samples)
  exit_acc_exited                list[float]  accuracy of exit l on the samples that exit there (NaN if none)
  exit_acc_all                   list[float]  accuracy of exit l's IM on every sample (figure 3)
  conformal_alphas               list[float]  the alpha grid (length A)
  coverage_<m>                   list[float]  empirical coverage 1 - alpha_hat, eq. 2, per alpha, for m in
                                              general, ims, strict, gated (appendix 9.3)
  inefficiency_<m>               list[float]  mean set size |C|, eq. 2, per alpha
  reported_alpha                 float  target alpha of the 9.3 reporting rule (0.05)
  reported_coverage_<m>          float  coverage at the first alpha' in 0.05, 0.045, ..., 0 reaching >= 0.95
  reported_inefficiency_<m>      float  inefficiency at that alpha'
  reported_alpha_used_<m>        float  that alpha'
"""
from dataclasses import asdict, dataclass

import numpy as np

from heads.evaluation.metrics import (
    CONFORMAL_METHODS, bootstrap_ci, conformal_coverage, conformal_sets, conformal_thresholds,
    expected_calibration_error, fit_temperature, pick_reported, reported_alphas, softmax,
)

DEFAULT_ALPHAS = tuple(round(0.01 * i, 2) for i in range(1, 21))  # 0.01 .. 0.20
REPORTED_ALPHA = 0.05


@dataclass
class ExitOutputs:
    """What a trained model produced on one split."""
    logits: np.ndarray      # (N, L, K) float32: every exit's logits (the last = backbone head or trained head)
    exit_index: np.ndarray  # (N,) int, 0-based exit each sample takes
    labels: np.ndarray      # (N,) int

    def __post_init__(self):
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.exit_index = np.asarray(self.exit_index).astype(np.int64, copy=False)
        self.labels = np.asarray(self.labels).astype(np.int64, copy=False)
        if self.logits.ndim != 3 or self.logits.shape[0] == 0:
            raise ValueError(f"ExitOutputs.logits must be (N, L, K) with N > 0, got {self.logits.shape}")
        n, n_exits, n_classes = self.logits.shape
        if self.exit_index.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(f"exit_index {self.exit_index.shape} and labels {self.labels.shape} must be ({n},)")
        if self.exit_index.min() < 0 or self.exit_index.max() >= n_exits:
            raise ValueError(f"exit_index must lie in [0, {n_exits}), "
                             f"got {self.exit_index.min()}..{self.exit_index.max()}")
        if self.labels.min() < 0 or self.labels.max() >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes}), got {self.labels.min()}..{self.labels.max()}")

    def exited_logits(self) -> np.ndarray:
        """(N, K) logits of the exit each sample takes."""
        return self.logits[np.arange(self.labels.size), self.exit_index]

    def true_class_probs(self, probs: np.ndarray | None = None) -> np.ndarray:
        """(N, L) probability every exit's IM gives the true class (the conformal calibration scores).

        probs: softmax(self.logits) when the caller already has it (it is the one (N, L, K) pass that costs).
        """
        probs = softmax(self.logits) if probs is None else probs
        return np.take_along_axis(probs, self.labels[:, None, None], axis=-1)[..., 0]


@dataclass(frozen=True)
class Calibration:
    """Post-hoc uncertainty for deployment, fitted on V2: temperature and one conformal threshold per exit."""
    temperature: float
    alpha: float
    method: str
    thresholds: tuple[float, ...]  # (L,) on the score 1 - p (untempered); set = {k : 1 - p_k <= tau_exit}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["temperature"]), float(d["alpha"]), str(d["method"]),
                   tuple(map(float, d["thresholds"])))


def calibrate(v2: ExitOutputs, alpha: float = REPORTED_ALPHA, method: str = "gated") -> Calibration:
    """Fit the temperature and the method's per-exit conformal thresholds at alpha on V2."""
    thr = conformal_thresholds(method, v2.true_class_probs(), v2.exit_index, [alpha])[0]
    temperature = fit_temperature(v2.exited_logits(), v2.labels)
    return Calibration(temperature, float(alpha), method, tuple(map(float, thr)))


def predict_with_sets(exited_logits, exit_index, calib: Calibration):
    """Per sample: prediction (N,), tempered probabilities (N, K), conformal set (N, K) bool. No labels needed."""
    z = np.asarray(exited_logits, dtype=np.float32)
    ex = np.asarray(exit_index).astype(np.int64)
    if z.ndim != 2 or ex.shape != (z.shape[0],):
        raise ValueError(f"need exited_logits (N, K) and exit_index (N,), got {z.shape} and {ex.shape}")
    if ex.size and (ex.min() < 0 or ex.max() >= len(calib.thresholds)):
        raise ValueError(f"exit_index must lie in [0, {len(calib.thresholds)}) for this calibration")
    return z.argmax(axis=1), softmax(z, calib.temperature), conformal_sets(softmax(z), ex, calib.thresholds)


def _split_metrics(out: ExitOutputs, probs: np.ndarray, thresholds: dict, alphas: np.ndarray, used: np.ndarray,
                   temperature: float, costs: np.ndarray, acc_all: list, n_bins: int, n_partitions: int,
                   seed: int) -> dict:
    """thresholds: per conformal method (A + len(used), L), the alpha grid's rows then the reporting rule's."""
    n, n_exits, _ = out.logits.shape
    n_alphas = alphas.size
    y, ex = out.labels, out.exit_index
    z = out.exited_logits()
    correct = z.argmax(axis=1) == y
    res = {"n_samples": int(n)}
    for key, values in (("accuracy", correct), ("cost_macs", costs[ex]), ("cost_norm", costs[ex] / costs[-1])):
        mean, low, high = bootstrap_ci(values, n_partitions, seed)
        res.update({key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high})
    res["temperature"] = float(temperature)
    res["ece"] = expected_calibration_error(probs.max(axis=1), correct, n_bins)
    res["ece_temp"] = expected_calibration_error(softmax(z, temperature).max(axis=1), correct, n_bins)

    hist = np.bincount(ex, minlength=n_exits)
    hits = np.bincount(ex, weights=correct, minlength=n_exits)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_exited = np.where(hist > 0, hits / hist, np.nan)
    res["exit_hist"] = hist.tolist()
    res["exit_acc_exited"] = acc_exited.tolist()
    res["exit_acc_all"] = list(acc_all)

    res["conformal_alphas"] = alphas.tolist()
    res["reported_alpha"] = REPORTED_ALPHA
    # one call (one sort of the scores) for every method and alpha: rows m * per + i
    per = n_alphas + used.size
    coverage, inefficiency = conformal_coverage(probs, y, ex, np.concatenate([thresholds[m] for m in
                                                                              CONFORMAL_METHODS]))
    for j, m in enumerate(CONFORMAL_METHODS):
        cov_m, ineff_m = coverage[j * per:(j + 1) * per], inefficiency[j * per:(j + 1) * per]
        res[f"coverage_{m}"] = cov_m[:n_alphas].tolist()
        res[f"inefficiency_{m}"] = ineff_m[:n_alphas].tolist()
        cov, ineff, alpha_used = pick_reported(cov_m[n_alphas:], ineff_m[n_alphas:], used, REPORTED_ALPHA)
        res.update({f"reported_coverage_{m}": cov, f"reported_inefficiency_{m}": ineff,
                    f"reported_alpha_used_{m}": alpha_used})
    return res


def evaluate(v2: ExitOutputs, test: ExitOutputs, cumulative_costs, alphas=DEFAULT_ALPHAS, n_bins: int = 15,
             n_partitions: int = 10, seed: int = 0) -> dict[str, dict]:
    """{"v2": metrics, "test": metrics} (keys in the module docstring); calibration fitted on v2 only."""
    return evaluate_many([(v2, test)], cumulative_costs, alphas, n_bins, n_partitions, seed)[0]


def evaluate_many(points, cumulative_costs, alphas=DEFAULT_ALPHAS, n_bins: int = 15, n_partitions: int = 10,
                  seed: int = 0) -> list[dict[str, dict]]:
    """evaluate() of every (v2, test) ExitOutputs pair of `points`, in order. Consecutive pairs that hold the same
    logits arrays (the same objects: one model's exit rules, a threshold sweep's budgets) share the work that
    depends on the logits alone (the softmax over every exit, the calibration scores, each IM's accuracy)."""
    costs = np.asarray(cumulative_costs, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)
    used = reported_alphas(REPORTED_ALPHA)
    both = np.concatenate([a, used])
    shared = {}          # split -> (logits, labels, what derives from them) of the latest model: consecutive points
    results = []
    for v2, test in points:
        if v2.logits.shape[1:] != test.logits.shape[1:]:
            raise ValueError(f"v2 and test disagree on (L, K): {v2.logits.shape[1:]} vs {test.logits.shape[1:]}")
        if costs.shape != (v2.logits.shape[1],) or np.any(costs <= 0):
            raise ValueError(f"cumulative_costs must be {v2.logits.shape[1]} positive values (one per exit), "
                             f"got shape {costs.shape}")
        for name, out in (("v2", v2), ("test", test)):
            held = shared.get(name)
            if held is None or held[0] is not out.logits or not np.array_equal(held[1], out.labels):
                info = {"acc_all": (out.logits.argmax(axis=2) == out.labels[:, None]).mean(axis=0).tolist()}
                if name == "v2":
                    info["probs"] = softmax(out.logits)
                    info["cal_true"] = out.true_class_probs(info["probs"])
                shared[name] = (out.logits, out.labels, info)
        derived = {name: held[2] for name, held in shared.items()}
        temperature = fit_temperature(v2.exited_logits(), v2.labels)
        # V2's exited probabilities are sliced from the same softmax as its calibration scores, so a V2 sample
        # whose score defines a threshold compares equal to it; the test split needs only its exited rows.
        cal_true = derived["v2"]["cal_true"]
        thresholds = {m: conformal_thresholds(m, cal_true, v2.exit_index, both) for m in CONFORMAL_METHODS}
        exited = {"v2": derived["v2"]["probs"][np.arange(v2.labels.size), v2.exit_index],
                  "test": softmax(test.exited_logits())}
        results.append({name: _split_metrics(out, exited[name], thresholds, a, used, temperature, costs,
                                             derived[name]["acc_all"], n_bins, n_partitions, seed)
                        for name, out in (("v2", v2), ("test", test))})
    return results
