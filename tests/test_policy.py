"""opt_hooks/policy.py: estimates, significance, count evidence, materiality, tiers and order,
against reference values and at their exact boundaries."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from opt_hooks import policy as pol

POLICY = pol.VerdictPolicy()


def test_estimate_is_the_mean_and_standard_error_of_the_per_token_changes():
    changes = torch.tensor([-0.3, 0.1, -0.2, -0.25, 0.05, -0.4], dtype=torch.float64)
    est = pol.estimate(changes.sum()[None], (changes**2).sum()[None], len(changes))
    se = float(changes.std() / math.sqrt(len(changes)))
    assert float(est.mean[0]) == pytest.approx(float(changes.mean()), rel=1e-15)
    assert float(est.se[0]) == pytest.approx(se, rel=1e-12)
    assert float(est.p_value[0]) == pytest.approx(stats.norm.cdf(float(changes.mean()) / se), rel=1e-12)


def test_fewer_than_two_tokens_give_no_standard_error():
    est = pol.estimate(torch.tensor([-1.0]), torch.tensor([1.0]), 1)
    assert math.isnan(float(est.se[0])) and float(est.p_value[0]) == 1.0


def test_a_change_equal_on_every_token_is_exact():
    """SE 0: a strict descent has p = 0, an exact tie at zero is no descent (p = 1)."""
    p = pol.p_value(torch.tensor([-1e-300, 0.0, 1e-300], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert p.tolist() == [0.0, 1.0, 1.0]
    assert [decide(held_out=mean, se=0.0, z=4.0).tier for mean in (-1e-300, 0.0)] == ["certified", "violated"]


def test_bonferroni_threshold():
    assert POLICY.critical_z(1000) == pytest.approx(3.8905918864131204, rel=1e-12)  # Phi^-1(1 - 0.05/1000)
    assert POLICY.critical_z(1) == pytest.approx(1.6448536269514722, rel=1e-12)
    assert pol.VerdictPolicy(alpha=0.01).critical_z(10) > POLICY.critical_z(10)


def test_significance_boundary_is_strict():
    z, se = POLICY.critical_z(50), 0.01
    assert decide(held_out=-z * se * (1 + 1e-9), se=se, z=z).tier == "certified"  # float64 all the way
    assert decide(held_out=-z * se * (1 - 1e-9), se=se, z=z).tier == "violated"


@pytest.mark.parametrize("hits, trials, rate, exact", [
    (10, 10, 0.5, 0.0009765625), (8, 10, 0.5, 0.0546875), (30, 100, 0.1, 2.445112239390972e-08), (3, 3, 0.9, 0.729),
])
def test_count_p_value_bounds_the_binomial_tail(hits, trials, rate, exact):
    """Reference tails from scipy.stats.binom.sf; the Chernoff bound is never below them and is
    exact when every trial hits."""
    bound = pol.count_p_value(hits, trials, rate)
    assert bound >= exact * (1 - 1e-12)
    if hits == trials:
        assert bound == pytest.approx(exact, rel=1e-12)
    assert bound < 1.5 * exact ** 0.5 or hits == trials


def test_count_p_value_edges():
    assert pol.count_p_value(2, 10, 0.5) == 1.0  # fewer hits than expected: no evidence
    assert pol.count_p_value(0, 0, 0.3) == 1.0
    assert pol.count_p_value(3, 5, 0.0) == 0.0


@pytest.mark.parametrize("failures, trials, reference", [
    (1, 10, 0.34771866733585843), (3, 100, 0.07271034328690397), (50, 400, 0.1547439204173191),
    (7, 3412, 0.0037794726540721704),
])
def test_wilson_upper_bound_against_reference_values(failures, trials, reference):
    """Reference: statsmodels' proportion_confint(method='wilson', alpha=0.10) upper limit."""
    assert pol.upper_rate(failures, trials) == pytest.approx(reference, rel=1e-9)


def test_rule_of_three():
    assert pol.upper_rate(0, 3412) == pytest.approx(3 / 3412, rel=1e-15)
    assert pol.upper_rate(0, 2) == 1.0 and pol.upper_rate(0, 0) == 1.0


def decide(**overrides):
    args = dict(audit_change=-1.0, held_out=-0.1, se=0.001, touched=500, z=4.0, share=0.5)
    return pol.decide(POLICY, **{**args, **overrides})


def test_tiers_and_reasons():
    assert decide().tier == "certified"
    assert decide(audit_change=0.0) == pol.Verdict("satisfied", "no descent on the audit tokens")
    rises = decide(held_out=0.1)  # descends on the audit tokens, rises held out
    assert rises.tier == "violated" and "not significant" in rises.reason
    assert decide(held_out=None, se=None).reason == "no held-out tokens to confirm it"
    few = decide(touched=POLICY.min_touched - 1)
    assert few.tier == "violated" and "changes only" in few.reason
    assert decide(touched=POLICY.min_touched).tier == "certified"
    assert decide(held_out=-0.003, se=0.001).tier == "violated"  # 3 SE < z = 4
    tiny = decide(share=POLICY.min_share * 0.999)
    assert tiny.tier == "violated" and tiny.reason.startswith("immaterial")
    assert decide(share=POLICY.min_share).tier == "certified"
    assert decide(share=None).tier == "certified"  # a feature worth nothing: any real gain matters
    layer = decide(share=POLICY.min_layer_share * 2, layer_finding=True)
    assert layer.tier == "certified" and decide(share=POLICY.min_layer_share * 2).tier == "violated"
    chance = decide(count_p=0.01, count_threshold=0.001)
    assert chance.tier == "violated" and "co-activation" in chance.reason
    assert decide(count_p=0.0009, count_threshold=0.001).tier == "certified"
    assert decide(held_out=0.0, se=0.0).tier == "violated"  # an exact tie is no descent
    assert decide(held_out=-1e-12, se=0.0).tier == "certified"


def test_ranking_is_tier_then_gain():
    rows = [("violated", 5.0, 1), ("certified", 0.1, 2), ("certified", 0.3, 3), ("violated", None, 4), ("satisfied", 9.0, 5)]
    rows.sort(key=lambda r: pol.rank_key(r[0], r[1], (r[2],)))
    assert [r[2] for r in rows] == [3, 2, 1, 4, 5]


@pytest.mark.parametrize("field, value", [("alpha", 0.0), ("alpha", 1.0), ("min_share", -0.1), ("min_touched", 1)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError):
        pol.VerdictPolicy(**{field: value})
