"""The paper's baselines and ablations, trained from the same feature cache (and the same IMs) as JEI-DNN.

    session = Session(cache, settings)                                   # heads/sweep/sweep.py: data, test, costs
    points = run_baselines(session.data, session.test, ["threshold", "boosted", "l2w", "fixed-ims", "diffbranch"],
                           settings, lambdas=[0.01, 0.1, 1.0])
    for method, param, v2, test_out, extra in points:                     # MethodPoint named tuples
        metrics = evaluate(v2, test_out, session.costs)                   # {"v2": {...}, "test": {...}}, as JEI-DNN

A results row of a `compare` command is then {"method": method, "lam" or "p": param, **metrics[split], ...}.
The points of one threshold-gated method share their logits arrays (only exit_index differs), so a 39-point grid
costs one copy of the logits per split.

Methods (METHODS), each one MethodPoint per operating point (param = p of the budget grid, or lambda):
  threshold         IMs trained on every sample to convergence: the JEI-DNN warm-up (eq. 17) run for max_epochs,
                    each IM kept at its best V2 accuracy; threshold gating (heads/baselines/thresholds.py), one
                    point per p.
  threshold-warmup  ablation 2 of appendix 9.6: threshold gating on exactly the IMs JEI-DNN starts its bi-level
                    phase from (the warm-up after warmup_epochs epochs).
  boosted           BoostedNet (Yu et al. 2023), see boosted_ensemble; threshold gating on the ensemble logits.
  l2w               L2W-DEN (Han et al. 2022b), see train_l2w; threshold gating.
  fixed-ims         ablation 1 of appendix 9.6: JEI-DNN's Algorithm 1 that never enters the CLASSIFIER state, so
                    only the gates learn (train_stack with bi_switch beyond the last batch); one point per lambda.
  diffbranch        DiffBranch (Scardapane et al. 2020, appendix 9.13): from the same warm-up, IMs and gates (same
                    gate inputs) trained jointly by gradient descent on the expected loss eq. 9; one per lambda.

Training of the IM-only baselines (boosted, l2w) follows TrainSettings: Adam (lr, weight_decay), batch_size,
at most max_epochs epochs, the state with the lowest V2 cross-entropy (summed over exits; for BoostedNet of the
ensemble logits) kept, stopping after `patience` epochs without improvement. The exit-L head is the backbone's own
(frozen) head unless the cache's head is not the task's, exactly as for JEI-DNN. Thresholds are fitted on V1,
temperature and conformal thresholds on V2 by heads.evaluation.evaluate, as in the paper (section 5).

extra of a point: {"train_seconds": wall time of the training that produced the point (shared by all points of a
threshold-gated method), "epochs"}, plus {"p", "fractions", "thresholds", "v1_exit_hist"} for threshold gating,
{"lam"} for the learned-gate methods.
"""
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from heads.baselines.thresholds import (
    DEFAULT_P_GRID, budget_fractions, budget_sweep, cumulative_targets, fit_thresholds, max_softmax, route_by_budget,
    threshold_sweep,
)
from heads.evaluation.evaluate import ExitOutputs
from heads.model.exits import exit_costs, exit_decision, exit_distribution
from heads.model.gate_features import _features_grad_kernel, gate_features_numpy
from heads.model.stack import StackedHeads
from heads.train.adam import StackedAdam
from heads.train.kernels import exit_cross_entropy
from heads.train.bilevel import BestState, TrainSettings, WarmState, copy_trials, seed_streams, exited_metrics, train_stack, warmup
from heads.train.data import Split, TrainData, split_outputs

METHODS = ("threshold", "threshold-warmup", "boosted", "l2w", "fixed-ims", "diffbranch")
LAMBDA_METHODS = ("fixed-ims", "diffbranch")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineSettings:
    """Defaults from the authors' public scripts (BoostedNet: ensemble_reweight 0.5; L2W-DEN: target_p_index 15,
    epsilon 0.3, constraint "mat", loss inputs, one hidden layer, meta Adam)."""
    p_grid: tuple[float, ...] = DEFAULT_P_GRID   # MSDNet budget grid p = 1/20 .. 39/20
    boost_gamma: float = 0.5          # BoostedNet: decay of the earlier ensemble, F_s = o_s + gamma F_{s-1}
    l2w_p: float = 0.75               # L2W-DEN: budget p whose exit shares route the meta half of each batch
    l2w_epsilon: float = 0.3          # L2W-DEN: weights = 1 + epsilon (w - mean w), w in (-1, 1)
    l2w_hidden: int = 100             # L2W-DEN: hidden width of the weight-prediction network
    l2w_meta_lr: float = 1e-4         # Adam on the weight-prediction network
    l2w_meta_weight_decay: float = 1e-4
    l2w_lookahead_lr: float = 0.01    # SGD step size of the one-step look-ahead of the IMs
    l2w_meta_interval: int = 1        # meta step every this many half-batches

    def __post_init__(self):
        if not self.p_grid or any(not p > 0 for p in self.p_grid):
            raise ValueError(f"p_grid needs positive budget parameters, got {self.p_grid}")
        if not 0 <= self.boost_gamma <= 1:
            raise ValueError(f"boost_gamma must lie in [0, 1], got {self.boost_gamma}")
        if not self.l2w_p > 0 or not 0 < self.l2w_epsilon <= 1:
            # epsilon = 0 would make every weight 1: plain IM training, nothing left to meta-learn
            raise ValueError(f"need l2w_p > 0 and l2w_epsilon in (0, 1], got {self.l2w_p}, {self.l2w_epsilon}")
        if self.l2w_hidden < 1 or self.l2w_meta_interval < 1:
            raise ValueError("l2w_hidden and l2w_meta_interval must be >= 1")
        if self.l2w_meta_lr <= 0 or self.l2w_lookahead_lr <= 0 or self.l2w_meta_weight_decay < 0:
            raise ValueError("L2W learning rates must be > 0 and its weight decay >= 0")


