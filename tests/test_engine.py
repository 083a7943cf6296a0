"""The hand-written training step (heads.train.engine, heads.train.kernels) against autograd on heads.train.bilevel's
losses, the numba kernels against their torch versions, and trial removal."""
import pytest
import torch

from heads.train.engine import StackEngine
from heads.model.exits import exit_decision, exit_distribution
from heads.model.gate_features import gate_features_torch
from heads.train.adam import StackedAdam, adam_update, adam_update_torch
from heads.train.kernels import softmax_stats, softmax_stats_torch, weighted_ce_grad, weighted_ce_grad_torch
from heads.model.stack import StackedHeads
from heads.train.bilevel import classifier_loss, exited_metrics, gate_loss, warmup_loss
from heads.train.data import SplitTensors


def logits_with_ties(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(shape, generator=g)
    z[0, 0, 0, :3] = 30.0                      # a three-way tie at the top: margin 0, argmax the first
    z[0, 1, 0] = 0.0                           # all equal: uniform probabilities
    z[1, 0, 0, 1] = 60.0                       # a saturated row: p underflows to 0 elsewhere
    return z


@pytest.mark.parametrize("gated", [3, 0])
def test_softmax_stats_kernel_equals_torch(gated):
    n_exits, b, t, k = 4, 5, 3, 7
    z = logits_with_ties((n_exits, b, t, k))
    p = torch.softmax(z, -1)
    labels = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(1))
    out = [torch.zeros(t, b, gated, 4), torch.zeros(t, b, n_exits), torch.zeros(t, b, n_exits, dtype=torch.int32)]
    ref = [torch.zeros_like(x) for x in out]
    softmax_stats(z, p, labels, *out)
    softmax_stats_torch(z, p, labels, *ref)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], ref[2])
    if gated:
        # the torch reference is heads.model.gate_features' own statistics on the same probabilities
        torch.testing.assert_close(ref[0], gate_features_torch(p.permute(2, 1, 0, 3)[:, :, :gated]))
        assert out[0][0, 0, 0, 3] == 0 and out[2][0, 0, 0] == 0        # the tie


def test_weighted_ce_grad_equals_autograd():
    n_exits, b, t, k = 3, 6, 2, 5
    z = logits_with_ties((n_exits, b, t, k), seed=2).requires_grad_()
    labels = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(3))
    coef = torch.rand(t, b, n_exits + 1, generator=torch.Generator().manual_seed(4))   # one exit more: ignored
    zt = z.permute(2, 1, 0, 3)
    ce = torch.logsumexp(zt, -1) - zt.gather(-1, labels[None, :, None, None].expand(t, b, n_exits, 1)).squeeze(-1)
    (expected,) = torch.autograd.grad((coef[:, :, :n_exits] * ce).sum(), z)
    numba_p, torch_p = torch.softmax(z.detach(), -1), torch.softmax(z.detach(), -1)
    weighted_ce_grad(numba_p, labels, coef)
    weighted_ce_grad_torch(torch_p, labels, coef)
    torch.testing.assert_close(numba_p, expected)
    torch.testing.assert_close(torch_p, expected)


def test_adam_kernel_matches_torch_adam_per_trial():
    gen = torch.Generator().manual_seed(0)
    rows, t, k = 4, 3, 2
    lrs, wds = torch.tensor([0.01, 0.003, 0.05]), torch.tensor([5e-4, 0.0, 1e-2])
    p = torch.randn(rows, t, k, generator=gen)
    alone = [p[:, i].clone().requires_grad_(True) for i in range(t)]
    refs = [torch.optim.Adam([a], lr=float(lr), weight_decay=float(wd)) for a, lr, wd in zip(alone, lrs, wds)]
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(1, 21):
        x = torch.randn(rows, t, k, generator=gen)
        grad = 2 * p * x * x
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        lr_col = (lrs * bc2 ** 0.5 / bc1)[:, None].expand(t, k).reshape(-1).contiguous()
        wd_col = wds[:, None].expand(t, k).reshape(-1).contiguous()
        adam_update(p.view(rows, -1), grad.view(rows, -1), m.view(rows, -1), v.view(rows, -1), lr_col, wd_col,
                    b1, b2, eps * bc2 ** 0.5)
        for i in range(t):
            refs[i].zero_grad()
            (alone[i] * x[:, i]).pow(2).sum().backward()
            refs[i].step()
    for i in range(t):
        torch.testing.assert_close(p[:, i], alone[i].detach())


