"""Gate features (appendix 9.9): the numba kernel and the torch path agree, and both are right on hand cases."""
import math

import numpy as np
import pytest
import torch

from heads.model import gate_features as gf
from heads.model.gate_features import gate_features_numpy, gate_features_torch


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(p):
    """Direct per-statistic numpy implementation, written independently of both paths."""
    srt = np.sort(p, axis=-1)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    q = p ** 2 / (p ** 2).sum(-1, keepdims=True)
    qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return np.stack([srt[..., -1], -plogp.sum(-1), -qlogq.sum(-1), srt[..., -1] - srt[..., -2]], axis=-1)


@pytest.mark.parametrize("scale", [0.3, 3.0, 60.0])            # flat, typical, and peaked (saturated) softmax
@pytest.mark.parametrize("shape", [(37, 5, 10), (64, 3), (7, 2, 3, 100)])
def test_numba_and_torch_agree(scale, shape):
    rng = np.random.default_rng(int(scale * 10) + len(shape))
    p = _softmax(rng.normal(size=shape) * scale)
    ref = _reference(p)
    for dtype in (np.float64, np.float32):
        x = p.astype(dtype)
        a = gate_features_numpy(x)
        b = gate_features_torch(torch.from_numpy(x)).numpy()
        assert a.shape == shape[:-1] + (4,) and a.dtype == dtype and b.dtype == dtype
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 10, 100])
def test_float32_statistics_are_the_kernels_bit_for_bit(k):
    """What lets the runtime's statistics be the simulation's: for float32 softmax outputs, flat to saturated
    (exact zeros included), the torch path gives the kernel's float32 statistics bit for bit, and the parallel
    kernel (large inputs) the serial one's (smaller pieces)."""
    gen = torch.Generator().manual_seed(k)
    n = -(-gf.PARALLEL_ELEMENTS // k)
    z = torch.randn(n, k, generator=gen) * torch.logspace(-1, 2.5, n)[:, None]
    p = torch.softmax(z, dim=-1)
    assert (p == 0).any()
    parallel = gate_features_numpy(p.numpy())
    serial = np.concatenate([gate_features_numpy(c) for c in np.array_split(p.numpy(), 4)])
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(gate_features_torch(p).numpy(), parallel)


def test_hand_cases_and_exact_zeros():
    k = 8
    one_hot = np.zeros((1, k)); one_hot[0, 3] = 1.0
    uniform = np.full((1, k), 1.0 / k)
    two = np.zeros((1, k)); two[0, :2] = [0.75, 0.25]
    p = np.concatenate([one_hot, uniform, two])
    h_two = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    q = np.array([0.5625, 0.0625]) / 0.625
    h_pow_two = -(q * np.log(q)).sum()
    expected = np.array([[1.0, 0.0, 0.0, 1.0],
                         [1 / k, math.log(k), math.log(k), 0.0],
                         [0.75, h_two, h_pow_two, 0.5]])
    np.testing.assert_allclose(gate_features_numpy(p), expected, atol=1e-12)
    np.testing.assert_allclose(gate_features_torch(torch.from_numpy(p)).numpy(), expected, atol=1e-12)


def test_torch_gradients_finite_at_zero_probability():
    logits = torch.randn(16, 4, 10, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    p = torch.where(torch.rand_like(p) < 0.3, torch.zeros_like(p), p)
    p = (p / p.sum(-1, keepdim=True)).detach().requires_grad_(True)
    feats = gate_features_torch(p)
    feats.sum().backward()
    assert torch.isfinite(feats).all() and torch.isfinite(p.grad).all()
    assert p.grad.abs().sum() > 0


def test_rejects_single_class():
    with pytest.raises(ValueError, match="K >= 2"):
        gate_features_numpy(np.ones((3, 1)))
    with pytest.raises(ValueError, match="K >= 2"):
        gate_features_torch(torch.ones(3, 1))


def test_torch_gradients_equal_autograd_through_cumsum():
    """The in-order sum's own backward gives exactly the gradient autograd through torch.cumsum gives, and the
    statistics' gradient matches finite differences."""
    from heads.model.gate_features import _sum_in_order
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    mine = torch.autograd.grad((_sum_in_order(x) * up).sum(), x)[0]
    reference = torch.autograd.grad((torch.cumsum(x, dim=-1)[..., -1] * up).sum(), x)[0]
    assert torch.equal(mine, reference) and torch.equal(_sum_in_order(x), torch.cumsum(x, dim=-1)[..., -1])
    p = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=gen), -1).requires_grad_(True)
    # max_prob and margin are piecewise linear, the entropies smooth: all differentiable away from ties
    assert torch.autograd.gradcheck(gate_features_torch, (p,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_gradient_equals_the_torch_path(dtype):
    """gate_features with a gradient on the CPU (the kernels) = gate_features_torch, and the gradients they send
    back through the softmax agree, on ordinary rows, rows whose softmax has exact zeros and saturated rows (the
    entry a tie among zeros passes the margin's gradient to differs between the two, and the softmax drops it)."""
    from heads.model.gate_features import gate_features
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(3, 5, 11, generator=gen, dtype=dtype) * torch.tensor([1.0, 4.0, 30.0], dtype=dtype)[:, None, None]
    z[0, 0, :4] -= 2000.0                        # four exact zeros
    z[1, 1, 3] += 2000.0                         # one, the rest zeros
    up = torch.randn(3, 5, 4, generator=gen, dtype=dtype)
    results = []
    for fn in (gate_features, gate_features_torch):
        leaf = z.clone().requires_grad_(True)
        feats = fn(torch.softmax(leaf, -1))
        results.append((feats.detach(), torch.autograd.grad((feats * up).sum(), leaf)[0]))
    (feats, grad), (want_feats, want_grad) = results
    p = torch.softmax(z, -1)
    assert (p[0, 0, :4] == 0).all() and p[1, 1, 3] == 1.0 and (p[1, 1] == 0).sum() == 10
    torch.testing.assert_close(feats, want_feats, rtol=0, atol=0 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-7)
    assert grad.abs().sum() > 0