class MethodPoint(NamedTuple):
    """One operating point of one method: unpacks as (method, param, v2, test, extra)."""
    method: str
    param: float          # p of the budget grid (threshold gating) or lambda (learned gates)
    v2: ExitOutputs
    test: ExitOutputs
    extra: dict


# ---- IM-only models ----------------------------------------------------------------------------------------------
def _single_model(data: TrainData, settings: TrainSettings) -> StackedHeads:
    """One IM stack (trial axis of 1) with the same initial weights as JEI-DNN; the gates are never used."""
    return StackedHeads.init(data.exit_dims, data.num_classes, 1, data.trains_last, seed_streams(settings.seed)[0],
                             settings.device)


def _warm_ims(data: TrainData, warm: WarmState, settings: TrainSettings, epochs: int) -> StackedHeads:
    return warm.start_heads(data, [(settings.lr, settings.weight_decay, epochs)], seed_streams(settings.seed)[0],
                            settings.device)


@torch.no_grad()
def split_logits(heads: StackedHeads, split: Split) -> torch.Tensor:
    """(T, N, L, K) IM logits of every trial on a whole split (no gates: baselines train IMs only)."""
    return split_outputs(heads, split, gates=False)[0]


def _fit_ims(data: TrainData, settings: TrainSettings, make_step: Callable, v2_score: Callable) -> StackedHeads:
    """Train one IM stack with step = make_step(heads), step(feats, labels, last) per mini-batch (it owns the
    optimiser); keep the state with the lowest v2_score(heads), stop after `patience` epochs without gain."""
    heads = _single_model(data, settings)
    step = make_step(heads)
    gen = torch.Generator().manual_seed(seed_streams(settings.seed)[1])
    best, tracker = heads.select(0), BestState((1,))
    for epoch in range(settings.max_epochs):
        for batch in data.train.epoch(settings.batch_size, gen, settings.device, stacked=False):
            step(*batch)
        if bool(tracker.update(torch.tensor([float(v2_score(heads))], dtype=torch.float64))):
            best = heads.select(0)
            best.epochs_trained[0] = epoch + 1
        elif int(tracker.stale[0]) >= settings.patience:
            break
    return best


class RunParams:
    """One trial's IM weights held per run of consecutive exits of one width (exit_runs), as (n, D, K) weights and
    (n, 1, K) biases, so that each product of a run is ONE batched matmul instead of one per exit; heads.im_weight
    and im_bias become views of them (the model reads and copies them as before). With a dozen small exits the
    per-call overhead, not the arithmetic, is what the runs save. On one CPU thread, for the demo cache's shapes
    (Lite0's exit widths, its batch halves; tests/test_baselines.py), a batched product gives each exit's slice
    bit for bit what one product per exit gives, so training takes the same steps as before; other shapes may
    round differently (torch's batched product loops by hand on tiny matrices). Why not the transposed (n, K, D)
    layout, whose products ran several times faster for the widest exit: its sums add in another order, and
    L2W-DEN's discrete routing turns such last-bit differences into visibly different models (compare's
    matched-cost table moved)."""

    def __init__(self, heads: StackedHeads):
        dims = heads.exit_dims
        self.runs = exit_runs(dims)
        self.weights = [torch.stack([heads.im_weight[l].detach()[:, 0] for l in range(lo, hi)])
                        for lo, hi in self.runs]
        self.biases = [torch.stack([heads.im_bias[l].detach() for l in range(lo, hi)]) for lo, hi in self.runs]
        heads.im_weight = [w[l - lo].unsqueeze(1) for (lo, hi), w in zip(self.runs, self.weights)
                           for l in range(lo, hi)]
        heads.im_bias = [b[l - lo] for (lo, hi), b in zip(self.runs, self.biases) for l in range(lo, hi)]
        self.n_trained = len(dims)
        self.num_classes = heads.num_classes

    def params(self) -> list[torch.Tensor]:
        return self.weights + self.biases

    def stack(self, feats) -> list[torch.Tensor]:
        """Per-exit (B, D_l) features -> per run (n, B, D)."""
        return [feats[lo][None] if hi - lo == 1 else torch.stack(feats[lo:hi]) for lo, hi in self.runs]

    def logits(self, x: list[torch.Tensor], last, weights=None, biases=None) -> torch.Tensor:
        """(B, L, K) logits of every exit (im_logits' layout) from run-stacked features x (the frozen last exit's
        from `last`), with params() or the given (weights, biases)."""
        weights, biases = weights or self.weights, biases or self.biases
        b = x[0].shape[1]
        z = torch.empty(self.n_trained + (last is not None), b, self.num_classes, device=x[0].device)
        for (lo, hi), xr, w, bias in zip(self.runs, x, weights, biases):
            torch.baddbmm(bias, xr, w, out=z[lo:hi])
        if last is not None:
            z[-1] = last
        return z.transpose(0, 1).contiguous()

    def grads(self, x: list[torch.Tensor], dz: torch.Tensor, exit_sums: bool = False) -> list[torch.Tensor]:
        """Weight and bias gradients (params() order) of logit gradients dz (B, n_trained or more, K). The bias
        gradient is a sum over the batch, added in the order the reference adds it: dz.sum(0) over all exits at
        once (_weighted_ce_grads), or exit_sums=True one exit's slice at a time (autograd's addmm backward)."""
        d = dz.transpose(0, 1)
        gw = [torch.bmm(xr.transpose(1, 2), d[lo:hi]) for (lo, hi), xr in zip(self.runs, x)]
        if exit_sums:
            sums = [torch.stack([dz[:, l].sum(0) for l in range(lo, hi)]) for lo, hi in self.runs]
        else:
            total = dz[:, :self.n_trained].sum(0)
            sums = [total[lo:hi] for lo, hi in self.runs]
        return gw + [s[:, None] for s in sums]


