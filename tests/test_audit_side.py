"""Certificates measured on the audit tokens from pass-1 state alone (no second look at the
data) against the same certificates evaluated token by token, and against applying them and
recomputing L in float64."""
from __future__ import annotations

import pytest
import torch

from opt_hooks.engine import AuditOptions, LayerAudit
from opt_hooks.theory.objective import objective, residuals
from opt_hooks.theory.stats import LayerStats, TokenBatch

LAM = 0.1


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


@pytest.fixture(scope="module")
def planned():
    x, atoms, z, bias = mixed_case()
    audit = LayerAudit(atoms, bias, lam=LAM, options=AuditOptions(c3_tol=0.0))
    audit.update(x[:250], z[:250])
    audit.update(x[250:], z[250:])
    return x, atoms, z, bias, audit.plan()


def test_every_family_is_planted(planned):
    *_, plan = planned
    kinds = set(plan.families["C2"].kind.tolist())
    assert kinds == {1, -1}, "both pair kinds must be exercised"
    assert {name: len(f) > 0 for name, f in plan.families.items()} == {name: True for name in ("C1", "C2", "C3", "C4", "C5", "C6")}


@pytest.mark.parametrize("name", ["C1", "C2", "C3", "C4", "C5"])
def test_audit_change_equals_token_by_token_evaluation(planned, name):
    x, atoms, z, bias, plan = planned
    family = plan.families[name]
    token_change, token_first = family.token_change(TokenBatch.from_tokens(x, z, atoms, bias, LAM), LAM)
    change, first = plan.audit_changes(name)
    torch.testing.assert_close(change, token_change, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(first, token_first, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["C1", "C2", "C3", "C4", "C5"])
def test_audit_change_equals_applying_the_certificate(planned, name):
    x, atoms, z, bias, plan = planned
    family = plan.families[name]
    change, _ = plan.audit_changes(name)
    before = objective(x, atoms, z, bias, LAM)
    r = residuals(x, atoms, z, bias)
    for k in range(min(len(family), 6)):
        for e, eps in enumerate(family.eps):
            atoms2, z2, bias2 = family.apply(k, eps, atoms, z, bias, r, LAM)
            assert (z2 >= 0).all()
            measured = (objective(x, atoms2, z2, bias2, LAM) - before) * len(x)
            assert float(change[e, k]) == pytest.approx(measured, rel=1e-7, abs=1e-10), (name, k, eps)


def test_pair_certificate_needs_no_inactive_projection_on_audit_tokens(planned):
    """Where i is off on an audit token, the step never clips z_i, so <d_i, r_n> there does not
    enter the change: scrambling those projections leaves the exact evaluation unchanged."""
    x, atoms, z, bias, plan = planned
    family = plan.families["C2"]
    q = residuals(x, atoms, z, bias) @ atoms.T
    scrambled = torch.where(z > 0, q, 1e3 * torch.randn_like(q))
    torch.testing.assert_close(family.dense_change(z, scrambled, LAM)[0], family.dense_change(z, q, LAM)[0],
                               rtol=1e-9, atol=1e-9)


def test_spare_certificate_on_audit_tokens_codes_the_kept_worst_tokens(planned):
    x, atoms, z, bias, plan = planned
    family, stats = plan.families["C6"], plan.stats
    change, _ = plan.audit_changes("C6")
    before = objective(x, atoms, z, bias, LAM)
    r = residuals(x, atoms, z, bias)
    for k in range(len(family)):
        for e, eps in enumerate(family.eps):
            atoms2, z2 = atoms.clone(), z.clone()
            i, a = int(family.features[k]), family.atom[k]
            atoms2[i] = a
            kept = torch.zeros(len(x), dtype=torch.bool)
            kept[stats.worst_token] = True
            z2[:, i] = torch.where(kept & (2 * (r @ a) > LAM), eps * float(family.scale[k]), 0.0)
            measured = (objective(x, atoms2, z2, bias, LAM) - before) * len(x)
            assert float(change[e, k]) == pytest.approx(measured, rel=1e-7, abs=1e-12)
            assert float(change[e, k]) < 0


def test_known_lam_needs_one_look_at_the_audit_tokens(planned):
    x, atoms, z, bias, plan = planned
    assert not plan.needs_audit_tokens
    before = plan.result()
    plan.update(x, z, held_out=torch.zeros(len(x), dtype=torch.bool))  # audit tokens are ignored
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
