"""DiffBranch (Scardapane et al. 2020, appendix 9.13): from JEI-DNN's warm-up, IMs and gates (the same gate
inputs) trained jointly by gradient descent on the expected loss, eq. 9; one model per lambda, stacked. The
gradient is in closed form on the CPU: diffbranch_grads (autograd's formulas and order, equal to autograd on
diffbranch_loss bit for bit) and, what training runs, DiffBranchStep (the same formulas fused into one compiled pass
per sample, equal up to float rounding).
"""
import numba
import numpy as np
import torch

from heads import cpu
from heads.model.exits import exit_costs, exit_distribution, exit_mass_terms
from heads.model.gate_features import _features_grad_kernel, gate_features_numpy
from heads.model.stack import StackedHeads, gate_pre_activation
from heads.train.adam import StackedAdam
from heads.train.bilevel import BestState, copy_trials, exited_metrics, seed_streams, TrainSettings, WarmState
from heads.train.data import TrainData
from heads.train.kernels import exit_cross_entropy


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
    g = torch.sigmoid(gate_pre_activation(stats, gate_w, heads.gate_bias.detach()[:, None]))
    g_full, room = exit_mass_terms(g)
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


@numba.njit(parallel=True, cache=True)
def _logit_grads(logits, labels, lam_ic, gate_w, gate_b, d_logits, grad_gate_w, grad_gate_b):
    """diffbranch_grads up to the IM products, one pass per sample: logits (L, B, T, K) float32 (exit-major, as the
    products write them), labels (B,), lam_ic (T, L) = lam_t IC_norm^l, gate_w (T, L-1, 4), gate_b (T, L-1) ->
    d_logits (L, B, T, K) float32 (the loss's gradient in every logit), grad_gate_w (T, L-1, 4) and grad_gate_b
    (T, L-1) float64, accumulated. Trials in parallel, each trial's samples in order, so its gate sums do not
    depend on the thread count. float64 throughout, and log p taken from the log-softmax (z - max - log sum exp)
    rather than by a log of each probability: one exponential per logit is the whole transcendental cost. The
    statistics and their derivatives are the formulas of heads/model/gate_features.py (row_features and
    _features_grad_kernel), with the same conventions (terms of p = 0 vanish; the max and the margin pass their
    gradient to the first largest and the next largest entry)."""
    n_exits, b, n_trials, k = logits.shape
    inv_b = 1.0 / b
    for t in numba.prange(n_trials):
        p = np.empty((n_exits, k))
        log_p = np.empty((n_exits, k))
        stats = np.empty((n_exits - 1, 4))
        sums = np.empty((n_exits - 1, 2))        # sum p^2 and sum p^2 log p of each gated exit
        tops = np.empty((n_exits - 1, 2), dtype=np.int64)
        g = np.empty(n_exits)
        rooms = np.empty(n_exits)
        ce = np.empty(n_exits)
        d_ce = np.empty(n_exits)
        d_g = np.empty(n_exits)
        for i in range(b):
            y = labels[i]
            for l in range(n_exits):
                top = np.float64(logits[l, i, t, 0])
                for c in range(1, k):
                    top = max(top, np.float64(logits[l, i, t, c]))
                total = 0.0
                for c in range(k):
                    p[l, c] = np.exp(np.float64(logits[l, i, t, c]) - top)
                    total += p[l, c]
                log_total = np.log(total)
                for c in range(k):
                    p[l, c] /= total
                    log_p[l, c] = np.float64(logits[l, i, t, c]) - top - log_total
                ce[l] = -log_p[l, y]
            for l in range(n_exits - 1):
                top1, top2, i1, i2 = -1.0, -1.0, 0, 0
                ent, sq, sq_log = 0.0, 0.0, 0.0
                for c in range(k):
                    q = p[l, c]
                    if q > top1:
                        top2, i2, top1, i1 = top1, i1, q, c
                    elif q > top2:
                        top2, i2 = q, c
                    if q > 0.0:
                        ent -= q * log_p[l, c]
                        sq += q * q
                        sq_log += q * q * log_p[l, c]
                stats[l, 0], stats[l, 1] = top1, ent
                stats[l, 2], stats[l, 3] = np.log(sq) - 2.0 * sq_log / sq, top1 - top2
                sums[l, 0], sums[l, 1], tops[l, 0], tops[l, 1] = sq, sq_log, i1, i2
                a = gate_b[t, l]
                for c in range(4):
                    a += stats[l, c] * gate_w[t, l, c]
                g[l] = 1.0 / (1.0 + np.exp(-a))
            g[n_exits - 1] = 1.0
            # eqs. 7-8: P(G=l) = min(g^l, room^l), room^l = 1 - sum_{j<l} g^j; the loss sum_l P(G=l) C^l / B
            room, d_room_after = 1.0, 0.0
            for l in range(n_exits):
                rooms[l] = room
                room -= g[l]
            for l in range(n_exits - 1, -1, -1):
                m = min(g[l], rooms[l])
                d_ce[l] = max(m, 0.0) * inv_b
                d_m = (ce[l] + lam_ic[t, l]) * inv_b if m >= 0.0 else 0.0
                if g[l] == rooms[l]:
                    d_m *= 0.5                         # a tie: half to each side of the minimum
                d_room = d_m if g[l] >= rooms[l] else 0.0
                direct = d_m if g[l] <= rooms[l] else 0.0
                d_g[l] = direct - d_room_after         # every later room falls with g^l
                d_room_after += d_room
            for l in range(n_exits):
                d_max = d_ent = d_pow = d_margin = dot = 0.0
                if l < n_exits - 1:
                    d_a = d_g[l] * g[l] * (1.0 - g[l])  # the sigmoid's derivative
                    grad_gate_b[t, l] += d_a
                    for c in range(4):
                        grad_gate_w[t, l, c] += d_a * stats[l, c]
                    d_max, d_ent = d_a * gate_w[t, l, 0], d_a * gate_w[t, l, 1]
                    d_pow, d_margin = d_a * gate_w[t, l, 2], d_a * gate_w[t, l, 3]
                    sq, sq_log = sums[l, 0], sums[l, 1]
                    # the statistics' gradient in p (row_features_grad), then through the softmax
                    for c in range(k):
                        q, lq = p[l, c], log_p[l, c]
                        d = 0.0
                        if q > 0.0:
                            d = -d_ent * (lq + 1.0) + d_pow * (2.0 * q / sq - 2.0 * (2.0 * q * lq + q) / sq
                                                                + 4.0 * q * sq_log / (sq * sq))
                        if c == tops[l, 0]:
                            d += d_max + d_margin
                        if c == tops[l, 1]:
                            d -= d_margin
                        log_p[l, c] = d                # log p is used up: its slot holds d stat / d p
                        dot += d * q
                for c in range(k):
                    q = p[l, c]
                    d = d_ce[l] * q
                    if c == y:
                        d -= d_ce[l]
                    if l < n_exits - 1:
                        d += q * (log_p[l, c] - dot)
                    d_logits[l, i, t, c] = d


