"""Count multiply-adds the way fvcore does (one multiply-add = 1), by watching the ATen ops a forward pass runs.

    with MacCounter() as counter:
        model(torch.zeros(1, 3, 224, 224))
    counter.total, counter.by_op

Counted (fvcore's conventions, fvcore/nn/jit_handles.py):
- matrix products: mm, addmm, bmm, baddbmm, mv, dot (nn.Linear, `@`/matmul and einsum reach ATen as these):
  M x K x N per product, the bias add not counted;
- convolution (grouped and depthwise included): batch * prod(weight shape) * prod(output spatial shape), the
  input spatial shape for transposed convolution;
- fused scaled-dot-product attention kernels: the two products, B * H * Nq * Nk * (d_qk + d_v) (fvcore itself
  predates them; the unfused path is counted through its bmm's);
- layer norm and group norm: 5 per input element with an affine transform, 4 without; batch norm: 2 per element
  (1 without affine) in eval mode, 5 (4) when it normalises with batch statistics;
- adaptive average pooling: one per input element (`AdaptiveAvgPool2d(1)` reaches ATen as a mean over the two
  spatial dims, which is counted the same way); nearest upsampling 1 and bilinear upsampling / grid sampling 4 per
  output element.
Element-wise ops, activations, softmax, reductions and copies count 0, as in fvcore. Count at batch size 1.
"""
from collections import Counter
from math import prod

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCounter", "count_macs"]

aten = torch.ops.aten


def _mm(args, kwargs, out):          # (M, K) @ (K, N)
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(args, kwargs, out):       # bias + (M, K) @ (K, N)
    return _mm(args[1:], kwargs, out)


def _bmm(args, kwargs, out):         # (B, M, K) @ (B, K, N)
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _baddbmm(args, kwargs, out):
    return _bmm(args[1:], kwargs, out)


def _mv(args, kwargs, out):          # (M, K) @ (K,) and (K,) . (K,)
    return args[0].numel()


def _convolution(args, kwargs, out):
    x, weight, transposed = args[0], args[1], args[6]
    spatial = (x if transposed else out).shape[2:]
    return x.shape[0] * prod(weight.shape) * prod(spatial)


def _sdpa(args, kwargs, out):        # softmax(q k^T) v with q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv)
    q, k, v = args[0], args[1], args[2]
    return prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _affine_norm(weight_index):
    def count(args, kwargs, out):
        affine = len(args) > weight_index and args[weight_index] is not None
        return args[0].numel() * (5 if affine else 4)
    return count


def _batch_norm_eval(args, kwargs, out):            # (input, weight, bias, running_mean, running_var, ...)
    return args[0].numel() * (2 if args[1] is not None else 1)


def _native_batch_norm(args, kwargs, out):          # (..., running_var, training, momentum, eps)
    return (_affine_norm(1) if args[5] else _batch_norm_eval)(args, kwargs, out)


def _adaptive_avg_pool(args, kwargs, out):
    return args[0].numel()


def _spatial_mean(args, kwargs, out):
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if x.dim() == 4 and dims is not None and sorted(d % 4 for d in dims) == [2, 3]:
        return x.numel()
    return 0


def _per_output(scale):
    def count(args, kwargs, out):
        return scale * out.numel()
    return count


_RULES = {
    aten.mm: _mm, aten.addmm: _addmm, aten.bmm: _bmm, aten.baddbmm: _baddbmm, aten.mv: _mv, aten.dot: _mv,
    aten.convolution: _convolution,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention: _sdpa,
    aten._scaled_dot_product_efficient_attention: _sdpa,
    aten._scaled_dot_product_cudnn_attention: _sdpa,
    aten.native_layer_norm: _affine_norm(2),
    aten.native_group_norm: _affine_norm(1),
    aten._native_batch_norm_legit_no_training: _batch_norm_eval,
    aten._native_batch_norm_legit: _affine_norm(1),
    aten.native_batch_norm: _native_batch_norm,
    aten._adaptive_avg_pool2d: _adaptive_avg_pool,
    aten.mean: _spatial_mean,
    aten.upsample_nearest2d: _per_output(1),
    aten.upsample_bilinear2d: _per_output(4),
    aten.grid_sampler_2d: _per_output(4),
}


class MacCounter(TorchDispatchMode):
    """A context manager that adds up the Mul-Adds of every ATen op run inside it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _RULES.get(func.overloadpacket)
        if rule is not None:
            # Ops with several outputs (norms, fused attention) return a tuple; the first is the result.
            n = int(rule(args, kwargs, out[0] if isinstance(out, (tuple, list)) else out))
            if n:
                self.total += n
                self.by_op[func.overloadpacket.__name__] += n
        return out


@torch.no_grad()
def count_macs(fn, *args, **kwargs) -> int:
    """Mul-Adds of `fn(*args, **kwargs)` (run once, without gradients)."""
    with MacCounter() as counter:
        fn(*args, **kwargs)
    return counter.total
