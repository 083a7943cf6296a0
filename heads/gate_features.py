"""The four uncertainty statistics a JEI-DNN gate reads from its IM's softmax (appendix 9.9).

    feats = gate_features_numpy(probs)   # (..., K) numpy -> (..., 4), numba kernel, parallel over rows
    feats = gate_features(probs)         # a tensor: the numba kernel on CPU without gradient, else torch
    feats = gate_features_torch(probs)   # (..., K) tensor -> (..., 4), differentiable, on the tensor's device

Columns, in this order (FEATURE_NAMES):
  0 max_prob      max_k p_k
  1 entropy       -sum_k p_k log p_k
  2 entropy_pow   the same entropy of q = p^2 / sum_k p_k^2 (the probabilities at temperature 0.5)
  3 margin        p_(1) - p_(2), the two largest probabilities

Sign of the entropies: appendix 9.9 writes h = sum_k p_k log p_k, which is minus the entropy (<= 0). We use the
standard non-negative entropy -sum p log p. For a gate `Linear(4, 1)` the sign only flips the learned weight, so
the model class is identical; the non-negative form is what a reader expects when plotting or logging it.
0 log 0 = 0 in both paths, and the torch path keeps finite gradients at p = 0.
"""
import numba
import numpy as np
import torch

from heads import cpu

cpu.configure()   # numba on torch's OpenMP threads, denormals flushed: before the first parallel launch

FEATURE_NAMES = ("max_prob", "entropy", "entropy_pow", "margin")


@numba.njit(parallel=True, cache=True)
def _features_kernel(probs, out):
    n, k = probs.shape
    for i in numba.prange(n):
        top1 = -1.0
        top2 = -1.0
        ent = 0.0
        sq = 0.0
        sq_log = 0.0  # sum p^2 log p, for the temperature-0.5 entropy without a second array
        for j in range(k):
            p = np.float64(probs[i, j])
            if p > top1:
                top2 = top1
                top1 = p
            elif p > top2:
                top2 = p
            if p > 0.0:
                lp = np.log(p)
                ent -= p * lp
                sq += p * p
                sq_log += p * p * lp
        # q = p^2/S  =>  -sum q log q = log S - (2/S) sum p^2 log p
        ent_pow = np.log(sq) - 2.0 * sq_log / sq if sq > 0.0 else 0.0
        out[i, 0] = top1
        out[i, 1] = ent
        out[i, 2] = ent_pow
        out[i, 3] = top1 - top2


def _check_probs(shape) -> None:
    if len(shape) < 1 or shape[-1] < 2:
        raise ValueError(f"gate features need probabilities of shape (..., K) with K >= 2, got {tuple(shape)}")


def gate_features_numpy(probs: np.ndarray) -> np.ndarray:
    """(..., K) probabilities -> (..., 4) [max_prob, entropy, entropy_pow, margin]; float32 in -> float32 out."""
    probs = np.asarray(probs)
    _check_probs(probs.shape)
    dtype = np.float32 if probs.dtype == np.float32 else np.float64
    flat = np.ascontiguousarray(probs.reshape(-1, probs.shape[-1]), dtype=dtype)
    out = np.empty((flat.shape[0], 4), dtype=dtype)
    _features_kernel(flat, out)
    return out.reshape(probs.shape[:-1] + (4,))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    # log of 1 where p == 0: the term is 0 and so is its gradient (a clamp would leave a log(eps) gradient).
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return -(p * torch.log(safe)).sum(-1)


def gate_features_torch(probs: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (..., 4), the same statistics as gate_features_numpy, differentiable."""
    _check_probs(probs.shape)
    top2 = torch.topk(probs, 2, dim=-1).values
    sq = probs * probs
    q = sq / sq.sum(-1, keepdim=True)
    return torch.stack([top2[..., 0], _entropy(probs), _entropy(q), top2[..., 0] - top2[..., 1]], dim=-1)


def gate_features(probs: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (..., 4): the numba kernel for CPU tensors without gradient (one pass over K per
    row, several times faster than the torch ops), gate_features_torch otherwise (GPU, or a gradient is needed)."""
    if probs.requires_grad or probs.device.type != "cpu":
        return gate_features_torch(probs)
    return torch.from_numpy(gate_features_numpy(probs.numpy()))
