"""The runtime's per-exit kernel (deploy/runtime.py: _exit_head_kernel, one serial numba call per exit on the CPU)
against the same steps in torch (_exit_head_torch, what other devices run), on a tiny random model; and its float16
rounding against torch's. The end-to-end check, runtime = simulation on trained runs, is tests/test_runtime.py."""
from unittest import mock

import numba
import numpy as np
import pytest
import torch

import extract  # noqa: F401  (before timm: see extract/_torchvision.py)
from extract.backbones import load_backbone
from heads.evaluation.evaluate import Calibration, predict_with_sets
from heads.model.exits import ExitRule
from heads.evaluation.metrics import softmax
from heads.model.stack import StackedHeads
from deploy.runtime import EarlyExitModel, _finish_kernel, _round_to_half

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@numba.njit
def _round_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _round_to_half(x[i])
    return out


def test_round_to_half_is_torchs():
    """Every float16 value, every midpoint between two (ties to even), the overflow edge, signed zeros, inf and
    nan, and random floats over 18 decades, float16's subnormals included."""
    gen = torch.Generator().manual_seed(0)
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = halves[torch.isfinite(halves)].sort().values
    x = torch.cat([finite, (finite[:-1] + finite[1:]) / 2, torch.tensor([65519.0, 65520.0, -65520.0, 1e9, -0.0,
                                                                         float("inf"), float("nan")]),
                   torch.randn(200_000, generator=gen) * torch.logspace(-12, 6, 200_000)])
    got, expected = _round_all(x.numpy()), x.half().float().numpy()
    np.testing.assert_array_equal(got, expected)                     # nan == nan here
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = load_backbone("test_efficientnet", None, num_classes=5, img_size=32)
    heads = StackedHeads.init(backbone.exit_dims, 5, 1, trains_last=True, seed=3)
    heads.gate_weight.zero_()                      # g = sigmoid(6 max prob - entropy - 2): confident IMs exit
    heads.gate_weight[..., 0], heads.gate_weight[..., 1] = 6.0, -1.0
    heads.gate_bias.fill_(-2.0)
    calibration = Calibration(1.0, 0.1, "gated", (0.5,) * backbone.num_exits)
    return EarlyExitModel(backbone, heads, calibration)


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_kernel_equals_torch_steps(model, threshold):
    """Exit by exit over 400 samples (without leaving the batch): the kernel's logits are torch's to float32
    rounding, and every sample leaves at the same exits with the same running gate sums."""
    gen = torch.Generator().manual_seed(2)
    n = 400
    kernel_rule, torch_rule = ExitRule(n, threshold), ExitRule(n, threshold)
    exits = []
    for l in range(model.num_exits - 1):
        z = torch.randn(n, model.backbone.exit_dims[l], generator=gen) * torch.logspace(-1, 1.5, n)[:, None]
        logits, leaving, n_leaving = model._exit_head(l, z, kernel_rule)            # numpy arrays on the CPU
        logits, leaving = torch.as_tensor(logits), torch.as_tensor(leaving)
        ref_logits, ref_leaving, ref_n = model._exit_head_torch(l, z, torch_rule)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(leaving, ref_leaving) and n_leaving == ref_n
        # float32 running sums of gate probabilities, each path rounding its own way (the kernel's fused
        # arithmetic depends on the CPU's instruction set), accumulated over the exits so far
        torch.testing.assert_close(kernel_rule.mass, torch_rule.mass, rtol=0, atol=4e-6)
        exits.append(n_leaving)
    assert sum(e > 0 for e in exits) >= 2, exits     # samples leave at several exits


