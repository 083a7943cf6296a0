"""What the IM-trained baselines share: their settings, one IM stack from JEI-DNN's initial weights or
warm-up, the early-stopped training loop, and RunParams (one trial's IM weights as one tensor per run of
equal-width exits, so a product over those exits is one batched call).
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from heads.baselines.thresholds import DEFAULT_P_GRID
from heads.model.stack import StackedHeads
from heads.train.bilevel import BestState, seed_streams, TrainSettings, WarmState
from heads.train.data import Split, split_outputs, TrainData


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


def single_model(data: TrainData, settings: TrainSettings) -> StackedHeads:
    """One IM stack (trial axis of 1) with the same initial weights as JEI-DNN; the gates are never used."""
    return StackedHeads.init(data.exit_dims, data.num_classes, 1, data.trains_last, seed_streams(settings.seed)[0],
                             settings.device)


def warm_ims(data: TrainData, warm: WarmState, settings: TrainSettings, epochs: int) -> StackedHeads:
    return warm.start_heads(data, [(settings.lr, settings.weight_decay, epochs)], seed_streams(settings.seed)[0],
                            settings.device)


@torch.no_grad()
def split_logits(heads: StackedHeads, split: Split) -> torch.Tensor:
    """(T, N, L, K) IM logits of every trial on a whole split (no gates: baselines train IMs only)."""
    return split_outputs(heads, split, gates=False)[0]


def fit_ims(data: TrainData, settings: TrainSettings, make_step: Callable, v2_score: Callable) -> StackedHeads:
    """Train one IM stack with step = make_step(heads), step(feats, labels, last) per mini-batch (it owns the
    optimiser); keep the state with the lowest v2_score(heads), stop after `patience` epochs without gain."""
    heads = single_model(data, settings)
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
        once (weighted_ce_grads), or exit_sums=True one exit's slice at a time (autograd's addmm backward)."""
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


@torch.no_grad()
def ce_residual(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, K) logits -> softmax - onehot(labels): every exit's cross-entropy gradient in its logits."""
    residual = torch.softmax(logits, -1)
    residual[torch.arange(len(labels)), :, labels] -= 1.0
    return residual


def weighted_ce_coef(residual: torch.Tensor, weights: torch.Tensor, n_trained: int) -> torch.Tensor:
    """The logit gradient weights_bl (softmax_bl - onehot_b) / B of the first n_trained exits, (B, n_trained, K),
    from residual (B, L, K) softmax - onehot and weights (B, >= n_trained); the one formula (and rounding) the
    reference and the batched steps share."""
    return residual[:, :n_trained] * (weights[:, :n_trained, None] / residual.shape[0])


@torch.no_grad()
def weighted_ce_grads(feats, residual: torch.Tensor, weights: torch.Tensor, n_trained: int):
    """Gradient of _weighted_loss in the IM parameters, closed form for linear IMs: exit l's logit gradient of
    sample b is weights_bl (softmax_bl - onehot_b) / B. residual: (B, L, K) softmax - onehot; weights: (B, L).
    Returns [(D_l, 1, K) weight grads] + [(1, K) bias grads] for the n_trained IMs (heads.im_params() order)."""
    coef = weighted_ce_coef(residual, weights, n_trained)                                     # (B, L', K)
    grad_w = [(x.T @ coef[:, l]).unsqueeze(1) for l, x in enumerate(feats[:n_trained])]
    return grad_w + [coef.sum(0)[l][None] for l in range(n_trained)]
