"""L2W-DEN (Han et al. 2022b): IMs trained with per-sample, per-exit loss weights from a weight-prediction
network that is meta-trained on held-out half-batches routed by the budget's exit shares; threshold gating. The
training step is in closed form (L2WStep); l2w_meta_gradient, l2w_residual and _weighted_loss are the reference
formulation the tests compare it with.
"""
import dataclasses

import torch
from torch import nn

from heads.baselines.common import (BaselineSettings, RunParams, ce_residual, fit_ims, split_logits,
                                   weighted_ce_coef, weighted_ce_grads)
from heads.baselines.thresholds import (budget_fractions, cumulative_targets, fit_thresholds, max_softmax,
                                        route_by_budget)
from heads.model.stack import StackedHeads
from heads.train.adam import StackedAdam
from heads.train.bilevel import seed_streams, TrainSettings
from heads.train.data import TrainData
from heads.train.kernels import exit_cross_entropy


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
    takes its gradient in closed form (weighted_ce_grads); the tests differentiate this to check it."""
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


def l2w_residual(heads: StackedHeads, feats, labels, last) -> tuple[torch.Tensor, torch.Tensor]:
    """One trial's (B, L, K) softmax - onehot of every exit and its (B, L) cross-entropy on a batch (with
    l2w_meta_gradient and weighted_ce_grads, the reference step L2WStep is tested against)."""
    with torch.no_grad():
        logits = heads.im_logits(feats, last)[0]
        return ce_residual(logits, labels), exit_cross_entropy(logits[None], labels)[0]


def l2w_meta_gradient(heads: StackedHeads, wpn: nn.Module, feats, residual, ce, meta_rows, fractions,
                      bs: BaselineSettings) -> tuple[torch.Tensor, ...]:
    """The WPN's gradient of L2W-DEN's meta objective (train_l2w): the budget loss on meta_rows of the IMs after
    one look-ahead SGD step on the weighted loss of the train half (feats, its residual and ce, l2w_residual).
    The reference formulation (autograd through the look-ahead logits and the WPN); training runs L2WStep."""
    n_trained, params = len(heads.im_weight), list(wpn.parameters())
    weights = l2w_weights(wpn(ce), bs.l2w_epsilon)                                           # in the WPN's graph
    grads = weighted_ce_grads(feats, residual, weights.detach(), n_trained)
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
    l2w_meta_gradient through the budget loss and autograd, weighted_ce_grads), which tests/test_baselines.py runs
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
            coef = weighted_ce_coef(residual, weights, self.ims.n_trained)
            self.update.step(self.ims.grads(train_rows[0], coef))

    @torch.no_grad()
    def residual(self, x, labels, last) -> tuple[torch.Tensor, torch.Tensor]:
        """l2w_residual: (B, L, K) softmax - onehot and (B, L) cross-entropy of every exit on a half-batch."""
        z = self.ims.logits(x, last)
        return ce_residual(z, labels), exit_cross_entropy(z[None], labels)[0]

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
        grads = ims.grads(x, weighted_ce_coef(residual, weights, self.ims.n_trained))
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

    return fit_ims(data, settings, lambda heads: L2WStep(heads, wpn, settings, bs, fractions), v2_score), wpn