def exit_runs(dims) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive exits with the same feature width."""
    runs, lo = [], 0
    for l in range(1, len(dims) + 1):
        if l == len(dims) or dims[l] != dims[lo]:
            runs.append((lo, l))
            lo = l
    return runs


# ---- BoostedNet --------------------------------------------------------------------------------------------------
def boosted_ensemble(logits: torch.Tensor, gamma: float, n_boosted: int, detach: bool = False) -> torch.Tensor:
    """(..., L, K) weak-learner logits o_s -> (..., L, K) ensemble logits F_s (Yu et al. 2023, their public code):

        F_1 = o_1,   F_s = o_s + gamma * F_{s-1}   (s = 2..n_boosted),   i.e. F_s = sum_{j<=s} gamma^(s-j) o_j.

    detach=True stops the gradient through F_{s-1} (training: exit s fits the residual of the fixed earlier
    ensemble). Exits after n_boosted (the frozen backbone head, which cannot learn a residual) are returned as is.
    """
    out = [logits[..., 0, :]]
    for s in range(1, n_boosted):
        prev = out[-1].detach() if detach else out[-1]
        out.append(logits[..., s, :] + gamma * prev)
    out.extend(logits[..., s, :] for s in range(n_boosted, logits.shape[-2]))
    return torch.stack(out, dim=-2)


@torch.no_grad()
def boosted_grads(heads: StackedHeads, feats, labels, last, gamma: float) -> list[torch.Tensor]:
    """The IM gradients of BoostedNet's loss, batch mean of sum over trained exits s of CE(y, o_s + gamma
    sg(F_{s-1})), one trial. With F_{s-1} held fixed the logit gradient at exit s is softmax(F_s) - onehot, the
    closed form _weighted_ce_grads takes (weights 1)."""
    n_boosted = len(heads.im_weight)
    residual = _ce_residual(boosted_ensemble(heads.im_logits(feats, last), gamma, n_boosted)[0], labels)
    return _weighted_ce_grads(feats, residual, torch.ones(residual.shape[:2], device=residual.device), n_boosted)


class BoostedStep:
    """train_boosted's mini-batch step: boosted_grads with the products batched per run of equal-width exits
    (RunParams), then one Adam step (tests/test_baselines.py runs it beside boosted_grads)."""

    def __init__(self, heads: StackedHeads, settings: TrainSettings, gamma: float):
        self.ims, self.gamma = RunParams(heads), gamma
        self.update = StackedAdam.one_trial(self.ims.params(), settings.lr, settings.weight_decay, settings.device)

    @torch.no_grad()
    def __call__(self, feats, labels, last):
        x, n = self.ims.stack(feats), self.ims.n_trained
        ens = boosted_ensemble(self.ims.logits(x, last), self.gamma, n)                   # (B, L, K)
        # weights 1 / B as _weighted_ce_grads forms them (a division by B would round differently)
        coef = _ce_residual(ens, labels)[:, :n] * (torch.ones(labels.shape[0], n, 1, device=labels.device)
                                                   / labels.shape[0])
        self.update.step(self.ims.grads(x, coef))


def train_boosted(data: TrainData, settings: TrainSettings, gamma: float) -> StackedHeads:
    """BoostedNet training: sum over trained exits s of CE(y, o_s + gamma * sg(F_{s-1})), gradients in closed
    form (boosted_grads)."""
    n_boosted = len(data.exit_dims) if data.trains_last else len(data.exit_dims) - 1

    def make_step(heads):
        return BoostedStep(heads, settings, gamma)

    def v2_score(heads):
        ens = boosted_ensemble(split_logits(heads, data.v2), gamma, n_boosted)
        return exit_cross_entropy(ens, data.v2.labels).sum(-1).mean()

    return _fit_ims(data, settings, make_step, v2_score)


# ---- L2W-DEN -----------------------------------------------------------------------------------------------------
class WeightPredictionNet(nn.Module):
    """L2W-DEN's weight-prediction network: per-exit losses of a sample (L,) -> raw weights in (-1, 1) (L,)."""

    def __init__(self, n_exits: int, hidden: int, seed: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_exits, hidden), nn.ReLU(), nn.Linear(hidden, n_exits), nn.Tanh())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():      # nn.Linear's default init, from our own generator (not the global one)
            for layer in (self.net[0], self.net[2]):
                bound = layer.in_features ** -0.5
                for p in (layer.weight, layer.bias):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses)


