"""Exit distribution (eqs. 7-8), exit rule (eqs. 3-4) and gate targets (eqs. 31-32) on hand-made numbers."""
import pytest
import torch

from heads.model.exits import ExitRule, exit_decision, exit_distribution, exit_probabilities, gate_targets


def test_exit_distribution_hand_made():
    g = torch.tensor([[0.1, 0.2], [0.6, 0.6], [1.0, 0.3], [0.0, 0.0]])
    expected = torch.tensor([[0.1, 0.2, 0.7],     # eq. 8 without clamping: sum g < 1
                             [0.6, 0.4, 0.0],     # the crossing entry takes what is left, the rest clamps to 0
                             [1.0, 0.0, 0.0],
                             [0.0, 0.0, 1.0]])
    torch.testing.assert_close(exit_distribution(g), expected)


def test_exit_distribution_is_a_distribution():
    g = torch.rand(3, 500, 7, generator=torch.Generator().manual_seed(0))
    p = exit_distribution(g)
    assert p.shape == (3, 500, 8)
    assert bool((p >= 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 500))
    # eqs. 7-8 hold wherever the running sum has not passed 1
    mass_before = torch.cumsum(g, -1) - g
    ok = mass_before + g <= 1
    torch.testing.assert_close(p[..., :-1][ok], g[ok])


def test_exit_probabilities_invert_eq4():
    p_g = torch.distributions.Dirichlet(torch.ones(6)).sample((200,))
    p_e = exit_probabilities(p_g)
    survive = torch.cumprod(torch.cat([torch.ones(200, 1), 1 - p_e[:, :-1]], -1), -1)
    torch.testing.assert_close(p_e * survive, p_g, atol=1e-5, rtol=1e-4)   # eq. 4
    assert bool((p_e[:, -1] == 1).all())


def test_exit_decision_hand_made():
    p_g = torch.tensor([[0.3, 0.4, 0.3],    # P(E) = 0.3, 0.4/0.7 = 0.57 -> exit 2
                        [0.6, 0.1, 0.3],    # P(E^1) = 0.6 -> exit 1
                        [0.2, 0.3, 0.5],    # 0.2, 0.3/0.8 = 0.375 -> last
                        [1.0, 0.0, 0.0],    # nothing left after exit 1 (0/0 afterwards)
                        [0.0, 0.0, 1.0]])
    assert exit_decision(p_g).tolist() == [1, 0, 2, 0, 2]
    assert exit_decision(p_g, threshold=0.25).tolist() == [0, 0, 1, 0, 2]
    with pytest.raises(ValueError, match="threshold"):
        exit_decision(p_g, threshold=1.5)


def test_exit_decision_sampled_follows_p_g():
    p_g = torch.tensor([0.2, 0.5, 0.1, 0.2]).expand(20000, 4)
    taken = exit_decision(p_g, sample=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(taken, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.1, 0.2]), atol=0.015, rtol=0)


def test_gate_targets_subsequent_eq31():
    costs = torch.tensor([[3.0, 1.0, 2.0, 4.0],
                          [3.0, 1.0, 2.0, 0.5],    # best is the last exit: every gate closed
                          [1.0, 1.0, 2.0, 4.0],    # a tie: the first minimum is l*
                          [0.1, 5.0, 5.0, 5.0]])
    expected = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(gate_targets(costs), expected)


def test_gate_targets_ifmin_eq32():
    # the example of appendix 9.15: 6 gates, best at 3, exit 4 worse than a later one -> 0,0,1,0,1,1
    costs = torch.tensor([[5.0, 4.0, 1.0, 3.0, 2.0, 2.0, 2.5]])
    torch.testing.assert_close(gate_targets(costs, "ifmin"), torch.tensor([[0, 0, 1, 0, 1, 1.0]]))
    torch.testing.assert_close(gate_targets(costs, "subsequent"), torch.tensor([[0, 0, 1, 1, 1, 1.0]]))
    # with costs that only grow after l* the two rules agree
    growing = torch.tensor([[3.0, 1.0, 2.0, 4.0, 5.0]])
    torch.testing.assert_close(gate_targets(growing, "ifmin"), gate_targets(growing, "subsequent"))


def test_gate_targets_batched_and_errors():
    costs = torch.rand(4, 9, 5, generator=torch.Generator().manual_seed(1))
    for rule in ("subsequent", "ifmin"):
        t = gate_targets(costs, rule)
        assert t.shape == (4, 9, 4)
        best = costs.argmin(-1)
        gates = torch.arange(4)
        # both rules: closed before l*, open at l* (when l* < L)
        assert bool((t[gates[None, None] < best[..., None]] == 0).all())
        has_gate = best < 4
        assert bool((t[has_gate].gather(-1, best[has_gate][:, None]) == 1).all())
    with pytest.raises(ValueError, match="rule"):
        gate_targets(costs, "sometimes")


def _stepwise(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """The runtime's loop: ExitRule over the exits, the samples that leave dropped from the batch."""
    n, n_gates = g.shape
    exits = torch.full((n,), n_gates, dtype=torch.int64)
    rule, alive = ExitRule(n, threshold), torch.arange(n)
    for l in range(n_gates):
        if not rule.can_exit:
            break
        leaving = rule.step(g[alive, l])
        exits[alive[leaving]] = l
        stay = torch.nonzero(~leaving).squeeze(1)
        alive = alive[stay]
        rule.keep(stay)
    return exits


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_exit_rule_equals_exit_decision(threshold):
    """One exit at a time, the rule takes exit_decision's exits: gates spread over [0, 1], gates that are mostly
    small (the sum crosses 1 late or never), and gates exactly 0 and 1."""
    gen = torch.Generator().manual_seed(int(threshold * 10))
    n, n_gates = 4000, 9
    spread = torch.rand(n, n_gates, generator=gen)
    small = torch.rand(n, n_gates, generator=gen) ** 4 * 0.5
    hard = torch.randint(0, 2, (n, n_gates), generator=gen).float() * torch.rand(n, 1, generator=gen).round()
    for g in (spread, small, hard):
        expected = exit_decision(exit_distribution(g), threshold)
        assert torch.equal(_stepwise(g, threshold), expected)
    if 0.0 < threshold < 1.0:   # the samples really leave at several depths
        assert len(set(_stepwise(small, threshold).tolist())) > 3


def test_exit_rule_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        ExitRule(3, 1.5)
