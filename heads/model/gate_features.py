"""The four uncertainty statistics a JEI-DNN gate reads from its IM's softmax (appendix 9.9).

    feats = gate_features_numpy(probs)   # (..., K) numpy -> (..., 4), numba kernel (parallel over many rows)
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

One set of numbers. The two paths use the same formulas in the same float64 arithmetic (the entropy of q from
sum p^2 and sum p^2 log p, the margin as a float64 difference), add the K terms in the same order and round once
to the input's dtype, so on the CPU they give the same float32 statistics bit for bit (tests/test_gate_features.py;
torch's vectorised log and the kernel's may differ in a float64 last bit, which the float32 rounding absorbs in
practice). That is what lets the runtime (deploy/runtime.py: torch ops on a few rows) take the exits the
simulation (this kernel on the whole cache) took. The order matters: the entropy of q is a difference of two
near-equal terms for a confident IM, and a sum in another order changed about 0.1 % of those values.

Thread pools. The parallel kernel is for large inputs; below PARALLEL_ELEMENTS probabilities the same row code runs
compiled without prange, so a small batch never waits for the pool (heads/cpu.py: why a launch can cost a
scheduler tick on a busy machine, which the serial kernel needs a million probabilities to spend).
"""
import numba
import numpy as np
import torch

from heads import cpu

FEATURE_NAMES = ("max_prob", "entropy", "entropy_pow", "margin")
PARALLEL_ELEMENTS = 1 << 20   # probabilities from which a parallel launch can pay for itself (bench/README.md)


@numba.njit(inline="always")
def row_features(probs, i, out):
    """out[i] = the four statistics of probs[i] (numba; the kernels here and heads.model.exits.ExitRule share it)."""
    top1 = -1.0
    top2 = -1.0
    ent = 0.0
    sq = 0.0
    sq_log = 0.0  # sum p^2 log p, for the temperature-0.5 entropy without a second array
    for j in range(probs.shape[1]):
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


# the same row code (no fastmath: LLVM keeps its order of operations) over the rows in parallel, or in turn
@numba.njit(parallel=True, cache=True)
def _features_parallel(probs, out):
    for i in numba.prange(probs.shape[0]):
        row_features(probs, i, out)


@numba.njit(cache=True)
def _features_serial(probs, out):
    for i in range(probs.shape[0]):
        row_features(probs, i, out)


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
    if flat.size >= PARALLEL_ELEMENTS:
        cpu.match_torch_threads()
        _features_parallel(flat, out)
    else:
        _features_serial(flat, out)
    return out.reshape(probs.shape[:-1] + (4,))


class _SumInOrder(torch.autograd.Function):
    """The sum over the last axis, added left to right (torch.cumsum's order on the CPU, the kernel's; a plain sum's
    vectorised order is not). Its gradient is a plain sum's: autograd through the cumsum would flip, cumsum and flip
    the whole tensor again to return that same broadcast."""

    @staticmethod
    def forward(ctx, terms):
        ctx.shape = terms.shape
        return torch.cumsum(terms, dim=-1)[..., -1]

    @staticmethod
    def backward(ctx, grad):
        return grad[..., None].expand(ctx.shape)


def _sum_in_order(terms: torch.Tensor) -> torch.Tensor:
    return _SumInOrder.apply(terms)


def gate_features_torch(probs: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (..., 4), the same statistics as gate_features_numpy (the kernel's formulas and
    order in float64, module docstring), differentiable."""
    _check_probs(probs.shape)
    p = probs.double()
    top2 = torch.topk(p, 2, dim=-1).values
    # log of 1 where p == 0: the term is 0 and so is its gradient (a clamp would leave a log(eps) gradient)
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    sq = p * p
    s = _sum_in_order(sq)
    ent_pow = torch.log(s) - 2.0 * _sum_in_order(sq * log_p) / s
    feats = torch.stack([top2[..., 0], -_sum_in_order(p * log_p), ent_pow, top2[..., 0] - top2[..., 1]], dim=-1)
    return feats.to(probs.dtype)


@numba.njit(cache=True)
def _features_grad_kernel(probs, grad_out, grad_in):
    """grad_in[i] = d(sum_c grad_out[i, c] feature_c(probs[i])) / d probs[i], float64 arithmetic: the derivatives of
    row_features' statistics, with gate_features_torch's conventions (p = 0 terms and their gradient are 0; the
    max and the margin pass their gradient to the first largest and the next largest entry)."""
    log_p = np.zeros(probs.shape[1])
    for i in range(probs.shape[0]):
        top1, top2, i1, i2 = -1.0, -1.0, 0, 0
        sq, sq_log = 0.0, 0.0
        for j in range(probs.shape[1]):
            p = np.float64(probs[i, j])
            if p > top1:
                top2, i2, top1, i1 = top1, i1, p, j
            elif p > top2:
                top2, i2 = p, j
            if p > 0.0:
                log_p[j] = np.log(p)
                sq += p * p
                sq_log += p * p * log_p[j]
        g_max, g_ent, g_pow, g_margin = (np.float64(grad_out[i, 0]), np.float64(grad_out[i, 1]),
                                         np.float64(grad_out[i, 2]), np.float64(grad_out[i, 3]))
        for j in range(probs.shape[1]):
            p = np.float64(probs[i, j])
            d = 0.0
            if p > 0.0:
                lp = log_p[j]
                # entropy: -(log p + 1); entropy of q = p^2/S: log S - 2 T/S, T = sum p^2 log p
                d = -g_ent * (lp + 1.0) + g_pow * (2.0 * p / sq - 2.0 * (2.0 * p * lp + p) / sq
                                                    + 4.0 * p * sq_log / (sq * sq))
            grad_in[i, j] = d
        grad_in[i, i1] += g_max + g_margin
        grad_in[i, i2] -= g_margin


class _GateFeaturesCPU(torch.autograd.Function):
    """gate_features with a gradient on the CPU: the kernel forward (gate_features_numpy's numbers) and the
    derivatives in one more pass per row, instead of a dozen float64 torch ops and their backward."""

    @staticmethod
    def forward(ctx, probs):
        ctx.save_for_backward(probs)
        return torch.from_numpy(gate_features_numpy(probs.detach().numpy()))

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        flat = np.ascontiguousarray(probs.detach().numpy().reshape(-1, probs.shape[-1]))
        grad_in = np.empty_like(flat)
        _features_grad_kernel(flat, np.ascontiguousarray(grad.numpy().reshape(-1, 4)), grad_in)
        return torch.from_numpy(grad_in).view(probs.shape)


def gate_features(probs: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (..., 4): the numba kernels on the CPU (one pass over K per row, several times
    faster than the torch ops; with a gradient, _GateFeaturesCPU), gate_features_torch on a GPU."""
    if probs.device.type != "cpu":
        return gate_features_torch(probs)
    _check_probs(probs.shape)
    if probs.requires_grad:
        return _GateFeaturesCPU.apply(probs)
    return torch.from_numpy(gate_features_numpy(probs.numpy()))
