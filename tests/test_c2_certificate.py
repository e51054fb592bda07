"""C2's certificate (THEORY.md section 2, `PairCertificates`) against the rule as documented.

The module's audit change, its held-out change and `apply` share `shifted_bound`, so comparing
them with each other cannot see a wrong T_eps. These tests check them against an independent
float64 implementation of the documented rule and against the property T_eps exists for: on
every audit token where i is off, z_i is never clipped, so the reconstruction there moves along
the old d_j only (its component along d_i, alpha, is exactly 0).

The planted pairs have a bound T > 0 and rho > 0, so c = (1 + s eps rho) / nu differs from 1 at
every step of the grid and T_eps = T max(1, c) (hierarchy) or T min(1, c) (complementary)
differs from T: a pair with T = 0 (the strict hierarchy of tests/test_theory.py) cannot tell.
"""
from __future__ import annotations

import math

import pytest
import torch

from opt_hooks.theory.c2_pairs import PAIR_STEPS, PairCertificates, c2_pairs
from opt_hooks.theory.objective import objective, residuals
from opt_hooks.theory.pairs import COMPLEMENTARY, HIERARCHY
from opt_hooks.theory.stats import LayerStats, TokenBatch

LAM = 0.2
N, D = 1200, 8
WEAK = 0.1  # M: the child's weak firings without its parent
FLOOR = 0.8  # m: the complementary latent's smallest value where its partner is off
RHO = 0.5