class DiffBranchStep:
    """train_diffbranch's CPU gradient: the IM logits of every exit and trial written exit-major (one product per
    exit), _logit_grads, then each exit's weight gradient as one product x^T d over all trials. The same
    gradient as diffbranch_grads up to float rounding (tests/test_baselines.py); a fraction of its time, whose
    forty-odd tensor operations per batch on (T, B, L, K) tensors were the cost."""

    def __init__(self, heads: StackedHeads, lam: torch.Tensor, ic_norm: torch.Tensor):
        self.heads = heads
        self.lam_ic = (lam.double()[:, None] * ic_norm.double()[None, :]).numpy()

    @torch.no_grad()
    def __call__(self, feats, labels, last) -> list[torch.Tensor]:
        heads = self.heads
        n_trials, k, n_w = heads.n_trials, heads.num_classes, len(heads.im_weight)
        b = labels.shape[0]
        logits = torch.empty(heads.n_exits, b, n_trials * k)
        for l, (x, w, bias) in enumerate(zip(feats, heads.im_weight, heads.im_bias)):
            torch.addmm(bias.detach().reshape(1, -1), x, w.detach().reshape(w.shape[0], -1), out=logits[l])
        if n_w < heads.n_exits:
            logits[-1] = last.repeat(1, n_trials)
        d_logits = torch.empty_like(logits)
        grad_gate_w = np.zeros(tuple(heads.gate_weight.shape))
        grad_gate_b = np.zeros(tuple(heads.gate_bias.shape))
        cpu.match_torch_threads()
        _logit_grads(logits.view(heads.n_exits, b, n_trials, k).numpy(), labels.numpy(), self.lam_ic,
                     heads.gate_weight.detach().numpy(), heads.gate_bias.detach().numpy(),
                     d_logits.view(heads.n_exits, b, n_trials, k).numpy(), grad_gate_w, grad_gate_b)
        grad_w = [(x.T @ d_logits[l]).view(x.shape[1], n_trials, k) for l, x in enumerate(feats[:n_w])]
        grad_b = [d_logits[l].sum(0).view(n_trials, k) for l in range(n_w)]
        return grad_w + grad_b + [torch.from_numpy(grad_gate_w).float(), torch.from_numpy(grad_gate_b).float()]


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
    # torch's fused Adam while every trial trains (the trials share lr and weight decay); per-tensor ops after
    adam = StackedAdam(params, [1] * n_w + [0] * n_w + [0, 0], torch.full((n_trials,), settings.lr, device=device),
                       torch.full((n_trials,), settings.weight_decay, device=device), backend="fused")
    best, tracker = heads.select(list(range(n_trials))), BestState((n_trials,), device=device)
    active = torch.ones(n_trials, dtype=torch.bool, device=device)
    all_active = True
    gen = torch.Generator().manual_seed(seed_streams(settings.seed)[2])
    step = DiffBranchStep(heads, lam, ic_norm) if torch.device(device).type == "cpu" else None
    for epoch in range(settings.max_epochs - settings.warmup_epochs):
        for batch in data.train.epoch(settings.batch_size, gen, device, stacked=False):
            mask = None if all_active else active
            if step is not None:
                adam.step(step(*batch), mask)
            else:   # the statistics' derivative kernel is the CPU's: autograd through the torch statistics
                adam.step(torch.autograd.grad(diffbranch_loss(heads, *batch, lam, ic_norm), params), mask)
        objective = exited_metrics(heads, data.v2, lam, ic_norm)["objective"]
        improved = tracker.update(objective, where=active)
        changed = improved.nonzero().squeeze(1)
        copy_trials(best, heads, changed, changed)
        best.epochs_trained[improved.cpu()] = epoch + 1
        active &= tracker.stale < settings.patience
        all_active = bool(active.all())
        if not bool(active.any()):
            break
    return best
