"""Certificates as fixed changes: measured on the audit tokens from pass-1 state alone (no
second look at the data) against the same change evaluated token by token, against applying it
and recomputing L in float64, and their first-order predictions against the exact change.
Every check runs on unweighted tokens and on tokens with weights w_n (THEORY.md section 1)."""
from __future__ import annotations

import pytest
import torch

from opt_hooks.engine import AuditOptions, LayerAudit
from opt_hooks.theory.objective import objective, residuals, token_losses
from opt_hooks.theory.stats import LayerStats, TokenBatch

LAM = 0.1
FAMILIES = ["C1", "C2", "C3", "C4", "C5", "C6", "decoder"]


def mixed_case(seed: int = 0, n: int = 600, k: int = 12, d: int = 10):
    """Random sparse float64 codes with every kind of violation planted: a hierarchy (1 only
    with 0, and 9 mostly with 8), a complementary pair (3 on wherever 2 is off), a feature that
    never switches off (5), a dead one (7), and a shifted bias."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    z = torch.where(torch.rand(n, k, generator=g) < 0.15, torch.rand(n, k, generator=g, dtype=torch.float64), 0.0)
    z[:, 1] = torch.where(z[:, 0] > 0, z[:, 1], 0.0)
    z[:, 9] = torch.where((z[:, 8] > 0) | (torch.arange(n) % 97 == 0), z[:, 9], 0.0)
    z[:, 2] = torch.where(torch.arange(n) % 2 == 0, 0.5 + torch.rand(n, generator=g, dtype=torch.float64), 0.0)
    z[:, 3] = torch.where(z[:, 2] == 0, 1 + torch.rand(n, generator=g, dtype=torch.float64), z[:, 3])
    z[:, 5] += 0.3
    z[:, 7] = 0
    bias = 0.05 * torch.randn(d, generator=g, dtype=torch.float64)
    x = z @ atoms + bias + 0.2 + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, atoms, z, bias


def token_weights(n: int, seed: int = 5) -> torch.Tensor:
    """Weights spread over a factor of about 20, as a normalising SAE's s_n^2 are."""
    return torch.exp(0.8 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.fixture(scope="module", params=["unweighted", "weighted"])
def planned(request):
    x, atoms, z, bias = mixed_case()
    w = token_weights(len(x)) if request.param == "weighted" else None
    audit = LayerAudit(atoms, bias, lam=LAM, options=AuditOptions(c3_tol=0.0, worst_k=64))
    audit.update(x[:250], z[:250], weight=None if w is None else w[:250])
    audit.update(x[250:], z[250:], weight=None if w is None else w[250:])
    return x, atoms, z, bias, audit.plan(), w


def brute_change(family, k, x, atoms, z, bias, w):
    """Apply certificate k at the family's step to full tensors and recompute sum_n loss_n."""
    r = residuals(x, atoms, z, bias)
    atoms2, z2, bias2 = family.apply(k, atoms, z, bias, r, LAM, w)
    assert (z2 >= 0).all()
    return (objective(x, atoms2, z2, bias2, LAM, w) - objective(x, atoms, z, bias, LAM, w)) * len(x)


def test_every_family_is_planted(planned):
    *_, plan, _ = planned
    assert set(plan.families["C2"].kind.tolist()) == {1, -1}, "both pair kinds must be exercised"
    assert {name: len(plan.families.get(name, ())) > 0 for name in FAMILIES} == {name: True for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_audit_change_equals_token_by_token_evaluation(planned, name):
    """The closed form from pass-1 state equals the same fixed change evaluated on every audit
    token (C6 included: every token with ||r|| above the radius is one of the kept ones)."""
    x, atoms, z, bias, plan, w = planned
    family = plan.families[name]
    tokens = family.held_out(TokenBatch(x, z, atoms, bias, weight=w), LAM)
    change, _ = plan.audit_changes[name]
    torch.testing.assert_close(change, tokens.sum, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_audit_change_equals_applying_the_certificate(planned, name):
    x, atoms, z, bias, plan, w = planned
    family = plan.families[name]
    chosen = family.step.clone()
    try:
        for scale in (1.0, 0.5, 0.1):
            family.step = chosen * scale
            change, _ = family.audit_change(plan.stats, LAM, family.step)
            for k in range(min(len(family), 6)):
                assert float(change[k]) == pytest.approx(brute_change(family, k, x, atoms, z, bias, w), rel=1e-7, abs=1e-10)
    finally:
        family.step = chosen


@pytest.mark.parametrize("name", ["C2", "C3", "C4", "C5", "C6", "decoder"])
def test_first_order_prediction_is_the_change_to_first_order(planned, name):
    """At small steps the first-order prediction equals the exact change, with an error that
    falls as the step squared (C1's step is finite and its change exactly linear)."""
    *_, plan, _ = planned
    family = plan.families[name]
    step = family.step.clone()
    errors = []
    for h in (1e-3, 1e-4):
        change, first = family.audit_change(plan.stats, LAM, step * h)
        assert bool((first < 0).all()), "the first-order change of a descent direction is negative"
        errors.append(((change - first).abs() / first.abs()).max())
    assert float(errors[0]) < 0.05
    assert float(errors[1]) < 0.2 * float(errors[0]) + 1e-12  # linear convergence of the ratio: first order


def test_c1_change_is_exactly_linear(planned):
    *_, plan, _ = planned
    family = plan.families["C1"]
    change, first = family.audit_change(plan.stats, LAM, family.step)
    assert torch.equal(change, first) and torch.equal(change, -LAM * plan.stats.n_tokens * family.floor.double())


@pytest.mark.parametrize("name", ["C3", "C4", "C5", "C6", "decoder"])
def test_line_search_finds_the_exact_minimiser(planned, name):
    *_, plan, _ = planned
    family = plan.families[name]
    best, _ = family.audit_change(plan.stats, LAM, family.step)
    assert bool((best < 0).all())
    for factor in (0.9, 0.99, 1.01, 1.1):
        other, _ = family.audit_change(plan.stats, LAM, family.step * factor)
        assert bool((other >= best - 1e-12 * best.abs()).all()), factor


def test_pair_line_search_takes_the_best_grid_step(planned):
    from opt_hooks.theory.c2_pairs import PAIR_STEPS

    *_, plan, _ = planned
    family = plan.families["C2"]
    best, _ = family.audit_change(plan.stats, LAM, family.step)
    for step in PAIR_STEPS:
        other, _ = family.audit_change(plan.stats, LAM, torch.full_like(family.step, step))
        assert bool((other >= best).all())


def test_pair_certificate_needs_no_inactive_projection_on_audit_tokens(planned):
    """Where i is off on an audit token, the step never clips z_i, so <d_i, r_n> there does not
    enter the change: scrambling those projections leaves the exact evaluation unchanged."""
    x, atoms, z, bias, plan, w = planned
    family = plan.families["C2"]
    q = residuals(x, atoms, z, bias) @ atoms.T * (1 if w is None else w[:, None])
    scrambled = torch.where(z > 0, q, 1e3 * torch.randn_like(q))
    torch.testing.assert_close(family.dense_changes(z, scrambled, LAM, w).sum, family.dense_changes(z, q, LAM, w).sum,
                               rtol=1e-9, atol=1e-9)


def test_held_out_sums_are_those_of_the_per_token_changes(planned):
    """The streamed sum, sum of squares and touched count equal those of the brute-force
    per-token changes (each token's loss recomputed with the certificate applied)."""
    x, atoms, z, bias, plan, w = planned
    for name in FAMILIES:
        family = plan.families[name]
        tokens = family.held_out(TokenBatch(x, z, atoms, bias, weight=w), LAM)
        r = residuals(x, atoms, z, bias)
        for k in range(min(len(family), 3)):
            atoms2, z2, bias2 = family.apply(k, atoms, z, bias, r, LAM, w)
            per_token = token_losses(x, atoms2, z2, bias2, LAM, w) - token_losses(x, atoms, z, bias, LAM, w)
            assert float(tokens.sum[k]) == pytest.approx(float(per_token.sum()), rel=1e-7, abs=1e-10)
            assert float(tokens.sum_sq[k]) == pytest.approx(float((per_token**2).sum()), rel=1e-6, abs=1e-10)
            moved = (per_token.abs() > 1e-12).sum()
            assert abs(int(tokens.touched[k]) - int(moved)) <= int(0.01 * len(x)), (name, k)


def test_known_lam_needs_one_look_at_the_audit_tokens(planned):
    x, atoms, z, bias, plan, w = planned
    assert not plan.needs_audit_tokens
    before = plan.result()
    assert before.layer_conditions["C6"]["worst_weighted"] == (w is not None)
    plan.update(x, z, held_out=torch.zeros(len(x), dtype=torch.bool), weight=w)  # audit tokens are ignored
    assert plan.result().features == before.features


def test_estimated_lam_sums_its_terms_on_a_second_look():
    x, atoms, z, bias = mixed_case(seed=1)
    z = 0.7 * z  # shrunk codes: active atoms see residual along themselves, so lam is estimable
    audit = LayerAudit(atoms, bias, lam=None)
    audit.update(x, z)
    plan = audit.plan()
    assert plan.needs_audit_tokens
    plan.update(x[:300], z[:300])
    plan.update(x[300:], z[300:])
    known = LayerStats(atoms, bias, lam=plan.lam)
    known.update(x, z)
    expected, got = known.compute().lam_totals, plan.lam_totals()
    assert torch.equal(got.over_count, expected.over_count)
    assert got.n_over_half_lam == expected.n_over_half_lam
    torch.testing.assert_close(got.over_excess, expected.over_excess, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="must stream the same audit tokens"):
        short = audit.plan()
        short.update(x[:10], z[:10])
        short.result()


def test_held_out_codes_of_a_feature_dead_on_the_audit_tokens():
    """No live feature, so no C4 certificate; the held-out tokens' codes must not break pass 2."""
    atoms = torch.nn.functional.normalize(torch.tensor([[0.6, -0.1, -0.8]]), dim=1)
    x = torch.tensor([[0.1, 0.0, 0.1], [0.2, 0.1, -0.3]])
    z = torch.tensor([[0.0], [0.5]])
    audit = LayerAudit(atoms, torch.zeros(3), lam=1.0)
    audit.update(x[:1], z[:1])
    plan = audit.plan()
    assert len(plan.families["C4"]) == 0
    plan.update(x, z, held_out=torch.tensor([False, True]))
    layer = plan.result()
    assert layer.n_held_out == 1 and layer.dead_features == [0]


def test_spare_rule_with_a_tie_at_the_radius():
    """Two tokens share the smallest kept residual norm, and only one of them is kept: the rule
    codes tokens strictly beyond the radius, so the audit side (kept tokens) and the token-by-token
    evaluation (every token) still agree."""
    g = torch.Generator().manual_seed(3)
    v = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    small = 0.01 * torch.randn(20, 3, generator=g, dtype=torch.float64)
    x = torch.cat([small, torch.stack([3 * v, 2 * v, 2 * v])])
    atoms = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64), dim=1)
    z = torch.zeros(len(x), 2, dtype=torch.float64)
    z[:20, 0] = 0.01 * torch.rand(20, generator=g, dtype=torch.float64)
    bias = torch.zeros(3, dtype=torch.float64)
    audit = LayerAudit(atoms, bias, lam=0.5, options=AuditOptions(worst_k=2))
    audit.update(x, z)
    plan = audit.plan()
    family = plan.families["C6"]
    assert family.radius == pytest.approx(2.0) and float(plan.stats.worst_rnorm[-1]) == pytest.approx(2.0)
    tokens = family.held_out(TokenBatch(x, z, atoms, bias), 0.5)
    torch.testing.assert_close(plan.audit_changes["C6"][0], tokens.sum, rtol=1e-12, atol=1e-12)
    assert int(tokens.touched[0]) == 1  # only the token beyond the radius is coded


def test_held_out_changes_where_the_rule_meets_other_codes(planned):
    """Held-out tokens need not look like the audit tokens: with every code shrunk, C1's shift is
    no longer compensated where z_i falls below the floor, C2's rule clips, C6 replaces codes.
    The streamed sums still equal applying each certificate and recomputing every token's loss."""
    x, atoms, z, bias, plan, w = planned
    g = torch.Generator().manual_seed(11)
    z_held = z * (0.3 + torch.rand(z.shape, generator=g, dtype=torch.float64))
    assert bool((z_held[:, plan.families["C1"].features] < plan.families["C1"].floor).any())
    r = residuals(x, atoms, z_held, bias)
    for name in FAMILIES:
        family = plan.families[name]
        tokens = family.held_out(TokenBatch(x, z_held, atoms, bias, weight=w), LAM)
        for k in range(min(len(family), 3)):
            atoms2, z2, bias2 = family.apply(k, atoms, z_held, bias, r, LAM, w)
            per_token = token_losses(x, atoms2, z2, bias2, LAM, w) - token_losses(x, atoms, z_held, bias, LAM, w)
            assert float(tokens.sum[k]) == pytest.approx(float(per_token.sum()), rel=1e-7, abs=1e-10), (name, k)


def test_spare_certificate_takes_the_best_kept_direction():
    """Of every kept worst-residual direction as the new atom (each at its own line-search step),
    the one chosen lowers L on the audit tokens most; residuals point every way and the token
    weights spread widely, so which one is best depends on weighting them right."""
    from opt_hooks.theory.c6_spare import SpareCertificate

    g = torch.Generator().manual_seed(8)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    atoms = torch.nn.functional.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    z = torch.zeros(400, 3, dtype=torch.float64)
    z[:, 0] = torch.relu(x @ atoms[0] - 0.5)
    w = torch.exp(1.5 * torch.randn(400, generator=g, dtype=torch.float64))
    for weight in (None, w):
        audit = LayerAudit(atoms, torch.zeros(6, dtype=torch.float64), lam=1.0, options=AuditOptions(worst_k=40))
        audit.update(x, z, weight=weight)
        plan = audit.plan()
        chosen = plan.families["C6"]
        best, _ = chosen.audit_change(plan.stats, 1.0, chosen.step)
        changes = []
        for vector in plan.stats.worst_residual:
            other = SpareCertificate(chosen.feature, vector / vector.norm(), chosen.old_atom, chosen.radius)
            changes.append(float(other.audit_change(plan.stats, 1.0, other.line_search(plan.stats, 1.0))[0]))
        assert float(best) == pytest.approx(min(changes), rel=1e-12)