def l2w_weights(raw: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(B, L) raw WPN outputs -> loss weights 1 + epsilon (raw - mean(raw)): the mean over the whole (B, L) matrix
    is exactly 1 (the authors' "mat" constraint) and every weight lies in (1 - 2 epsilon, 1 + 2 epsilon)."""
    return 1.0 + epsilon * (raw - raw.mean())


def _weighted_loss(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1, B, L) per-exit CE, (B, L) weights -> sum over exits of the weighted batch mean (L2W-DEN's loss). Training
    takes its gradient in closed form (_weighted_ce_grads); the tests differentiate this to check it."""
    return (weights * ce[0]).mean(0).sum()


def _budget_loss(logits: torch.Tensor, labels: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """L2W-DEN's meta objective on a batch (1, B, L, K): route samples by confidence so that `fractions` exit at each
    exit (as threshold gating would at test time), then sum over exits of the mean CE of the samples routed there."""
    with torch.no_grad():
        _, exit_index = fit_thresholds(max_softmax(logits[0]), fractions)
    ce = exit_cross_entropy(logits, labels)[0].gather(1, exit_index[:, None])[:, 0]          # (B,)
    n_exits = logits.shape[2]
    sums = torch.zeros(n_exits, dtype=ce.dtype, device=ce.device).index_add(0, exit_index, ce)
    counts = torch.bincount(exit_index, minlength=n_exits).clamp_min(1)
    return (sums / counts).sum()


@torch.no_grad()
def _ce_residual(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, K) logits -> softmax - onehot(labels): every exit's cross-entropy gradient in its logits."""
    residual = torch.softmax(logits, -1)
    residual[torch.arange(len(labels)), :, labels] -= 1.0
    return residual


@torch.no_grad()
def _weighted_ce_grads(feats, residual: torch.Tensor, weights: torch.Tensor, n_trained: int):
    """Gradient of _weighted_loss in the IM parameters, closed form for linear IMs: exit l's logit gradient of
    sample b is weights_bl (softmax_bl - onehot_b) / B. residual: (B, L, K) softmax - onehot; weights: (B, L).
    Returns [(D_l, 1, K) weight grads] + [(1, K) bias grads] for the n_trained IMs (heads.im_params() order)."""
    coef = residual[:, :n_trained] * (weights[:, :n_trained, None] / residual.shape[0])       # (B, L', K)
    grad_w = [(x.T @ coef[:, l]).unsqueeze(1) for l, x in enumerate(feats[:n_trained])]
    return grad_w + [coef.sum(0)[l][None] for l in range(n_trained)]


def l2w_residual(heads: StackedHeads, feats, labels, last) -> tuple[torch.Tensor, torch.Tensor]:
    """One trial's (B, L, K) softmax - onehot of every exit and its (B, L) cross-entropy on a batch (with
    l2w_meta_gradient and _weighted_ce_grads, the reference step L2WStep is tested against)."""
    with torch.no_grad():
        logits = heads.im_logits(feats, last)[0]
        return _ce_residual(logits, labels), exit_cross_entropy(logits[None], labels)[0]


def l2w_meta_gradient(heads: StackedHeads, wpn: nn.Module, feats, residual, ce, meta_rows, fractions,
                      bs: BaselineSettings) -> tuple[torch.Tensor, ...]:
    """The WPN's gradient of L2W-DEN's meta objective (train_l2w): the budget loss on meta_rows of the IMs after
    one look-ahead SGD step on the weighted loss of the train half (feats, its residual and ce, l2w_residual).
    The reference formulation (autograd through the look-ahead logits and the WPN); training runs L2WStep."""
    n_trained, params = len(heads.im_weight), list(wpn.parameters())
    weights = l2w_weights(wpn(ce), bs.l2w_epsilon)                                           # in the WPN's graph
    grads = _weighted_ce_grads(feats, residual, weights.detach(), n_trained)
    ahead = [(p.detach() - bs.l2w_lookahead_lr * g).requires_grad_(True) for p, g in zip(heads.im_params(), grads)]
    ahead_heads = dataclasses.replace(heads, im_weight=ahead[:n_trained], im_bias=ahead[n_trained:])
    meta = _budget_loss(ahead_heads.im_logits(meta_rows[0], meta_rows[2]), meta_rows[1], fractions)
    g_ahead = torch.autograd.grad(meta, ahead)
    with torch.no_grad():
        d_weights = torch.zeros_like(weights)
        for l, x in enumerate(feats[:n_trained]):
            u = x @ g_ahead[l][:, 0] + g_ahead[n_trained + l]                                     # (B, K)
            d_weights[:, l] = (u * residual[:, l]).sum(-1) * (-bs.l2w_lookahead_lr / residual.shape[0])
    return torch.autograd.grad(weights, params, grad_outputs=d_weights)


class L2WStep:
    """train_l2w's mini-batch step: per half-batch, the meta step of the WPN and the weighted step of the IMs, all
    gradients in closed form and the IM products batched per run of equal-width exits (RunParams).

    The same step, bit for bit on one CPU thread, as the reference functions above (l2w_residual,
    l2w_meta_gradient through the budget loss and autograd, _weighted_ce_grads), which tests/test_baselines.py runs
    side by side with this one. Bit for bit because L2W-DEN's routing is discrete: a last-bit difference moves a
    meta sample to another exit now and then, and the trained models drift apart visibly. So the closed forms
    below take autograd's own formulas and order: the budget loss's logit gradient g exp(z - logsumexp z) minus g
    at the label, g = 1/count at the exit each meta sample is routed to (route_by_budget, fit_thresholds' routing
    compiled); the WPN's backward through l2w_weights' mean, tanh, two linear layers and ReLU as their backward
    functions compute it. No autograd graph is built per half-batch."""

    def __init__(self, heads: StackedHeads, wpn: "WeightPredictionNet", settings: TrainSettings,
                 bs: BaselineSettings, fractions: torch.Tensor):
        self.heads, self.wpn, self.bs, self.fractions = heads, wpn, bs, fractions.cpu()
        self.ims = RunParams(heads)
        self.update = StackedAdam.one_trial(self.ims.params(), settings.lr, settings.weight_decay, settings.device)
        self.wpn_params = [p.detach() for p in wpn.parameters()]
        self.meta_update = StackedAdam.one_trial(self.wpn_params, bs.l2w_meta_lr, bs.l2w_meta_weight_decay,
                                                 settings.device)
        self.targets = {}      # meta half size -> cumulative target counts of the routing
        self.calls = 0

    def __call__(self, feats, labels, last):
        half = (labels.shape[0] + 1) // 2
        x = self.ims.stack(feats)
        rows = [(x, labels, last)]      # a one-sample tail batch cannot be halved: no meta step for it
        if labels.shape[0] >= 2:
            rows = [([xr[:, s] for xr in x], labels[s], None if last is None else last[s])
                    for s in (slice(0, half), slice(half, None))]
        for i, train_rows in enumerate(rows):
            residual, ce = self.residual(*train_rows)
            if len(rows) == 2 and self.calls % self.bs.l2w_meta_interval == 0:
                # the other half is the held-out meta data
                self.meta_update.step(self.meta_gradient(train_rows[0], residual, ce, rows[1 - i]))
            self.calls += 1
            weights = l2w_weights(self._wpn(ce)[2], self.bs.l2w_epsilon)
            self.update.step(self.ims.grads(train_rows[0], self._coef(residual, weights)))

    @torch.no_grad()
    def residual(self, x, labels, last) -> tuple[torch.Tensor, torch.Tensor]:
        """l2w_residual: (B, L, K) softmax - onehot and (B, L) cross-entropy of every exit on a half-batch."""
        z = self.ims.logits(x, last)
        return _ce_residual(z, labels), exit_cross_entropy(z[None], labels)[0]

    def _coef(self, residual, weights):
        """_weighted_ce_grads' logit gradient weights_bl (softmax - onehot) / B, (B, n_trained, K)."""
        n = self.ims.n_trained
        return residual[:, :n] * (weights[:, :n, None] / residual.shape[0])

    @torch.no_grad()
    def _wpn(self, ce):
        """The WPN's forward (nn.Linear's F.linear): (first pre-activation, hidden, raw output)."""
        w1, b1, w2, b2 = self.wpn_params
        h1 = torch.nn.functional.linear(ce, w1, b1)
        hidden = torch.relu(h1)
        return h1, hidden, torch.tanh(torch.nn.functional.linear(hidden, w2, b2))

    @torch.no_grad()
    def meta_gradient(self, x, residual, ce, meta_rows) -> list[torch.Tensor]:
        """l2w_meta_gradient in closed form (train_l2w's docstring derives d meta / d w_bl)."""
        bs, ims, n = self.bs, self.ims, self.ims.n_trained
        h1, hidden, raw = self._wpn(ce)
        weights = l2w_weights(raw, bs.l2w_epsilon)
        grads = ims.grads(x, self._coef(residual, weights))
        ahead = [p - bs.l2w_lookahead_lr * g for p, g in zip(ims.params(), grads)]
        n_runs = len(ims.runs)
        mx, my, mlast = meta_rows
        z = ims.logits(mx, mlast, ahead[:n_runs], ahead[n_runs:])                         # (Bm, L, K)
        b_meta, n_exits = z.shape[:2]
        if b_meta not in self.targets:
            self.targets[b_meta] = cumulative_targets(b_meta, self.fractions)
        exit_index = torch.from_numpy(route_by_budget(max_softmax(z).cpu().numpy(), self.targets[b_meta]))
        exit_index = exit_index.to(z.device)
        # _budget_loss's backward: 1/count into each routed sample's CE, then logsumexp's and the label's parts
        counts = torch.bincount(exit_index, minlength=n_exits).clamp_min(1)
        rows = torch.arange(b_meta, device=z.device)
        d_ce = torch.zeros(b_meta, n_exits, device=z.device)
        d_ce[rows, exit_index] = (torch.ones(n_exits, device=z.device) / counts)[exit_index]
        dz = d_ce[..., None] * (z - torch.logsumexp(z, -1)[..., None]).exp()
        dz[rows, :, my] += -d_ce
        g_ahead = ims.grads(mx, dz, exit_sums=True)
        # d meta / d w_bl = -a/B <x_bl G_l + g_l, s_bl - y_b>
        u = torch.cat([torch.bmm(xr, gw) + gb for xr, gw, gb in zip(x, g_ahead[:n_runs], g_ahead[n_runs:])])
        d_weights = torch.zeros_like(weights)
        d_weights[:, :n] = (u * residual[:, :n].transpose(0, 1)).sum(-1).T * (-bs.l2w_lookahead_lr
                                                                              / residual.shape[0])
        # back through l2w_weights (1 + eps (raw - mean raw)), tanh, the second layer, ReLU, the first layer
        d_diff = d_weights * bs.l2w_epsilon
        d_raw = d_diff + (-d_diff).sum() / d_diff.numel()
        d_h2 = torch.ops.aten.tanh_backward(d_raw, raw)                   # autograd's own kernels
        d_h1 = torch.ops.aten.threshold_backward(d_h2 @ self.wpn_params[2], hidden, 0)
        return [d_h1.T @ ce, d_h1.sum(0), d_h2.T @ hidden, d_h2.sum(0)]


def train_l2w(data: TrainData, settings: TrainSettings, bs: BaselineSettings) -> tuple[StackedHeads, nn.Module]:
    """L2W-DEN: every batch is halved; each half in turn trains the IMs with per-sample, per-exit loss weights from
    the WPN while the other half meta-trains the WPN: a look-ahead SGD step of the IMs under the predicted weights
    (kept differentiable in the WPN), then the budget-routed loss of the look-ahead IMs on the held-out half.

    The meta-gradient is taken in closed form rather than by differentiating through autograd's gradient: for a
    linear IM, theta'_l = theta_l - a/B sum_b w_bl x_bl (s_bl - y_b)^T, so d meta / d w_bl = -a/B <x_bl G_l + g_l,
    s_bl - y_b>, with (G_l, g_l) the meta loss's gradient in IM l's look-ahead weight and bias; the WPN's backward
    carries that into its parameters. The IM step uses the same closed-form gradient. L2WStep runs it."""
    n_exits = len(data.exit_dims)
    wpn = WeightPredictionNet(n_exits, bs.l2w_hidden, seed_streams(settings.seed)[2]).to(settings.device)
    fractions = budget_fractions(bs.l2w_p, n_exits).to(settings.device)

    def v2_score(heads):
        return exit_cross_entropy(split_logits(heads, data.v2), data.v2.labels).sum(-1).mean()

    return _fit_ims(data, settings, lambda heads: L2WStep(heads, wpn, settings, bs, fractions), v2_score), wpn


# ---- learned gates: fixed IMs and DiffBranch ---------------------------------------------------------------------
def _never_switching(data: TrainData, settings: TrainSettings) -> int:
    """A bi_switch beyond the last batch of any bi-level phase of these settings."""
    return math.ceil(len(data.train) / settings.batch_size) * settings.max_epochs + 1


def fixed_ims_is_jei(data: TrainData, settings: TrainSettings) -> bool:
    """Whether JEI-DNN trained with these settings never enters the CLASSIFIER state, so that its models are the
    fixed-ims ablation's exactly (the converged recipe): then fixed-ims need not be trained again."""
    return settings.bi_switch >= _never_switching(data, settings)


def train_fixed_ims(data: TrainData, warm: WarmState, lambdas, settings: TrainSettings) -> StackedHeads:
    """Appendix 9.6 ablation 1: Algorithm 1 starts in the GATE state and flips every bi_switch batches; a bi_switch
    beyond the last batch of the phase means it never enters CLASSIFIER, so the warmed-up IMs stay bit-identical."""
    never = dataclasses.replace(settings, bi_switch=_never_switching(data, settings))
    return train_stack(data, warm, [{"lam": float(lam)} for lam in lambdas], never)


def diffbranch_loss(heads: StackedHeads, feats, labels, last, lam, ic_norm) -> torch.Tensor:
    """Eq. 9 with gradients into IMs and gates alike (also through the gate inputs): mean over the batch of
    sum_l P(G=l|x) (CE_l + lam IC_norm^l), summed over trials."""
    logits = heads.im_logits(feats, last)
    p_g = exit_distribution(torch.sigmoid(heads.gate_logits(logits)))
    return (p_g * exit_costs(exit_cross_entropy(logits, labels), lam, ic_norm)).sum(-1).mean(-1).sum()


@torch.no_grad()
def diffbranch_grads(heads: StackedHeads, feats, labels, last, lam, ic_norm) -> list[torch.Tensor]:
    """The gradient of diffbranch_loss in every IM and gate parameter (im_params() + gate_params() order), in
    closed form on the CPU, bit for bit what autograd returns on one thread: the same forward, then the backward
    formulas autograd runs, in its order. The expected loss's dP = C/B and dC = P/B (1/B as mean's backward forms
    it); eqs. 7-8's clamp, minimum (ties split in halves), the mass left and its cumulative sum (reversed); the
    sigmoid (aten's kernel) and the gates' linear layer; the statistics' derivative kernel (heads.gate_features,
    the one autograd calls); the softmax (aten's kernel); every exit's CE as logsumexp's and the label's parts,
    summed with the gates' part in the order autograd accumulates them. No graph per batch: autograd's bookkeeping
    was the largest single cost of a DiffBranch step (tests/test_baselines.py checks the bits)."""
    logits = heads.im_logits(feats, last)                              # (T, B, L, K)
    n_trials, b, n_exits, k = logits.shape
    probs = torch.softmax(logits[:, :, :-1, :], dim=-1)                # the gates' inputs
    stats = torch.from_numpy(gate_features_numpy(probs.numpy()))       # (T, B, L-1, 4)
    gate_w = heads.gate_weight.detach()[:, None]
    g = torch.sigmoid((stats * gate_w).sum(-1) + heads.gate_bias.detach()[:, None])
    g_full = torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)
    room = 1.0 - torch.cat([torch.zeros_like(g[..., :1]), torch.cumsum(g, dim=-1)], dim=-1)
    m = torch.minimum(g_full, room)
    index = labels[None, :, None, None].expand(n_trials, b, n_exits, 1)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, index).squeeze(-1)
    inv_b = torch.ones((), device=logits.device) / b
    d_ce = inv_b * m.clamp_min(0.0)                                    # P(G=l|x) / B
    d_m = torch.where(m >= 0, inv_b * exit_costs(ce, lam, ic_norm), 0.0)
    d_m = torch.where(g_full == room, d_m / 2, d_m)
    d_room = d_m.masked_fill(g_full < room, 0.0)
    d_g = d_m.masked_fill(g_full > room, 0.0)[..., :-1] + (-d_room[..., 1:]).flip(-1).cumsum(-1).flip(-1)
    d_a = torch.ops.aten.sigmoid_backward(d_g, g)
    grad_gate_w = (d_a[..., None] * stats).sum(1)
    grad_gate_b = d_a.sum(1)
    d_stats = (d_a[..., None] * gate_w).contiguous()
    d_probs = torch.empty_like(probs)
    _features_grad_kernel(probs.numpy().reshape(-1, k), d_stats.numpy().reshape(-1, d_stats.shape[-1]),
                          d_probs.numpy().reshape(-1, k))
    d_logits = d_ce[..., None] * (logits - lse[..., None]).exp()
    d_logits = d_logits + torch.zeros_like(logits).scatter_add_(-1, index, -d_ce[..., None])
    d_logits[:, :, :-1] += torch.ops.aten._softmax_backward_data(d_probs, probs, -1, probs.dtype)
    grad_w, grad_b = [], []
    for l, x in enumerate(feats[:len(heads.im_weight)]):
        d = d_logits[:, :, l].permute(1, 0, 2).reshape(b, n_trials * k)
        grad_w.append((x.T @ d).view(x.shape[1], n_trials, k))
        grad_b.append(d.sum(0).view(n_trials, k))
    return grad_w + grad_b + [grad_gate_w, grad_gate_b]


def train_diffbranch(data: TrainData, warm: WarmState, lambdas, settings: TrainSettings) -> StackedHeads:
    """All lambdas stacked, IMs from the JEI-DNN warm-up, Adam on IMs and gates jointly for the bi-level epoch
    budget (max_epochs - warmup_epochs); each trial kept at its best V2 objective with JEI-DNN's stopping rule."""
    device, n_trials = settings.device, len(lambdas)
    heads = warm.start_heads(data, [(settings.lr, settings.weight_decay, settings.warmup_epochs)] * n_trials,
                             seed_streams(settings.seed)[0], device)
    heads.epochs_trained[:] = 0                             # from here: the epochs of the kept state
    params = heads.im_params() + heads.gate_params()
    for p in params:
        p.requires_grad_(True)
    n_w = len(heads.im_weight)
    lam = torch.tensor([float(x) for x in lambdas], device=device)
    ic_norm = data.ic_norm.to(device)
    adam = StackedAdam(params, [1] * n_w + [0] * n_w + [0, 0], torch.full((n_trials,), settings.lr, device=device),
                       torch.full((n_trials,), settings.weight_decay, device=device))
    best, tracker = heads.select(list(range(n_trials))), BestState((n_trials,), device=device)
    active = torch.ones(n_trials, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(seed_streams(settings.seed)[2])
    for epoch in range(settings.max_epochs - settings.warmup_epochs):
        for batch in data.train.epoch(settings.batch_size, gen, device, stacked=False):
            if torch.device(device).type == "cpu":
                adam.step(diffbranch_grads(heads, *batch, lam, ic_norm), active)
            else:   # the statistics' derivative kernel is the CPU's: autograd through the torch statistics
                adam.step(torch.autograd.grad(diffbranch_loss(heads, *batch, lam, ic_norm), params), active)
        objective = exited_metrics(heads, data.v2, lam, ic_norm)["objective"]
        improved = tracker.update(objective, where=active)
        changed = improved.nonzero().squeeze(1)
        copy_trials(best, heads, changed, changed)
        best.epochs_trained[improved.cpu()] = epoch + 1
        active &= tracker.stale < settings.patience
        if not bool(active.any()):
            break
    return best


# ---- operating points --------------------------------------------------------------------------------------------
def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def threshold_points(method: str, logits: dict, labels: dict, p_grid, extra: dict,
                     confidence: dict | None = None) -> list[MethodPoint]:
    """logits/labels: {"v1", "v2", "test"} -> (N, L, K) arrays / (N,). One MethodPoint per p, all sharing the same
    logits arrays (no copies). The exits are gated on max softmax, or on `confidence` ({"v1", "v2", "test"} ->
    (N, L) tensors) when given."""
    if confidence is None:
        sweep = threshold_sweep(logits["v1"], {"v2": logits["v2"], "test": logits["test"]}, p_grid)
    else:
        sweep = budget_sweep(confidence["v1"], {"v2": confidence["v2"], "test": confidence["test"]}, p_grid)
    return [threshold_point(method, pt["p"], logits, labels, {s: pt[s] for s in ("v2", "test")},
                            pt["v1_exit_index"], pt["thresholds"], pt["fractions"], extra) for pt in sweep]


def threshold_point(method: str, p: float, logits: dict, labels: dict, exits: dict, v1_exits, thresholds,
                    fractions, extra: dict) -> MethodPoint:
    """One threshold-gated operating point: `exits` {"v2", "test"} -> (N,) exit index, v1_exits those of V1 (the
    histogram kept in its rows), the per-exit thresholds and target shares it was fitted with."""
    n_exits = logits["v1"].shape[1]
    info = {"p": p, "fractions": np.asarray(fractions).tolist(), "thresholds": np.asarray(thresholds).tolist(),
            "v1_exit_hist": np.bincount(v1_exits, minlength=n_exits).tolist(), **extra}
    return MethodPoint(method, p, ExitOutputs(logits["v2"], exits["v2"], labels["v2"]),
                       ExitOutputs(logits["test"], exits["test"], labels["test"]), info)


def gated_points(method: str, heads: StackedHeads, lambdas, v2: Split, test: Split,
                 extra: dict) -> list[MethodPoint]:
    """One MethodPoint per trial of a learned-gate model: deterministic exits, P(E^l|x) > 0.5 (section 5)."""
    outs = {}
    for name, split in (("v2", v2), ("test", test)):
        logits, g = split_outputs(heads, split)
        outs[name] = (_numpy(logits), exit_decision(exit_distribution(g)).cpu().numpy(), split.labels.cpu().numpy())
    return [MethodPoint(method, float(lam),
                        *(ExitOutputs(outs[s][0][t], outs[s][1][t], outs[s][2]) for s in ("v2", "test")),
                        {"lam": float(lam), "epochs": int(heads.epochs_trained[t]), **extra})
            for t, lam in enumerate(lambdas)]


def run_baselines(data: TrainData, test: Split, methods, settings: TrainSettings,
                  baseline_settings: BaselineSettings = BaselineSettings(), lambdas=(), warm: WarmState | None = None
                  ) -> list[MethodPoint]:
    """Train and gate every requested method (names in METHODS) from the cache; return their operating points.

    test: the test split, resident or streamed (same exits and frozen-logit convention as data). lambdas: the cost
    weights of the learned-gate methods (fixed-ims, diffbranch), normally the JEI-DNN sweep's. warm: a WarmState
    from heads.train.bilevel.warmup with settings' (lr, weight_decay) to re-use (the sweep's); one is trained here when
    absent or too short (threshold needs max_epochs warm-up epochs, the others warmup_epochs).
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown baseline method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if any(m in LAMBDA_METHODS for m in methods) and not len(lambdas):
        raise ValueError(f"{' and '.join(m for m in methods if m in LAMBDA_METHODS)} need lambdas")
    if len(test.exit_dims) != len(data.exit_dims) or test.has_logits == data.trains_last:
        raise ValueError("the test split does not match the training data (number of exits or frozen last logits)")
    bs = baseline_settings
    splits = {"v1": data.v1, "v2": data.v2, "test": test}
    labels = {name: split.labels.cpu().numpy() for name, split in splits.items()}

    warm_users = [m for m in methods if m in ("threshold", "threshold-warmup", *LAMBDA_METHODS)]
    need_warm = max([settings.max_epochs if m == "threshold" else settings.warmup_epochs for m in warm_users],
                    default=0)
    warm_seconds = 0.0
    if warm_users and (warm is None or not warm.reaches(need_warm)
                       or (settings.lr, settings.weight_decay) not in warm.optim):
        log.info(f"warm-up: {need_warm} epochs")
        t0 = time.perf_counter()
        long = dataclasses.replace(settings, max_epochs=need_warm + 1, warmup_epochs=need_warm)
        warm = warmup(data, long)
        warm_seconds = time.perf_counter() - t0

    points = []
    for method in methods:
        log.info(f"baseline {method}")
        t0 = time.perf_counter()
        if method in ("threshold", "threshold-warmup", "boosted", "l2w"):
            if method == "boosted":
                heads = train_boosted(data, settings, bs.boost_gamma)
            elif method == "l2w":
                heads = train_l2w(data, settings, bs)[0]
            else:
                epochs = settings.max_epochs if method == "threshold" else settings.warmup_epochs
                heads = _warm_ims(data, warm, settings, epochs)
            logits = {name: split_logits(heads, split)[0] for name, split in splits.items()}
            if method == "boosted":
                n_boosted = len(heads.im_weight)
                logits = {name: boosted_ensemble(z, bs.boost_gamma, n_boosted) for name, z in logits.items()}
            seconds = time.perf_counter() - t0 + (0.0 if method in ("boosted", "l2w") else warm_seconds)
            extra = {"train_seconds": seconds, "epochs": int(heads.epochs_trained[0])}
            points += threshold_points(method, {k: _numpy(v) for k, v in logits.items()}, labels, bs.p_grid, extra)
        else:
            train = train_fixed_ims if method == "fixed-ims" else train_diffbranch
            heads = train(data, warm, lambdas, settings)
            extra = {"train_seconds": time.perf_counter() - t0 + warm_seconds}
            points += gated_points(method, heads, lambdas, data.v2, test, extra)
    return points
