"""The conditions, certificates and engine against brute force and the exact objective."""
from __future__ import annotations

import gc
import math
import subprocess
import sys

import pytest
import torch

from opt_hooks.engine import AuditOptions, LayerAudit
from opt_hooks.theory.c1_floor import FloorCertificates, c1_floor
from opt_hooks.theory.c2_pairs import PairCertificates, c2_pairs
from opt_hooks.theory.c3_decoder import DecoderCertificates, c3_decoder
from opt_hooks.theory.c4_codes import CodeCertificates, c4_codes
from opt_hooks.theory.c5_bias import BiasCertificate, c5_bias
from opt_hooks.theory.c6_spare import SpareCertificate, c6_spare
from opt_hooks.theory.objective import objective, residuals
from opt_hooks.theory.reference import fit_dictionary
from opt_hooks.theory.stats import LayerStats, TokenBatch
from planted import optimal_codes_and_bias, planted_hierarchy


@pytest.fixture(scope="module")
def hierarchy():
    planted = planted_hierarchy()
    z, bias = optimal_codes_and_bias(planted.x, planted.atoms, planted.lam)
    return planted, z, bias


@pytest.fixture(scope="module")
def learned():
    planted = planted_hierarchy()
    atoms, z, bias = fit_dictionary(planted.x, 6, planted.lam, seed=1)
    return planted, atoms, z, bias


def run_engine(x, atoms, z, bias, lam, held=None, **options):
    audit = LayerAudit(atoms, bias, lam=lam, options=AuditOptions(**options))
    keep = torch.ones(len(x), dtype=torch.bool) if held is None else ~held
    audit.update(x[keep], z[keep])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    return plan, plan.result()


def exact_change(family, k, step, x, atoms, z, bias, lam):
    """Apply certificate k of a family at `step` to full tensors and recompute L: the brute force."""
    r = residuals(x, atoms, z, bias)
    family.step = torch.full((len(family),), float(step), dtype=torch.float64)
    atoms2, z2, bias2 = family.apply(k, atoms, z, bias, r, lam)
    assert (z2 >= 0).all()
    return objective(x, atoms2, z2, bias2, lam) - objective(x, atoms, z, bias, lam)


def g4_parts(z, q, lam):
    """Brute force: (sum over active of |2q - lam|, sum over inactive of (2q - lam)_+) per feature."""
    excess = (2 * q - lam).double()
    active = z > 0
    return torch.where(active, excess.abs(), 0).sum(0), torch.where(active, 0, excess.clamp(min=0)).sum(0)


def closed_form_change(family, x, atoms, z, bias, lam):
    """The family's per-token changes on these tokens at its step, summed, per token."""
    return family.held_out(TokenBatch(x, z, atoms, bias), lam).sum / len(x)


# -- C2 on a planted strict hierarchy ----------------------------------------------------


def test_planted_hierarchy_flags_exactly_parent_child(hierarchy):
    planted, z, bias = hierarchy
    stats = LayerStats(planted.atoms, bias)
    stats.update(planted.x, z)
    pairs = c2_pairs(stats.compute(), planted.atoms)
    assert list(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.kind.tolist())) == [(0, 1, 1)]
    assert float(pairs.bound[0]) == 0.0  # strict hierarchy: the child never fires alone
    mu1 = float(z[:, 1].mean())
    rho = float(planted.atoms[0] @ planted.atoms[1])
    assert float(pairs.threshold[0]) == pytest.approx((1 - rho) * mu1, rel=1e-12)


def test_hierarchy_certificate_matches_prediction_at_eps_1e_3(hierarchy):
    planted, z, bias = hierarchy
    x, atoms, lam = planted.x, planted.atoms, planted.lam
    rho = float(atoms[0] @ atoms[1])
    family = PairCertificates(
        torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([rho], dtype=torch.float64),
    )
    measured = exact_change(family, 0, 1e-3, x, atoms, z, bias, lam)
    predicted = -1e-3 * lam * (1 - rho) * float(z[:, 1].mean())
    assert measured < 0
    assert measured == pytest.approx(predicted, rel=0.02)
    change = closed_form_change(family, x, atoms, z, bias, lam)
    assert float(change[0]) == pytest.approx(measured, rel=1e-9, abs=1e-15)
    stats = LayerStats(atoms, bias)
    stats.update(x, z)
    _, first = family.audit_change(stats.compute(), lam, family.step)
    assert float(first[0]) / len(x) == pytest.approx(predicted, rel=1e-12)


