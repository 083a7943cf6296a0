"""Kernels of the stacked training step (heads/train/engine.py), each in numba (CPU) and in torch (any device, and the
reference the numba versions are tested against):

    softmax_stats(z, p, labels, feats, ce, pred)    # z, p: (L, B, T, K) logits and their softmax
    weighted_ce_grad(p, labels, coef)               # p <- coef * (p - onehot(y)), in place
    exit_cross_entropy(logits, labels)              # the same cross-entropy in torch (autograd, any device)

Why numba and not torch on CPU: one training step of a 20-trial stack touches (L, B, T, K) = 14 x 64 x 20 x 100
logits. torch needs a softmax, a logsumexp, a top-k, two entropies and their temporaries, each a full pass; one
numba pass over (z, p) gives every statistic without a transcendental per element (torch's vectorised softmax
supplies the exponentials; numba without SVML computes exp element by element, ~5x slower than torch's softmax):

    log p_k = z_k - m + log p_max       (m = max_k z_k, p_max = 1 / sum_k exp(z_k - m))
    entropy = -log p_max - sum_k p_k (z_k - m)
    entropy of q = p^2 / S2 (S2 = sum_k p_k^2) = log S2 - 2 sum_k p_k^2 (z_k - m) / S2 - 2 log p_max
    CE(y) = m - z_y - log p_max

The statistics are heads.model.gate_features' (same order, same conventions). The optimiser's kernel lives with the
optimiser (heads/train/adam.py).
"""
import numba
import numpy as np
import torch

from heads import cpu
from heads.model.gate_features import gate_features_torch


@numba.njit(parallel=True, fastmath=True, cache=True)
def _stats_kernel(z, p, labels, feats, ce, pred, with_pred):
    n_exits, n_rows, n_trials, k = z.shape
    n_gated = feats.shape[2]
    for lb in numba.prange(n_exits * n_rows):
        l = lb // n_rows
        b = lb % n_rows
        y = labels[b]
        for t in range(n_trials):
            zr = z[l, b, t]
            pr = p[l, b, t]
            # one pass: max z, the two largest p (a tie gives second == top), and the sums behind the entropies;
            # sum p (z - m) = sum p z - m sum p, accumulated in float64 so the subtraction loses nothing
            m = zr[0]
            top = np.float32(0.0)
            second = np.float32(0.0)
            s_p = 0.0
            s_pz = 0.0
            s_2 = 0.0
            s_2z = 0.0
            gated = l < n_gated
            for j in range(k):
                pj = pr[j]
                zj = zr[j]
                m = max(m, zj)
                second = max(second, min(top, pj))
                top = max(top, pj)
                if gated:
                    pd = np.float64(pj)
                    zd = np.float64(zj)
                    s_p += pd
                    s_pz += pd * zd
                    s_2 += pd * pd
                    s_2z += pd * pd * zd
            if with_pred:
                i = 0
                while zr[i] != m:
                    i += 1
                pred[t, b, l] = i
            md = np.float64(m)
            log_p_max = np.log(np.float64(top))
            ce[t, b, l] = md - zr[y] - log_p_max
            if gated:
                feats[t, b, l, 0] = top
                feats[t, b, l, 1] = -log_p_max - (s_pz - md * s_p)
                feats[t, b, l, 2] = np.log(s_2) - 2.0 * (s_2z - md * s_2) / s_2 - 2.0 * log_p_max
                feats[t, b, l, 3] = top - second


def softmax_stats(z: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, ce: torch.Tensor,
                  pred: torch.Tensor | None = None) -> None:
    """z, p: (L, B, T, K) float32 logits and softmax(z); labels (B,) int64. Writes feats (T, B, G, 4) for the first
    G = feats.shape[2] exits (max_prob, entropy, entropy_pow, margin), ce (T, B, L) the cross-entropy of every exit,
    and pred (T, B, L) int32 each exit's argmax when given. numba on CPU, torch elsewhere."""
    if z.device.type == "cpu":
        dummy = pred if pred is not None else torch.empty((1, 1, 1), dtype=torch.int32)
        cpu.match_torch_threads()
        _stats_kernel(z.numpy(), p.numpy(), labels.numpy(), feats.numpy(), ce.numpy(), dummy.numpy(),
                      pred is not None)
        return
    softmax_stats_torch(z, p, labels, feats, ce, pred)


def softmax_stats_torch(z, p, labels, feats, ce, pred=None) -> None:
    """softmax_stats with torch ops (any device; the reference of the numba kernel)."""
    n_gated = feats.shape[2]
    zt = z.permute(2, 1, 0, 3)                                           # (T, B, L, K) views
    feats.copy_(gate_features_torch(p.permute(2, 1, 0, 3)[:, :, :n_gated]))
    ce.copy_(exit_cross_entropy(zt, labels))
    if pred is not None:
        pred.copy_(zt.argmax(-1))


def exit_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., B, L, K) logits, (B,) labels -> (..., B, L) cross-entropy of every exit (the CE of eqs. 5, 16, 17, 30;
    the kernel above computes the same for the training step)."""
    picked = logits.gather(-1, labels[:, None, None].expand(*logits.shape[:-1], 1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


@numba.njit(parallel=True, fastmath=True, cache=True)
def _grad_kernel(p, labels, coef):
    n_exits, n_rows, n_trials, k = p.shape
    for lb in numba.prange(n_exits * n_rows):
        l = lb // n_rows
        b = lb % n_rows
        y = labels[b]
        for t in range(n_trials):
            c = coef[t, b, l]
            for j in range(k):
                p[l, b, t, j] *= c
            p[l, b, t, y] -= c


def weighted_ce_grad(p: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor) -> None:
    """In place, p[l, b, t] <- coef[t, b, l] * (p[l, b, t] - onehot(labels[b])): the gradient of
    sum coef * CE with respect to the logits, for p: (L', B, T, K) softmax probabilities, coef: (T, B, >= L')."""
    if p.device.type == "cpu":
        cpu.match_torch_threads()
        _grad_kernel(p.numpy(), labels.numpy(), coef.contiguous().numpy())
        return
    weighted_ce_grad_torch(p, labels, coef)


def weighted_ce_grad_torch(p, labels, coef) -> None:
    c = coef[:, :, :p.shape[0]].permute(2, 1, 0)[..., None]              # (L', B, T, 1)
    p.mul_(c)
    index = labels[None, :, None, None].expand(p.shape[0], -1, p.shape[2], 1)
    p.scatter_add_(-1, index, -c)