# ---- the engine against autograd ---------------------------------------------------------------------------------
def setup(dims=(6, 6, 6, 6), trains_last=False, n_trials=2, k=5, b=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = StackedHeads.init(list(dims), k, n_trials, trains_last, seed)
    heads.gate_weight = 0.5 * torch.randn(heads.gate_weight.shape, generator=g)
    heads.gate_bias = torch.randn(heads.gate_bias.shape, generator=g) - 1.0
    for w in heads.im_weight:                  # trials that differ
        w.add_(0.3 * torch.randn(w.shape, generator=g))
    feats = [torch.randn(b, d, generator=g) for d in dims]
    labels = torch.randint(0, k, (b,), generator=g)
    last = None if trains_last else 3 * torch.randn(b, k, generator=g)
    return heads, feats, labels, last


def autograd_grads(heads, loss_fn, params):
    ref = StackedHeads([w.detach().clone().requires_grad_() for w in heads.im_weight],
                       [b.detach().clone().requires_grad_() for b in heads.im_bias],
                       heads.gate_weight.detach().clone().requires_grad_(),
                       heads.gate_bias.detach().clone().requires_grad_(), heads.trains_last, heads.epochs_trained)
    targets = ref.im_params() if params == "ims" else ref.gate_params()
    return torch.autograd.grad(loss_fn(ref), targets)


CASES = [((6, 6, 6, 6), False), ((6, 6, 6, 6), True), ((5, 7, 6, 5), False), ((5, 7, 6, 5), True)]
IDS = ["uniform-frozen", "uniform-trained", "mixed-frozen", "mixed-trained"]


@pytest.mark.parametrize("dims,trains_last", CASES, ids=IDS)
@pytest.mark.parametrize("im_loss", ["weighted", "uniform", "warmup"])
def test_im_gradient_equals_autograd(dims, trains_last, im_loss):
    heads, feats, labels, last = setup(dims, trains_last)
    lam, ic = torch.tensor([0.1, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
    if im_loss == "warmup":
        expected = autograd_grads(heads, lambda h: warmup_loss(h, feats, labels, last), "ims")
    else:
        expected = autograd_grads(heads, lambda h: classifier_loss(h, feats, labels, last, lam, ic, im_loss), "ims")
    engine = StackEngine(heads, torch.full((2,), 0.01), torch.zeros(2), batch_size=len(labels))
    out = engine.forward(feats, last, labels)
    if im_loss == "warmup":
        weight = torch.tensor([3.0, 2.0, 1.0, 1.0 if trains_last else 0.0]) / len(labels)
        coef = weight.expand(2, len(labels), -1)
    else:
        coef = engine.classifier_coef(out, im_loss)
    engine.im_gradient(out, feats, labels, coef)
    for got, want in zip(engine.grad_weight + engine.grad_bias, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dims,trains_last", CASES, ids=IDS)
@pytest.mark.parametrize("rule", ["subsequent", "ifmin"])
def test_gate_gradient_equals_autograd(dims, trains_last, rule):
    heads, feats, labels, last = setup(dims, trains_last)
    lam, ic = torch.tensor([0.05, 2.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
    pos_weight = torch.tensor([[1.0, 2.0, 0.5], [0.7, 1.5, 2.0]])
    expected = autograd_grads(heads, lambda h: gate_loss(h, feats, labels, last, lam, ic, rule, pos_weight), "gates")
    engine = StackEngine(heads, torch.full((2,), 0.01), torch.zeros(2), batch_size=len(labels))
    got = engine.gate_gradient(engine.forward(feats, last, labels), lam, ic, rule, pos_weight)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


def test_full_gradient_goes_through_autograd():
    heads, feats, labels, last = setup()
    lam, ic = torch.tensor([0.1, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])

    def loss(h):
        return classifier_loss(h, feats, labels, last, lam, ic, "weighted", True)

    expected = autograd_grads(heads, loss, "ims")
    engine = StackEngine(heads, torch.full((2,), 0.01), torch.zeros(2), batch_size=len(labels))
    before = engine.flat.clone()
    engine.im_step_autograd(loss)
    for got, want in zip(engine.grad_weight + engine.grad_bias, expected):
        torch.testing.assert_close(got, want)
    assert not torch.equal(engine.flat, before)


@pytest.mark.parametrize("per_trial", [True, False], ids=["per-trial-lr-numba", "one-lr-fused"])
def test_adam_steps_equal_stacked_adam_on_autograd_gradients(per_trial):
    """Three CLASSIFIER and three GATE steps of the engine = StackedAdam on autograd gradients of the losses."""
    heads, feats, labels, last = setup((5, 7, 6, 5), False)
    lam, ic = torch.tensor([0.1, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
    if per_trial:
        lr, wd = torch.tensor([0.01, 0.003]), torch.tensor([5e-4, 0.0])
    else:
        lr, wd = torch.tensor([0.01, 0.01]), torch.tensor([5e-4, 5e-4])
    ref = heads.select([0, 1])
    for p in ref.im_params() + ref.gate_params():
        p.requires_grad_(True)
    n_w = len(ref.im_weight)
    adam_im, adam_gate = StackedAdam(ref.im_params(), [1] * n_w + [0] * n_w, lr, wd), \
        StackedAdam(ref.gate_params(), [0, 0], lr, wd)
    engine = StackEngine(heads, lr, wd, batch_size=len(labels))
    pos_weight = torch.ones(2, 3)
    active = torch.ones(2, dtype=torch.bool)
    for _ in range(3):
        out = engine.forward(feats, last, labels)
        engine.im_step(out, feats, labels, engine.classifier_coef(out))
        adam_im.step(torch.autograd.grad(classifier_loss(ref, feats, labels, last, lam, ic), ref.im_params()), active)
    for _ in range(3):
        engine.gate_step(engine.forward(feats, last, labels), lam, ic, "subsequent", pos_weight)
        grads = torch.autograd.grad(gate_loss(ref, feats, labels, last, lam, ic, "subsequent", pos_weight),
                                    ref.gate_params())
        adam_gate.step(grads, active)
    for got, want in zip(engine.heads.im_params() + engine.heads.gate_params(), ref.im_params() + ref.gate_params()):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)
    if not per_trial and torch.__version__ >= (2, 4):       # CPU fused Adam exists: it must have been used
        assert engine.im_adam.backend == "fused"


def test_keep_drops_trials_and_the_rest_continue_unchanged():
    heads, feats, labels, last = setup(n_trials=3)
    lam, ic = torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
    lr, wd = torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.0, 5e-4, 1e-3])
    full = StackEngine(heads.select([0, 1, 2]), lr, wd, batch_size=len(labels))
    kept = StackEngine(heads.select([0, 1, 2]), lr, wd, batch_size=len(labels))

    def steps(engine, lam):
        out = engine.forward(feats, last, labels)
        engine.im_step(out, feats, labels, engine.classifier_coef(out))
        engine.gate_step(engine.forward(feats, last, labels), lam, ic, "subsequent", torch.ones(len(lam), 3))

    steps(full, lam)
    steps(kept, lam)
    kept.keep(torch.tensor([2, 0]))
    assert kept.n_trials == 2 and kept.heads.im_weight[0].shape[1] == 2
    for _ in range(2):
        steps(full, lam)
        steps(kept, lam[[2, 0]])
    want = full.heads.select([2, 0]).state_dict()
    for name, value in kept.heads.state_dict().items():
        if name != "epochs_trained":
            torch.testing.assert_close(value, want[name], msg=name)


def test_engine_split_metrics_equal_the_reference():
    heads, _, _, _ = setup((5, 7, 6, 5), False, b=1)
    g = torch.Generator().manual_seed(5)
    n, k = 300, 5
    split = SplitTensors([torch.randn(n, d, generator=g) for d in (5, 7, 6, 5)],
                         torch.randint(0, k, (n,), generator=g), 3 * torch.randn(n, k, generator=g))
    lam, ic = torch.tensor([0.1, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
    engine = StackEngine(heads.select([0, 1]), torch.full((2,), 0.01), torch.zeros(2), batch_size=64)
    engine.eval_rows = 64                          # several chunks, the last one short
    # the reference: heads' own outputs, the exit rule, and the CE / cost at the exit taken
    logits, g = heads.outputs(split.features, split.logits)
    taken = exit_decision(exit_distribution(g))                                      # (T, N)
    at_exit = logits.gather(2, taken[..., None, None].expand(-1, -1, 1, k)).squeeze(2)
    ce = torch.logsumexp(at_exit, -1) - at_exit.gather(-1, split.labels[None, :, None].expand(2, -1, 1)).squeeze(-1)
    cost = ic[taken]
    want = {"accuracy": (at_exit.argmax(-1) == split.labels).double().mean(1), "cost": cost.double().mean(1),
            "objective": (ce + lam[:, None] * cost).double().mean(1)}
    for got in (engine.exited_metrics(split, lam, ic), exited_metrics(heads, split, lam, ic)):
        for name in want:
            # the cross-entropies are float32 in both, summed in another order: float32's tolerance, not double's
            torch.testing.assert_close(got[name], want[name], msg=name, rtol=1e-6, atol=1e-6)
    logits = heads.outputs(split.features, split.logits)[0][:, :, :3]
    accuracy = (logits.argmax(-1) == split.labels[None, :, None]).double().mean(1)
    torch.testing.assert_close(engine.im_accuracy(split), accuracy)


def test_forward_checks_its_inputs():
    heads, feats, labels, last = setup()
    engine = StackEngine(heads, torch.full((2,), 0.01), torch.zeros(2), batch_size=len(labels))
    with pytest.raises(ValueError, match="cached logits"):
        engine.forward(feats, None, labels)
    big = [torch.randn(engine.eval_rows + 1, f.shape[1]) for f in feats]
    with pytest.raises(ValueError, match="at most"):
        engine.forward(big, torch.randn(engine.eval_rows + 1, 5), torch.zeros(engine.eval_rows + 1, dtype=torch.int64))


def test_torch_kernels_train_like_the_numba_ones(monkeypatch):
    """The path a GPU takes (every kernel in torch, per-trial Adam in torch), run on the CPU: same training."""
    import heads.train.adam as adam_module
    import heads.train.engine as engine_module
    import heads.train.kernels as kernels

    def steps(engine, feats, labels, last):
        lam, ic = torch.tensor([0.1, 1.0]), torch.tensor([0.25, 0.5, 0.75, 1.0])
        for _ in range(3):
            out = engine.forward(feats, last, labels)
            engine.im_step(out, feats, labels, engine.classifier_coef(out))
            engine.gate_step(engine.forward(feats, last, labels), lam, ic, "ifmin", torch.ones(2, 3))
        return engine.heads.state_dict()

    lr, wd = torch.tensor([0.01, 0.003]), torch.tensor([5e-4, 0.0])       # per-trial: the non-fused Adam
    heads, feats, labels, last = setup()
    want = steps(StackEngine(heads.select([0, 1]), lr, wd, len(labels)), feats, labels, last)
    monkeypatch.setattr(engine_module, "softmax_stats", lambda *a: softmax_stats_torch(*a))
    monkeypatch.setattr(engine_module, "weighted_ce_grad", weighted_ce_grad_torch)
    monkeypatch.setattr(adam_module, "adam_update", adam_update_torch)
    monkeypatch.setattr(kernels, "_stats_kernel", None)                   # nothing may reach numba now
    got = steps(StackEngine(heads.select([0, 1]), lr, wd, len(labels)), feats, labels, last)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_stacked_split_gathers_like_the_per_exit_rows():
    g = torch.Generator().manual_seed(0)
    split = SplitTensors([torch.randn(20, 6, generator=g) for _ in range(3)], torch.arange(20) % 4,
                         torch.randn(20, 4, generator=g))
    assert split.stacked is not None and split.features[1].data_ptr() == split.stacked[1].data_ptr()
    idx = torch.tensor([3, 17, 0, 9])
    for i in (idx, slice(5, 11)):
        x, labels, last = split.batch(i)
        rows, labels_r, last_r = split.rows(i)
        assert torch.equal(x, torch.stack(rows)) and torch.equal(labels, labels_r) and torch.equal(last, last_r)
    mixed = SplitTensors([torch.randn(5, 6), torch.randn(5, 4)], torch.zeros(5, dtype=torch.int64), None)
    assert mixed.stacked is None and isinstance(mixed.batch(slice(0, 2))[0], list)
