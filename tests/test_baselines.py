"""Baselines and ablations (heads/baselines/thresholds.py, heads/baselines/methods.py) on tiny synthetic cached
features."""
import dataclasses
import logging

import numpy as np
import pytest
import torch

from heads.baselines.boosted import boosted_ensemble, train_boosted

from heads.baselines.common import BaselineSettings, split_logits

from heads.baselines.diffbranch import diffbranch_loss

from heads.baselines.l2w import WeightPredictionNet, l2w_weights, train_l2w

from heads.baselines.methods import LAMBDA_METHODS, METHODS, run_baselines, train_fixed_ims
from heads.evaluation.evaluate import evaluate
from heads.model.stack import StackedHeads
from heads.baselines.thresholds import (
    DEFAULT_P_GRID, budget_fractions, exit_by_thresholds, fit_thresholds, max_softmax, threshold_sweep,
)
from heads.train.adam import StackedAdam
from heads.train.kernels import exit_cross_entropy
from heads.train.bilevel import TrainSettings, seed_streams, warmup
from heads.train.data import SplitTensors, TrainData

DIMS = [5, 6, 6, 7]
K = 3
SETTINGS = TrainSettings(batch_size=16, max_epochs=3, warmup_epochs=1, patience=2, bi_switch=3)


def _split(n, gen, frozen_last):
    """Class-dependent features whose signal grows with depth, and a frozen 'backbone head' on the last exit."""
    labels = torch.randint(0, K, (n,), generator=gen)
    feats = []
    for l, d in enumerate(DIMS):
        means = torch.randn(K, d, generator=torch.Generator().manual_seed(100 + l))
        feats.append((0.4 * (l + 1) * means[labels] + torch.randn(n, d, generator=gen)).contiguous())
    logits = 2.0 * torch.nn.functional.one_hot(labels, K).float() + torch.randn(n, K, generator=gen)
    return SplitTensors(feats, labels, logits if frozen_last else None)