@pytest.mark.parametrize("threshold", [0.3, 0.5, 1.0])
def test_batch_of_one_equals_batched_path(model, threshold):
    """forward on one image (the batch-1 path, _forward_one) returns exactly what the batched path returns for
    that image: exit, logits, prediction, probabilities and set, over images that leave at several exits and at
    the last one (threshold 1: nobody leaves early)."""
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * torch.logspace(-1, 1, 40)[:, None,
                                                                                                     None, None]
    model.threshold = threshold
    try:
        exits = []
        for i in range(len(x)):
            with mock.patch.object(EarlyExitModel, "_forward_batch", side_effect=AssertionError("batched path")):
                one = model(x[i:i + 1])
            ref = model._forward_batch(x[i:i + 1])
            for field in ("exit_index", "logits", "prediction", "probs", "sets"):
                got, expected = getattr(one, field), getattr(ref, field)
                assert got.dtype == expected.dtype and torch.equal(got, expected), (i, field)
            exits.append(int(one.exit_index))
    finally:
        model.threshold = 0.5
    if threshold < 1.0:
        assert len(set(exits)) >= 3 and model.num_exits - 1 in exits, exits
    else:
        assert set(exits) == {model.num_exits - 1}


def test_finish_equals_predict_with_sets(model):
    """_finish (the serial kernel) against heads.evaluation.evaluate.predict_with_sets on 4000 rows of logits from 0.1
    to 30 in scale, a temperature and a threshold per exit: the same predictions and sets, probabilities to float32
    rounding; rows with a score on its threshold or a non-finite logit go to predict_with_sets itself."""
    gen = torch.Generator().manual_seed(7)
    n, k = 4000, model.backbone.num_classes
    logits = torch.randn(n, k, generator=gen) * torch.logspace(-1, 1.5, n)[:, None]
    exits = torch.randint(0, model.num_exits, (n,), generator=gen)
    calibration = Calibration(1.7, 0.1, "gated", tuple(np.linspace(0.2, 0.95, model.num_exits)))
    before, model.calibration = model.calibration, calibration
    try:
        out = model._finish(logits, exits)
    finally:
        model.calibration = before
    prediction, probs, sets = predict_with_sets(logits.numpy(), exits.numpy(), calibration)
    assert torch.equal(out.prediction, torch.from_numpy(prediction))
    assert torch.equal(out.sets, torch.from_numpy(sets))
    torch.testing.assert_close(out.probs, torch.from_numpy(probs), rtol=1e-6, atol=1e-7)
    assert not torch.equal(out.probs, torch.from_numpy(probs)), "no row took the kernel"

    z, ex = logits[:1].numpy(), exits[:1].numpy()
    thresholds = np.asarray(calibration.thresholds, dtype=np.float64)
    arrays = lambda: (np.empty(1, np.int64), np.empty((1, k), np.float32), np.empty((1, k), np.bool_))  # noqa: E731
    assert _finish_kernel(z, ex, np.float32(1.0), thresholds, *arrays())
    on_threshold = thresholds.copy()
    on_threshold[ex[0]] = 1.0 - float(softmax(z)[0, 0])    # the score sets compare (untempered)
    assert not _finish_kernel(z, ex, np.float32(1.0), on_threshold, *arrays())
    assert not _finish_kernel(np.full((1, k), np.nan, np.float32), ex, np.float32(1.0), thresholds, *arrays())


def test_channels_last(model):
    """A CNN backbone in channels_last (model.to(memory_format=...)) runs the same early-exit network: the same
    exits and predictions as contiguous memory on these inputs, logits to float32 rounding (oneDNN picks other
    convolution kernels, so bits may differ: an exit sitting on its threshold could move)."""
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 3
    ref = model(x)
    try:
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert torch.equal(out.exit_index, ref.exit_index) and torch.equal(out.prediction, ref.prediction)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks(model):
    """compile_blocks: every block under torch.compile (dynamic batch), the exits and predictions of eager mode
    at batch 24 and batch 1 (the batch shrinks as samples leave: no recompilation per size)."""
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 3
    ref = model(x)
    try:
        out = model.compile_blocks()(x)
        single = model(x[:1])
    finally:   # back to eager for the other tests of the module
        for block in model.backbone.blocks:
            block._compiled_call_impl = None
    assert torch.equal(out.exit_index, ref.exit_index) and torch.equal(out.prediction, ref.prediction)
    assert int(single.exit_index) == int(ref.exit_index[0])