def test_engine_certifies_the_hierarchy_on_held_out_tokens(hierarchy):
    planted, z, bias = hierarchy
    held = torch.arange(len(z)) % 5 == 0
    _, layer = run_engine(planted.x, planted.atoms, z, bias, planted.lam, held=held)
    c2 = [(p.i, p.j, p.kind) for p in layer.pairs]
    assert c2 == [(0, 1, "hierarchy")]
    pair = layer.pairs[0]
    assert pair.tier == "certified" and pair.certificate.held_out < 0 and pair.certificate.count_p_value < 1e-10
    assert pair.co_count == pair.count_j and pair.p_j_without_i_upper == pytest.approx(3 / pair.count_j)
    assert {0, 1} <= set(layer.flagged())
    assert "C2" in layer.feature(1).conditions


# -- a jointly learned local optimum -----------------------------------------------------


def test_learned_optimum_satisfies_every_condition(learned):
    planted, atoms, z, bias = learned
    stats = LayerStats(atoms, bias)
    stats.update(planted.x, z)
    computed = stats.compute()
    assert not c1_floor(computed).violated.any()
    assert len(c2_pairs(computed, atoms).i) == 0
    assert float(c3_decoder(computed, atoms).size.max()) < 1e-6
    assert c5_bias(computed).size < 1e-6
    r = residuals(planted.x, atoms, z, bias)
    q = r @ atoms.T
    on, off = g4_parts(z, q, planted.lam)
    code = c4_codes(on, off, (z > 0).sum(0), len(z), planted.lam)
    assert float(code.size.max()) < 1e-6


def test_engine_reports_learned_optimum_clean(learned):
    planted, atoms, z, bias = learned
    # every token audited: the dictionary is optimal for exactly these tokens
    _, layer = run_engine(planted.x, atoms, z, bias, planted.lam)
    assert layer.pairs == []
    assert all(not {"C1", "C2", "C3", "C5"} & set(f.conditions) for f in layer.features)
    assert layer.layer_conditions["C5"]["tier"] == "satisfied"


# -- each condition: a violating case lowered by its certificate, a satisfied case not flagged


def test_c1_dense_feature(hierarchy):
    planted, z, bias = hierarchy
    x, atoms, lam = planted.x, planted.atoms, planted.lam
    z_dense = z.clone()
    z_dense[:, 3] += 0.05  # feature 3 never switches off
    x_dense = x + 0.05 * atoms[3]
    stats = LayerStats(atoms, bias)
    stats.update(x_dense, z_dense)
    check = c1_floor(stats.compute())
    assert check.violated.tolist() == [False, False, False, True, False, False]
    family = FloorCertificates(torch.tensor([3]), check.floor[[3]])
    measured = exact_change(family, 0, float(check.floor[3]), x_dense, atoms, z_dense, bias, lam)
    assert measured == pytest.approx(-lam * float(check.floor[3]), rel=1e-9)
    assert float(closed_form_change(family, x_dense, atoms, z_dense, bias, lam)[0]) == pytest.approx(measured, rel=1e-9)
    assert not c1_floor(_stats(x, atoms, z, bias)).violated.any()