def _data(frozen_last=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    costs = torch.tensor([1.0, 2.0, 3.0, 4.0])
    data = TrainData(_split(96, gen, frozen_last), _split(50, gen, frozen_last), _split(50, gen, frozen_last),
                     costs / costs[-1], K)
    return data, _split(60, gen, frozen_last)


def _wide_rows(n, frozen_last, seed=0, dims=(16, 24, 24, 40), k=10):
    """A batch shaped like the demo cache's (Lite0 exit widths, ten classes), where the batched products of
    RunParams give one product per exit's bits: torch's batched product loops by hand below a few hundred
    multiply-adds (the tiny DIMS above), and some other shapes (odd half-batches) were seen to round differently."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    feats = [(0.3 * (l + 1) * torch.randn(k, d, generator=gen)[labels] + torch.randn(n, d, generator=gen))
             for l, d in enumerate(dims)]
    last = 2.0 * torch.nn.functional.one_hot(labels, k).float() + torch.randn(n, k, generator=gen)
    return feats, labels, last if frozen_last else None


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons run on one torch thread, as compare --threads 1 trains: a threaded product may
    add in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- threshold gating ----------------------------------------------------------------------------------------------
def test_budget_fractions_are_normalised_powers_of_p():
    for p in (0.05, 0.5, 1.0, 1.95):
        f = budget_fractions(p, 6)
        assert abs(float(f.sum()) - 1) < 1e-12
        np.testing.assert_allclose((f[1:] / f[:-1]).numpy(), p, rtol=1e-9)
    with pytest.raises(ValueError, match="p must be > 0"):
        budget_fractions(0.0, 4)


@pytest.mark.parametrize("n", [37, 1001])
def test_threshold_search_reproduces_requested_fractions_on_v1(n):
    gen = torch.Generator().manual_seed(n)
    conf = torch.rand(n, 7, generator=gen, dtype=torch.float64)
    for p in DEFAULT_P_GRID:
        fractions = budget_fractions(p, 7)
        thr, exit_index = fit_thresholds(conf, fractions)
        counts = torch.bincount(exit_index, minlength=7).double()
        assert float((counts - n * fractions).abs().max()) < 1.0, (p, counts.tolist())
        # the fitted thresholds, applied as at test time, route V1 exactly as the search did
        assert torch.equal(exit_by_thresholds(conf, thr), exit_index)
        # sequential semantics: a sample leaves at k iff it did not leave earlier and conf_k >= thr_k
        first = (conf >= thr).int()
        first[:, -1] = 1
        assert torch.equal(first.argmax(1), exit_index)


def test_threshold_sweep_on_logits_and_ties():
    gen = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(200, 4, 5, generator=gen), torch.randn(80, 4, 5, generator=gen)
    points = threshold_sweep(v1.numpy(), {"v2": v2.numpy()}, p_grid=(0.3, 1.0, 1.7))
    assert [pt["p"] for pt in points] == [0.3, 1.0, 1.7]
    for pt in points:
        hist = np.bincount(pt["v1_exit_index"], minlength=4)
        assert np.abs(hist - 200 * pt["fractions"]).max() < 1
        assert pt["v2"].shape == (80,) and pt["v2"].min() >= 0 and pt["v2"].max() < 4
    # max_softmax is the exact max of the softmax, in float64
    assert torch.allclose(max_softmax(v1), torch.softmax(v1.double(), -1).amax(-1), rtol=0, atol=1e-12)
    # all confidences tied: the first exit takes everyone (no way to split ties), nothing breaks
    thr, exit_index = fit_thresholds(torch.full((10, 3), 0.5, dtype=torch.float64), budget_fractions(1.0, 3))
    assert exit_index.tolist() == [0] * 10 and thr[-1] == float("-inf")


# ---- BoostedNet ----------------------------------------------------------------------------------------------------
def test_boosted_ensemble_equals_its_recursion_and_detaches_history():
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(2, 5, 6, 4, generator=gen, requires_grad=True)
    gamma, n_boosted = 0.5, 5
    ens = boosted_ensemble(o, gamma, n_boosted)
    for s in range(6):
        if s < n_boosted:
            expected = sum(gamma ** (s - j) * o[..., j, :] for j in range(s + 1))   # F_s = sum gamma^(s-j) o_j
        else:
            expected = o[..., s, :]                                                 # frozen head: untouched
        assert torch.allclose(ens[..., s, :], expected, atol=1e-6)
        if 0 < s < n_boosted:
            assert torch.equal(ens[..., s, :], o[..., s, :] + gamma * ens[..., s - 1, :])
    # training form: same values, but exit s's loss only reaches its own weak learner o_s
    ens_train = boosted_ensemble(o, gamma, n_boosted, detach=True)
    assert torch.equal(ens_train, ens)
    (grad,) = torch.autograd.grad(ens_train[..., 3, :].sum(), o)
    assert grad[..., 3, :].abs().min() > 0
    assert grad[..., [0, 1, 2, 4, 5], :].abs().max() == 0


# ---- L2W-DEN -------------------------------------------------------------------------------------------------------
def test_l2w_weights_have_mean_one_and_bounded_spread():
    wpn = WeightPredictionNet(4, 16, seed=1)
    losses = torch.rand(33, 4, generator=torch.Generator().manual_seed(2)) * 5
    for eps, scale in ((0.0, 1.0), (0.3, 1.0), (0.3, 1e3), (1.0, 1e3)):   # 1e3: tanh saturates, probe the bounds
        with torch.no_grad():
            w = l2w_weights(wpn(losses * scale), eps)
        assert w.shape == (33, 4)
        assert abs(float(w.mean()) - 1.0) < 1e-6
        assert float(w.min()) >= 1 - 2 * eps - 1e-6 and float(w.max()) <= 1 + 2 * eps + 1e-6


def test_l2w_meta_learns_the_weight_network():
    data, _ = _data(frozen_last=True)
    # no weight decay on the WPN: any change of its weights comes from the meta-gradient through the look-ahead
    bs = BaselineSettings(l2w_meta_lr=1e-2, l2w_meta_weight_decay=0.0, l2w_hidden=8)
    heads, wpn = train_l2w(data, dataclasses.replace(SETTINGS, max_epochs=1, warmup_epochs=0), bs)
    init = WeightPredictionNet(len(DIMS), 8, seed=seed_streams(SETTINGS.seed)[2])
    assert all(not torch.equal(a, b) for a, b in zip(wpn.parameters(), init.parameters()))
    assert heads.n_trials == 1 and int(heads.epochs_trained[0]) == 1


# ---- learned gates -------------------------------------------------------------------------------------------------
def test_fixed_ims_leave_im_weights_bit_identical():
    data, _ = _data(frozen_last=True)
    warm = warmup(data, SETTINGS)
    heads = train_fixed_ims(data, warm, [0.05, 0.5], SETTINGS)
    weights, biases = warm.initial_ims(SETTINGS.lr, SETTINGS.weight_decay, SETTINGS.warmup_epochs)
    for t in range(2):
        for got, want in zip(heads.im_weight, weights):
            assert torch.equal(got[:, t], want[:, 0])
        for got, want in zip(heads.im_bias, biases):
            assert torch.equal(got[t], want[0])
    # ... while the gates did learn
    init = StackedHeads.init(data.exit_dims, K, 2, data.trains_last, seed_streams(SETTINGS.seed)[0])
    assert not torch.equal(heads.gate_weight, init.gate_weight)


def test_fixed_ims_is_jei_exactly_when_jei_never_switches():
    """compare re-uses JEI-DNN's models as fixed-ims when fixed_ims_is_jei says so: then train_stack with the
    settings themselves trains exactly the fixed-ims models; with a bi_switch inside the phase it is not so."""
    from heads.baselines.methods import fixed_ims_is_jei
    from heads.train.bilevel import train_stack
    data, _ = _data(frozen_last=True)
    never = dataclasses.replace(SETTINGS, bi_switch=1 << 40)
    assert fixed_ims_is_jei(data, never) and not fixed_ims_is_jei(data, SETTINGS)
    warm = warmup(data, never)
    lambdas = [0.05, 0.5]
    for settings, same in ((never, True), (SETTINGS, False)):
        fixed = train_fixed_ims(data, warm, lambdas, settings)
        jei = train_stack(data, warm, [{"lam": lam} for lam in lambdas], settings)
        pairs = list(zip(fixed.im_params() + fixed.gate_params(), jei.im_params() + jei.gate_params()))
        assert all(torch.equal(a, b) for a, b in pairs) == same


def test_diffbranch_loss_reaches_ims_and_gates():
    data, _ = _data(frozen_last=False)
    heads = StackedHeads.init(data.exit_dims, K, 2, data.trains_last, seed=0)
    heads.gate_bias -= 3.0     # small g^l: every exit keeps some probability mass (eq. 8's min does not clip)
    params = heads.im_params() + heads.gate_params()
    for p in params:
        p.requires_grad_(True)
    loss = diffbranch_loss(heads, *data.train.rows(slice(0, 32)), torch.tensor([0.1, 1.0]), data.ic_norm)
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        assert g.abs().sum() > 0, p.shape


def test_boosted_training_lowers_the_ensemble_loss():
    data, _ = _data(frozen_last=False)
    heads = train_boosted(data, SETTINGS, 0.5)
    assert heads.n_trials == 1 and len(heads.im_weight) == len(DIMS)   # the trained last head joins the ensemble
    assert 1 <= int(heads.epochs_trained[0]) <= SETTINGS.max_epochs
    init = StackedHeads.init(data.exit_dims, K, 1, data.trains_last, seed_streams(SETTINGS.seed)[0])

    def v2_loss(h):
        ens = boosted_ensemble(split_logits(h, data.v2), 0.5, len(DIMS))
        return float(exit_cross_entropy(ens, data.v2.labels).mean())
    assert v2_loss(heads) < 0.8 * v2_loss(init)


# ---- every method end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen_last", [True, False])
def test_every_method_end_to_end(frozen_last, caplog):
    data, test = _data(frozen_last)
    bs = BaselineSettings(p_grid=(0.4, 1.0, 1.6), l2w_hidden=8)
    lambdas = (0.05, 1.0)
    caplog.set_level(logging.INFO, logger="heads")
    points = run_baselines(data, test, METHODS, SETTINGS, bs, lambdas=lambdas)
    messages = [r.getMessage() for r in caplog.records if r.name == "heads.baselines.methods"]
    by_method = {m: [pt for pt in points if pt.method == m] for m in METHODS}
    for m, pts in by_method.items():
        assert len(pts) == (len(lambdas) if m in LAMBDA_METHODS else len(bs.p_grid)), m
        for i, (method, param, v2, test_out, extra) in enumerate(pts):
            assert v2.logits.shape == (50, len(DIMS), K) and test_out.logits.shape == (60, len(DIMS), K)
            assert np.isfinite(v2.logits).all() and np.isfinite(test_out.logits).all()
            assert extra["train_seconds"] >= 0
            if i == 0:    # the JEI-DNN evaluation accepts every method's outputs
                res = evaluate(v2, test_out, [1.0, 2.0, 3.0, 4.0], n_partitions=5)
                assert 0 <= res["test"]["accuracy"] <= 1 and 0.25 <= res["test"]["cost_norm"] <= 1
            if m not in LAMBDA_METHODS:
                hist = np.asarray(extra["v1_exit_hist"])
                assert np.abs(hist - 50 * np.asarray(extra["fractions"])).max() < 1
    # the budget grid moves the operating point: more mass on late exits costs more
    for m in ("threshold", "boosted", "l2w"):
        costs = [np.asarray([1, 2, 3, 4])[pt.v2.exit_index].mean() for pt in by_method[m]]
        assert costs[0] < costs[-1], (m, costs)
    # BoostedNet gates on its ensemble: exit 1 is the first weak learner alone, later exits differ from plain IMs
    boosted = by_method["boosted"][0].v2.logits
    assert not np.allclose(boosted[:, 1], by_method["threshold"][0].v2.logits[:, 1])
    if frozen_last:   # the backbone's head is never touched by any method
        for pts in by_method.values():
            np.testing.assert_array_equal(pts[0].v2.logits[:, -1], data.v2.logits.numpy())
    assert messages and messages[0].startswith("warm-up")


def test_run_baselines_rejects_bad_requests():
    data, test = _data()
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(data, test, ["msdnet"], SETTINGS)
    with pytest.raises(ValueError, match="need lambdas"):
        run_baselines(data, test, ["diffbranch"], SETTINGS)
    other, _ = _data(frozen_last=False)
    with pytest.raises(ValueError, match="does not match"):
        run_baselines(other, test, ["threshold"], SETTINGS)
    with pytest.raises(ValueError, match="l2w_epsilon"):
        BaselineSettings(l2w_epsilon=0.0)


def test_budget_for_cost_spends_at_most_the_target_even_with_tied_confidences():
    from heads.baselines.thresholds import budget_for_cost
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2000, 5, generator=g, dtype=torch.float64)
    conf[:600, :3] = 1.0                                  # saturated gates: ties at the early exits
    ic_norm = np.array([0.1, 0.3, 0.5, 0.7, 1.0])
    for target in (0.35, 0.5, 0.8):
        p = budget_for_cost(conf, ic_norm, target)
        _, exits = fit_thresholds(conf, budget_fractions(p, 5))
        spent = ic_norm[exits.numpy()].mean()
        assert target - 0.02 <= spent <= target, (target, spent)
    with pytest.raises(ValueError, match="first exit's cost"):
        budget_for_cost(conf, ic_norm, 0.05)


def test_shared_threshold_for_cost_moves_the_gates_own_rule_to_the_target():
    from heads.baselines.thresholds import shared_threshold_for_cost
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(2000, 5, generator=g, dtype=torch.float64)
    conf[:, -1] = 1.0
    ic_norm = np.array([0.1, 0.3, 0.5, 0.7, 1.0])
    t = shared_threshold_for_cost(conf, ic_norm, 0.4)
    leaves = conf > t
    spent = ic_norm[leaves.int().argmax(1).numpy()].mean()
    assert 0.38 <= spent <= 0.4
    assert shared_threshold_for_cost(conf, ic_norm, 0.05) is None     # even t = 0 spends more (exit 1 costs 0.1)
    saturated = conf.clone()
    saturated[:, 0] = 1.0                              # a saturated first gate fires at any t < 1: cost 0.1 at most
    assert shared_threshold_for_cost(saturated, ic_norm, 0.6) is None


@pytest.mark.parametrize("frozen_last", [True, False])
def test_l2w_closed_form_meta_gradient_equals_autograd_through_the_gradient(frozen_last):
    """The WPN gradient of the meta objective, closed form (l2w_meta_gradient), equals differentiating the
    look-ahead step's own autograd gradient (create_graph), L2W-DEN's usual implementation; likewise the IM step."""
    from heads.baselines.common import weighted_ce_grads
    from heads.baselines.l2w import _budget_loss, _weighted_loss, l2w_meta_gradient, l2w_residual
    data, _ = _data(frozen_last=frozen_last)
    bs = BaselineSettings()
    heads = StackedHeads.init(data.exit_dims, K, 1, data.trains_last, seed=3)
    wpn = WeightPredictionNet(len(DIMS), bs.l2w_hidden, seed=4)
    fractions = budget_fractions(bs.l2w_p, len(DIMS))
    train_rows, meta_rows = data.train.rows(torch.arange(0, 20)), data.train.rows(torch.arange(20, 41))
    residual, ce = l2w_residual(heads, *train_rows)
    got = l2w_meta_gradient(heads, wpn, train_rows[0], residual, ce, meta_rows, fractions, bs)

    params = [p.clone().requires_grad_(True) for p in heads.im_params()]
    n_w = len(heads.im_weight)
    live = dataclasses.replace(heads, im_weight=params[:n_w], im_bias=params[n_w:])
    ce_live = exit_cross_entropy(live.im_logits(train_rows[0], train_rows[2]), train_rows[1])
    weights = l2w_weights(wpn(ce_live[0].detach()), bs.l2w_epsilon)
    grads = torch.autograd.grad(_weighted_loss(ce_live, weights), params, create_graph=True)
    ahead = [p - bs.l2w_lookahead_lr * g for p, g in zip(params, grads)]
    ahead_heads = dataclasses.replace(heads, im_weight=ahead[:n_w], im_bias=ahead[n_w:])
    meta = _budget_loss(ahead_heads.im_logits(meta_rows[0], meta_rows[2]), meta_rows[1], fractions)
    want = torch.autograd.grad(meta, list(wpn.parameters()))
    assert max(float(w.abs().max()) for w in want) > 1e-4          # a gradient worth comparing
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    for g, w in zip(weighted_ce_grads(train_rows[0], residual, weights.detach(), n_w), grads):
        torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("frozen_last", [True, False])
def test_boosted_closed_form_grads_equal_autograd(frozen_last):
    """boosted_grads = autograd of sum over trained exits of CE(y, o_s + gamma sg(F_{s-1})), batch mean."""
    from heads.baselines.boosted import boosted_grads
    data, _ = _data(frozen_last=frozen_last)
    heads = StackedHeads.init(data.exit_dims, K, 1, data.trains_last, seed=3)
    feats, labels, last = data.train.rows(torch.arange(0, 30))
    params = [p.clone().requires_grad_(True) for p in heads.im_params()]
    n_w = len(heads.im_weight)
    live = dataclasses.replace(heads, im_weight=params[:n_w], im_bias=params[n_w:])
    ens = boosted_ensemble(live.im_logits(feats, last), 0.5, n_w, detach=True)
    want = torch.autograd.grad(exit_cross_entropy(ens, labels)[..., :n_w].sum(-1).mean(), params)
    for g, w in zip(boosted_grads(heads, feats, labels, last, 0.5), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_route_by_budget_equals_fit_thresholds_routing_with_ties():
    """The compiled routing of L2W-DEN's meta half-batches takes fit_thresholds' exits, tied confidences included."""
    from heads.baselines.thresholds import cumulative_targets, route_by_budget
    gen = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 32, 33):
        for p in (0.3, 0.75, 1.0, 1.7):
            for tie in (False, True):
                conf = torch.rand(n, 6, generator=gen, dtype=torch.float64)
                if tie:
                    conf = (conf * 3).round() / 3          # few distinct values: ties at every threshold
                fractions = budget_fractions(p, 6)
                want = fit_thresholds(conf, fractions)[1]
                got = route_by_budget(conf.numpy(), cumulative_targets(n, fractions))
                assert torch.equal(torch.from_numpy(got), want), (n, p, tie)


def test_run_params_batched_products_equal_per_exit_products(one_thread):
    """RunParams' batched products give every exit's logits and gradients bit for bit as one product per exit."""
    from heads.baselines.common import RunParams, weighted_ce_grads, exit_runs
    assert exit_runs([16, 24, 24, 40, 40, 40, 24]) == [(0, 1), (1, 3), (3, 6), (6, 7)]
    dims = [16, 24, 24, 40, 40, 40, 192, 192, 1280]
    heads = StackedHeads.init(dims, 10, 1, True, seed=3)
    want_w = [w.clone() for w in heads.im_weight]
    ims = RunParams(heads)
    assert all(torch.equal(w, v) for w, v in zip(heads.im_weight, want_w))
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(32, d, generator=gen) for d in dims]
    x = ims.stack(feats)
    assert torch.equal(ims.logits(x, None), heads.im_logits(feats)[0])
    residual = torch.randn(32, len(dims), 10, generator=gen)
    weights = torch.rand(32, len(dims), generator=gen)
    want = weighted_ce_grads(feats, residual, weights, len(dims))
    got = ims.grads(x, residual * (weights[..., None] / 32))
    per_exit = [g for run in got[:len(ims.runs)] for g in run] + [g for run in got[len(ims.runs):] for g in run]
    for g, w in zip(per_exit[:len(dims)], want[:len(dims)]):
        assert torch.equal(g, w[:, 0])
    for g, w in zip(per_exit[len(dims):], want[len(dims):]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("frozen_last", [True, False])
def test_l2w_step_equals_the_reference_step(frozen_last, one_thread):
    """L2WStep (closed-form WPN backward, batched products, compiled routing) moves the IMs and the WPN bit for
    bit as the reference step does: l2w_residual, l2w_meta_gradient (autograd through the WPN, fit_thresholds
    routing) and weighted_ce_grads, one Adam step each, over batches of the sizes a 64-row epoch of the demo cache
    takes (its tail has 24 rows)."""
    from heads.baselines.common import weighted_ce_grads
    from heads.baselines.l2w import L2WStep, l2w_meta_gradient, l2w_residual
    dims, k = [16, 24, 24, 40], 10
    bs = BaselineSettings(l2w_meta_lr=1e-2)          # a meta step large enough to move the weights visibly
    fractions = budget_fractions(bs.l2w_p, len(dims))
    ref_heads = StackedHeads.init(dims, k, 1, not frozen_last, seed=3)
    ref_wpn = WeightPredictionNet(len(dims), bs.l2w_hidden, seed=4)
    fast_heads = StackedHeads.init(dims, k, 1, not frozen_last, seed=3)
    fast_wpn = WeightPredictionNet(len(dims), bs.l2w_hidden, seed=4)
    update = StackedAdam.one_trial(ref_heads.im_params(), SETTINGS.lr, SETTINGS.weight_decay, "cpu")
    meta_update = StackedAdam.one_trial(list(ref_wpn.parameters()), bs.l2w_meta_lr, bs.l2w_meta_weight_decay, "cpu")
    step = L2WStep(fast_heads, fast_wpn, SETTINGS, bs, fractions)
    wpn0 = [p.detach().clone() for p in ref_wpn.parameters()]
    for seed, n in enumerate((64, 48, 24, 64)):
        feats, labels, last = _wide_rows(n, frozen_last, seed)
        step(feats, labels, last)
        half = (n + 1) // 2
        rows = [([f[s] for f in feats], labels[s], None if last is None else last[s])
                for s in (slice(0, half), slice(half, None))]
        for i, train_rows in enumerate(rows):
            residual, ce = l2w_residual(ref_heads, *train_rows)
            meta_update.step(l2w_meta_gradient(ref_heads, ref_wpn, train_rows[0], residual, ce, rows[1 - i],
                                                fractions, bs))
            with torch.no_grad():
                weights = l2w_weights(ref_wpn(ce), bs.l2w_epsilon)
            update.step(weighted_ce_grads(train_rows[0], residual, weights, len(ref_heads.im_weight)))
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(ref_wpn.parameters(), wpn0)) > 1e-3
    for got, want in zip(list(fast_wpn.parameters()), list(ref_wpn.parameters())):
        assert torch.equal(got.detach(), want.detach())
    for got, want in zip(fast_heads.im_params(), ref_heads.im_params()):
        assert torch.equal(got, want.detach())


@pytest.mark.parametrize("frozen_last", [True, False])
def test_boosted_step_equals_boosted_grads_with_adam(frozen_last, one_thread):
    """BoostedStep (batched products) moves the IMs bit for bit as boosted_grads + one Adam step does."""
    from heads.baselines.boosted import BoostedStep, boosted_grads
    ref = StackedHeads.init([16, 24, 24, 40], 10, 1, not frozen_last, seed=3)
    fast = StackedHeads.init([16, 24, 24, 40], 10, 1, not frozen_last, seed=3)
    update = StackedAdam.one_trial(ref.im_params(), SETTINGS.lr, SETTINGS.weight_decay, "cpu")
    step = BoostedStep(fast, SETTINGS, 0.5)
    start = [p.clone() for p in ref.im_params()]
    for seed, n in enumerate((64, 48, 24, 64)):
        feats, labels, last = _wide_rows(n, frozen_last, seed)
        step(feats, labels, last)
        update.step(boosted_grads(ref, feats, labels, last, 0.5))
    assert max(float((p - q).abs().max()) for p, q in zip(ref.im_params(), start)) > 1e-2
    for got, want in zip(fast.im_params(), ref.im_params()):
        assert torch.equal(got, want)


def _diffbranch_case(frozen_last):
    """A stack of three lambdas with random gates, some samples past the mass clamp of eqs. 7-8, and a batch."""
    data, _ = _data(frozen_last=frozen_last)
    lam = torch.tensor([0.0, 0.3, 3.0])
    heads = StackedHeads.init(data.exit_dims, K, 3, data.trains_last, seed=3)
    gen = torch.Generator().manual_seed(2)
    heads.gate_bias = torch.randn(heads.gate_bias.shape, generator=gen) * 2     # some samples use up their mass
    heads.gate_weight = torch.randn(heads.gate_weight.shape, generator=gen)
    heads.im_weight = [w + 0.3 * torch.randn(w.shape, generator=gen) for w in heads.im_weight]
    feats, labels, last = data.train.rows(torch.arange(0, 40))
    return data, lam, heads, (feats, labels, last)


@pytest.mark.parametrize("frozen_last", [True, False])
def test_diffbranch_step_is_the_closed_form_up_to_rounding_on_any_thread_count(frozen_last):
    """DiffBranchStep (what training runs on the CPU: one compiled pass per sample) = diffbranch_grads (autograd's
    bits) up to float rounding in every IM and gate parameter, with gates inside and past the mass clamp; and
    bit for bit the same on one thread and on two (each trial's samples are added in order)."""
    from heads.baselines.diffbranch import DiffBranchStep, diffbranch_grads
    data, lam, heads, (feats, labels, last) = _diffbranch_case(frozen_last)
    want = diffbranch_grads(heads, feats, labels, last, lam, data.ic_norm)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(DiffBranchStep(heads, lam, data.ic_norm)(feats, labels, last))
    finally:
        torch.set_num_threads(before)
    assert len(runs[0]) == len(want)
    for one, two, w in zip(*runs, want):
        assert one.shape == w.shape and one.dtype == w.dtype
        torch.testing.assert_close(one, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
    for one, two in zip(runs[0][-2:], runs[1][-2:]):
        assert torch.equal(one, two)                       # the gates' sums: the same order on any thread count


@pytest.mark.parametrize("frozen_last", [True, False])
def test_diffbranch_closed_form_grads_equal_autograd(frozen_last, one_thread):
    """diffbranch_grads = autograd of diffbranch_loss (eq. 9 through the gate statistics) bit for bit in every IM
    and gate parameter, for a stack of lambdas, with gates both inside and past the mass clamp of eqs. 7-8."""
    from heads.baselines.diffbranch import diffbranch_grads
    data, lam, heads, (feats, labels, last) = _diffbranch_case(frozen_last)
    params = [p.clone().requires_grad_(True) for p in heads.im_params() + heads.gate_params()]
    n_w = len(heads.im_weight)
    live = dataclasses.replace(heads, im_weight=params[:n_w], im_bias=params[n_w:2 * n_w],
                               gate_weight=params[-2], gate_bias=params[-1])
    want = torch.autograd.grad(diffbranch_loss(live, feats, labels, last, lam, data.ic_norm), params)
    got = diffbranch_grads(heads, feats, labels, last, lam, data.ic_norm)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.equal(g, w)
    assert float(want[-1].abs().max()) > 1e-3 and float(want[0].abs().max()) > 1e-3