def planted_pairs(seed: int = 0):
    """Four latents: 1 a child of 0 that also fires weakly (WEAK) without it, so M = WEAK > 0;
    3 on (at least FLOOR) wherever 2 is off, so m = FLOOR > 0; both pairs at rho = RHO."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0].T
    atoms = torch.stack([basis[0], RHO * basis[0] + math.sqrt(1 - RHO**2) * basis[1],
                         basis[2], RHO * basis[2] + math.sqrt(1 - RHO**2) * basis[3]])
    size = lambda: 1 + 0.2 * torch.rand(N, generator=gen, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(N, 4, dtype=torch.float64)
    parent = torch.rand(N, generator=gen) < 0.6
    z[parent, 0] = size()[parent]
    child = parent & (torch.rand(N, generator=gen) < 0.8)
    z[child, 1] = size()[child]
    weak = ~parent & (torch.rand(N, generator=gen) < 0.1)
    z[weak, 1] = WEAK
    on_2 = torch.rand(N, generator=gen) < 0.3
    z[on_2, 2] = size()[on_2]
    z[~on_2, 3] = FLOOR + 0.4 * torch.rand(N, generator=gen, dtype=torch.float64)[~on_2]
    z[~on_2 & (torch.rand(N, generator=gen) < 0.2), 3] = FLOOR  # the minimum is reached, often
    also = on_2 & (torch.rand(N, generator=gen) < 0.3)
    z[also, 3] = size()[also]
    bias = 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)
    x = bias + z @ atoms + 0.05 * torch.randn(N, D, generator=gen, dtype=torch.float64)
    return atoms, bias, x, z


@pytest.fixture(scope="module")
def world():
    atoms, bias, x, z = planted_pairs()
    stats = LayerStats(atoms, bias)
    stats.update(x, z)
    return atoms, bias, x, z, stats.compute()


def certificate(stats, atoms, i, j, kind, bound):
    """The planted pair as C2 flags it (checked: kind and bound T are the planted ones)."""
    found = c2_pairs(stats, atoms)
    k = [(a, b) for a, b in zip(found.i.tolist(), found.j.tolist())].index((i, j))
    assert int(found.kind[k]) == kind and float(found.bound[k]) == bound
    return PairCertificates(found.i[k:k + 1], found.j[k:k + 1], found.kind[k:k + 1], found.bound[k:k + 1],
                            found.rho[k:k + 1])


def documented_rule(atoms, z, bias, i, j, s, bound, eps):
    """THEORY.md's C2 step with the module docstring's exact-reconstruction factor c and shifted
    bound T_eps, written out from the docstring in float64 (no code of the module)."""
    rho = float(atoms[i] @ atoms[j])
    nu = math.sqrt(1 + eps**2 * (1 - rho**2))
    c = (1 + s * eps * rho) / nu
    t_eps = bound * (max(1.0, c) if s > 0 else min(1.0, c))
    atoms2, z2 = atoms.clone(), z.clone()
    direction = atoms[j] + s * eps * (atoms[i] - rho * atoms[j])
    atoms2[j] = direction / direction.norm()
    z2[:, i] = (z[:, i] + s * eps * (t_eps - c * z[:, j])).clamp(min=0)
    z2[:, j] = z[:, j] * (1 + s * eps * rho)
    return atoms2, z2, bias - s * eps * t_eps * atoms[i], c


PLANTED = [pytest.param(0, 1, HIERARCHY, WEAK, id="hierarchy"),
           pytest.param(2, 3, COMPLEMENTARY, FLOOR, id="complementary")]


@pytest.mark.parametrize("i, j, kind, bound", PLANTED)
def test_no_clip_where_i_is_off_at_every_step(world, i, j, kind, bound):
    """On the audit tokens where i is off, z_j <= M (resp. >= m): the step never clips z_i there,
    so the reconstruction moves along the old d_j only (alpha = 0), at every step of the grid."""
    atoms, bias, x, z, stats = world
    family = certificate(stats, atoms, i, j, kind, bound)
    r = residuals(x, atoms, z, bias)
    off = z[:, i] == 0
    at_bound = off & (z[:, j] == bound)
    assert int(at_bound.sum()) >= 20  # tokens where a bound of T instead of T_eps would clip
    for eps in PAIR_STEPS:
        family.step = torch.full((1,), eps, dtype=torch.float64)
        atoms2, z2, bias2 = family.apply(0, atoms, z, bias, r, LAM)
        change = (bias2 + z2 @ atoms2 - bias - z @ atoms)[off]
        along_j = (change @ atoms[j])[:, None] * atoms[j]
        # the change lies in span(d_i, d_j); a nonzero d_i part leaves a part orthogonal to d_j
        assert float((change - along_j).norm(dim=1).max()) < 1e-12, eps


@pytest.mark.parametrize("i, j, kind, bound", PLANTED)
def test_exact_change_is_the_documented_rule_recomputed(world, i, j, kind, bound):
    """The audit change (from the codes and stored projections), the held-out change (dense
    codes) and `apply` all equal L recomputed in float64 after the documented rule, at every
    step of the grid; the steps where c != 1 make T_eps != T, and a wrong T_eps moves L there."""
    atoms, bias, x, z, stats = world
    family = certificate(stats, atoms, i, j, kind, bound)
    before = objective(x, atoms, z, bias, LAM)
    r = residuals(x, atoms, z, bias)
    grid = torch.tensor(PAIR_STEPS, dtype=torch.float64)
    audit, _ = family.audit_change(stats, LAM, grid[:, None])
    for e, eps in enumerate(PAIR_STEPS):
        atoms2, z2, bias2, c = documented_rule(atoms, z, bias, i, j, kind, bound, eps)
        assert c != pytest.approx(1.0, abs=1e-6)  # T_eps != T: the step tells a wrong T_eps apart
        expected = objective(x, atoms2, z2, bias2, LAM) - before
        assert float(audit[e, 0]) / N == pytest.approx(expected, rel=1e-9, abs=1e-13), eps
        family.step = torch.full((1,), eps, dtype=torch.float64)
        held = family.held_out(TokenBatch(x, z, atoms, bias), LAM).sum
        assert float(held[0]) / N == pytest.approx(expected, rel=1e-9, abs=1e-13), eps
        applied = objective(x, *family.apply(0, atoms, z, bias, r, LAM), LAM) - before
        assert applied == pytest.approx(expected, rel=1e-9, abs=1e-13), eps