def test_c3_rotated_atom(learned):
    planted, atoms, z, bias = learned
    x, lam = planted.x, planted.lam
    tilted = atoms.clone()
    tilted[2] = tilted[2] + 0.2 * tilted[4]
    tilted[2] = tilted[2] / tilted[2].norm()
    check = c3_decoder(_stats(x, tilted, z, bias), tilted)
    assert float(check.size[2]) > 1e-2
    family = DecoderCertificates(torch.tensor([2]), tilted[[2]], check.gradient[[2]] / check.norm[2])
    measured = exact_change(family, 0, 1e-3, x, tilted, z, bias, lam)
    assert measured < 0 and measured == pytest.approx(-2e-3 * float(check.norm[2]), rel=0.05)
    assert float(closed_form_change(family, x, tilted, z, bias, lam)[0]) == pytest.approx(measured, rel=1e-8)
    # the line search turns the atom back: the rotation it finds is the planted one
    stats = _stats(x, tilted, z, bias)
    theta = float(family.line_search(stats, lam)[0])
    assert theta == pytest.approx(math.atan(0.2), rel=0.05)
    assert float(c3_decoder(_stats(x, atoms, z, bias), atoms).size.max()) < 1e-6


def test_c4_shrunk_codes(learned):
    planted, atoms, z, bias = learned
    x, lam = planted.x, planted.lam
    shrunk = z * 0.8  # amortisation-style shrinkage: active atoms see more than lam/2
    r = residuals(x, atoms, shrunk, bias)
    family = CodeCertificates(torch.arange(6), atoms)
    on, off = g4_parts(shrunk, r @ atoms.T, lam)
    code = c4_codes(on, off, (shrunk > 0).sum(0), len(x), lam)
    assert float(code.size.min()) > 1e-2
    share = (shrunk > 0).double().mean(0)  # G4 / (lam * active share): mean |2 <d, r> / lam - 1| per active token
    torch.testing.assert_close(code.gain, (on + off) / len(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(code.size, (on + off) / len(x) / (lam * share), rtol=1e-12, atol=0)
    for k in range(6):  # growing the codes back lowers L, to first order by t sum_n z (lam - 2 q)
        measured = exact_change(family, k, 1e-3, x, atoms, shrunk, bias, lam)
        predicted = 1e-3 * float((shrunk[:, k] * (lam - 2 * r @ atoms[k])).mean())
        assert measured < 0 and measured == pytest.approx(predicted, rel=0.05)
    assert float(closed_form_change(family, x, atoms, shrunk, bias, lam)[1]) == pytest.approx(
        exact_change(family, 1, 1e-3, x, atoms, shrunk, bias, lam), rel=1e-8)
    # the line search grows every feature's codes back, each by about 0.8 (1 + t) = 1 (the others
    # stay shrunk, so not exactly)
    t = family.line_search(_stats(x, atoms, shrunk, bias), lam)
    assert bool(((t > 0.15) & (t < 0.35)).all()), t


def test_c5_shifted_bias(learned):
    planted, atoms, z, bias = learned
    x, lam = planted.x, planted.lam
    shifted = bias + 0.1
    check = c5_bias(_stats(x, atoms, z, shifted))
    assert check.size > 1e-2
    family = BiasCertificate(check.mean_residual / check.norm)
    measured = exact_change(family, 0, 1e-3 * check.norm, x, atoms, z, shifted, lam)
    assert measured == pytest.approx(-(2e-3 - 1e-6) * check.norm**2, rel=1e-9)
    assert float(family.line_search(_stats(x, atoms, z, shifted), lam)[0]) == pytest.approx(check.norm, rel=1e-12)
    assert c5_bias(_stats(x, atoms, z, bias)).size < 1e-6


def test_c6_dead_feature_with_large_residual(learned):
    planted, atoms, z, bias = learned
    x, lam = planted.x, planted.lam
    z_dead = z.clone()
    z_dead[:, 5] = 0  # feature 5 killed: its tokens now carry large residuals
    stats = _stats(x, atoms, z_dead, bias)
    check = c6_spare(stats, lam)
    assert check.violated and check.dead.tolist() == [False] * 5 + [True]
    family = SpareCertificate.best_of(stats, 5, atoms[5], lam)
    family.step = family.line_search(stats, lam)
    measured = exact_change(family, 0, float(family.step[0]), x, atoms, z_dead, bias, lam)
    assert measured < 0
    assert float(closed_form_change(family, x, atoms, z_dead, bias, lam)[0]) == pytest.approx(measured, rel=1e-8)
    # lam so large that lam/2 exceeds every residual: a dead feature is then allowed
    assert not c6_spare(stats, 4 * check.max_rnorm).violated


def test_engine_marks_c6_and_dead_features(learned):
    planted, atoms, z, bias = learned
    z_dead = z.clone()
    z_dead[:, 5] = 0
    _, layer = run_engine(planted.x, atoms, z_dead, bias, planted.lam, held=torch.arange(len(z)) % 4 == 0)
    assert layer.dead_features == [5]
    c6 = layer.layer_conditions["C6"]
    assert c6["tier"] == "certified" and c6["resampled"] == 5 and c6["dead"] == [5]
    assert c6["certificate"].gain > 0 and c6["certificate"].p_value < 1e-3
    assert layer.feature(5).conditions == []  # dead features are one layer finding, not rows


def test_lam_is_estimated_when_unknown(learned):
    planted, atoms, z, bias = learned
    audit = LayerAudit(atoms, bias, lam=None)
    audit.update(planted.x, z)
    plan = audit.plan()
    assert plan.lam_estimated
    assert plan.lam == pytest.approx(planted.lam, rel=1e-6)  # at an optimum every active <d,r> is lam/2


# -- streaming: any split, any merge order ------------------------------------------------


def _stats(x, atoms, z, bias):
    stats = LayerStats(atoms, bias)
    stats.update(x, z)
    return stats.compute()


def test_no_held_out_tokens_no_certificate(hierarchy):
    planted, z, bias = hierarchy
    plan, layer = run_engine(planted.x, planted.atoms, z, bias, planted.lam)
    pair = layer.pairs[0]
    assert pair.certificate.held_out is None and pair.certificate.measured < 0  # no held-out tokens given
    assert pair.tier == "violated" and "no held-out tokens" in pair.certificate.reason
    assert layer.tier_counts()["certified"] == 0
    assert any("no certificate can be certified" in note for note in layer.notes)


def test_theory_modules_import_neither_library():
    code = (
        "import importlib, pkgutil, sys, opt_hooks.theory, opt_hooks.engine, opt_hooks.records\n"
        "modules = [m.name for m in pkgutil.iter_modules(opt_hooks.theory.__path__)]\n"
        "assert len(modules) >= 15, modules\n"
        "for name in modules: importlib.import_module('opt_hooks.theory.' + name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'sae_lens')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_statistics_update_has_no_python_loop_over_tokens():
    """The number of Python-level calls in one update must not grow with the batch size."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(32, 8, generator=gen), dim=1)
    bias = torch.zeros(8)

    def calls(n):
        gc.collect()
        x = torch.randn(n, 8, generator=gen)
        z = torch.relu(torch.randn(n, 32, generator=gen))
        stats = LayerStats(atoms, bias)
        plan_audit = LayerAudit(atoms, bias, lam=0.1)
        plan_audit.update(x, z)
        plan = plan_audit.plan()
        counter = [0]

        def profile(frame, event, arg):
            if event == "call":
                counter[0] += 1

        gc.disable()  # a collection during the count would add __del__ calls of unrelated objects
        sys.setprofile(profile)
        try:
            stats.update(x, z)
            plan.update(x, z, held_out=torch.arange(n) % 3 == 0)
        finally:
            sys.setprofile(None)
            gc.enable()
        return counter[0]

    calls(50)  # the first call fills lazy caches (torch dispatch, imports) once
    assert calls(2000) == calls(50)


def test_certificates_never_make_codes_negative_or_nan(hierarchy):
    planted, z, bias = hierarchy
    _, layer = run_engine(planted.x, planted.atoms, z, bias, planted.lam)
    for f in layer.features:
        for check in f.certificates.values():
            assert math.isfinite(check.measured) and math.isfinite(check.predicted) and math.isfinite(check.step)
