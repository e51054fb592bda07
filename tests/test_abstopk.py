"""sae_lens' AbsTopK SAEs (`AbsTopKTrainingSAE`, the `AbsTopKSAE` it saves) audited end to end: their
codes keep their sign, and the audit is the nonnegative problem on the doubled dictionary (d_i, -d_i)
(THEORY.md section 9). `oh.audit_activations`, `oh.audit` on a tiny HookedTransformer (the SAE beside the
model and spliced into a HookedSAETransformer), the CLI and `compare` report the statistics of a float64
brute force written on the signed problem; the tied certificates (C3's atom turn, the decoder gap's step,
C2's and C6's atom moves) change the decoder row for both signs, their gains equal a recompute of the
signed SAE; rows name the latent and its sign; the repair refuses the one-sign changes.

The SAEs are trained by sae_lens' own training step (tests/sae_training.py, 30 steps).
"""
from __future__ import annotations

import json
import math

import jsonschema
import pytest
import sae_lens
import torch
from torch import Tensor

import opt_hooks as oh
from opt_hooks import cli
from opt_hooks.adapters.sae import SAEView
from opt_hooks.adapters.sae_edit import NotExpressible, SAEEdit
from opt_hooks.comparison import COMPARE_JSON
from opt_hooks.engine import LayerAudit
from opt_hooks.repair_run import sae_objective
from opt_hooks.report import REPORT_HTML, load_schema, render_summary
from opt_hooks.theory.c2_pairs import PairCertificates
from opt_hooks.theory.c6_spare import SpareCertificate
from opt_hooks.theory.stats import TokenBatch
from tests.sae_training import assert_layers_match, to_inference, train_sae
from tests.test_api import (
    HELD_OUT, HOOK1, Batch, Expected, assert_matches_brute_force, audit_batches, audit_tokens, brute_force, cached,
    held_out_windows, random_tokens, row_batches,
)
from tests.test_cli import report_on_tiny_model

SCOPE = "L1 surrogate (abstopk)"
LAM = 0.05


def signed_world(n: int = 2000, d: int = 16, seed: int = 0) -> Tensor:
    """x = codes @ atoms + 0.3 in float64: features 0-2 fire with either sign (each on 25% of the
    tokens), feature 3 is a positive parent, 4 its child (on only with it), 5 positive and alone."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(6, d, generator=gen, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    size = lambda on: 1 + 0.2 * torch.rand(int(on.sum()), generator=gen, dtype=torch.float64)  # noqa: E731
    amp = torch.zeros(n, 6, dtype=torch.float64)
    for f in range(3):
        on = torch.rand(n, generator=gen) < 0.25
        sign = torch.where(torch.rand(int(on.sum()), generator=gen) < 0.5, -1.0, 1.0).double()
        amp[on, f] = sign * size(on)
    parent = torch.rand(n, generator=gen) < 0.2
    child = parent & (torch.rand(n, generator=gen) < 0.5)
    alone = torch.rand(n, generator=gen) < 0.15
    for f, on in ((3, parent), (4, child), (5, alone)):
        amp[on, f] = size(on)
    return amp @ atoms + 0.3


WORLD = signed_world()


@pytest.fixture(scope="module")
def world_sae() -> sae_lens.AbsTopKTrainingSAE:
    return train_sae("abstopk", WORLD, hook_name="sae", d_sae=12)


class SignedExpected(Expected):
    """test_api's float64 brute force of an AbsTopK SAE, whose codes it doubles itself (z = [z+, z-] on
    the atoms [d; -d]), with what is particular to the signed problem written on the signed codes
    z+ - z-: C3's tied gradient, C2's pairs of the tied problem, the dead latents."""

    @property
    def k(self) -> int:
        return self.atoms.shape[0] // 2

    @property
    def signed(self) -> Tensor:
        return self.z[:, : self.k] - self.z[:, self.k:]

    @property
    def unit_atoms(self) -> Tensor:
        return self.atoms[: self.k]

    def tied_gradient(self) -> Tensor:
        """(K, d) (1/N) sum_n z_in (r_n - <d_i, r_n> d_i), z signed: one gradient per decoder row."""
        g = self.signed.T @ self.r / self.n
        return g - (g * self.unit_atoms).sum(-1, keepdim=True) * self.unit_atoms

    def c3_size(self) -> Tensor:
        scale = (self.signed.abs() * self.r.norm(dim=-1, keepdim=True)).sum(0) / self.n
        size = torch.where(scale > 0, self.tied_gradient().norm(dim=-1) / scale, 0.0)
        return torch.cat([size, size])  # the latent's, on the rows of both signs

    def _partner(self, a: int) -> int:
        return (a + self.k) % (2 * self.k)

    def pairs(self, rel_tol: float = 1e-6) -> dict[tuple[int, int], tuple[str, float]]:
        """C2 of the doubled dictionary, less each atom's pair with its opposite and the pairs whose j
        (the atom the certificate turns, with its opposite) has its other sign active."""
        on = (self.z > 0).any(0)
        return {(i, j): v for (i, j), v in super().pairs(rel_tol).items()
                if j != self._partner(i) and not on[self._partner(j)]}

    def untied_pairs(self) -> int:
        on = (self.z > 0).any(0)
        return sum(1 for i, j in super().pairs() if j != self._partner(i) and on[self._partner(j)])

    def dead_features(self) -> list[int]:
        return torch.nonzero((self.signed == 0).all(0)).flatten().tolist()


def signed_brute_force(sae, batches) -> SignedExpected:
    expected = brute_force(sae, batches)  # doubles an AbsTopK SAE's codes and atoms itself
    return SignedExpected(expected.z, expected.r, expected.token, expected.atoms)


def held_out_rows(acts: Tensor) -> list[Batch]:
    """The held-out rows of `audit_activations` (row_batches keeps the audit rows)."""
    held = held_out_windows(len(acts), HELD_OUT)
    return [Batch(acts, torch.arange(len(acts)), held)]


@torch.no_grad()
def own_objective(sae, acts: Tensor, lam: float | None) -> Tensor:
    """Per token: the SAE's own ||decode(encode(x)) - x||^2 plus lam sum_i |z_i| (z = f ||W_dec[i]||, or f
    where it decodes f / ||W_dec|| times W_dec)."""
    codes = sae.encode(acts)
    units = 1.0 if sae.cfg.rescale_acts_by_decoder_norm else sae.W_dec.norm(dim=1)
    error = ((sae.decode(codes) - acts) ** 2).sum(-1).double()
    return error + (lam or 0.0) * (codes * units).abs().sum(-1).double()


def assert_signed_rows(layer, expected: SignedExpected) -> None:
    """Rows name the SAE's latent and the sign: row k < K latent k "+", row K + k latent k "-"; a note
    counts the C2 violations left out because their moved latent fires with both signs."""
    k = expected.k
    assert (layer.signed, layer.d_sae, len(layer.features)) == (True, k, 2 * k)
    assert [(f.id, f.sign) for f in layer.features] == [(a % k, "+" if a < k else "-") for a in range(2 * k)]
    assert [f.label for f in layer.features[k - 1:k + 1]] == [f"{k - 1}+", "0−"]
    left_out = expected.untied_pairs()
    assert any(f"{left_out} C2 violation(s) left out" in note for note in layer.notes) is (left_out > 0)


# ---- the codes and the view --------------------------------------------------------------------


def test_signed_codes_and_the_doubled_view_are_exact(world_sae, tmp_path):
    """AbsTopK keeps the k pre-activations of largest magnitude with their sign: codes of both signs. The
    view is the doubled dictionary [d; -d] with codes [relu(z), relu(-z)], whose x - b - z D is the SAE's
    own error, for the training SAE and the inference SAE sae_lens saves."""
    inference = to_inference(world_sae, tmp_path)
    assert type(inference) is sae_lens.AbsTopKSAE
    for sae in (world_sae, inference):
        view = SAEView(sae)
        x, z, w = view.encode(WORLD)
        with torch.no_grad():
            f = sae.encode(WORLD)
            error = WORLD - sae.decode(f)
        assert int((f < 0).sum()) > 100 and int((f > 0).sum()) > 100, "codes of both signs"
        assert bool(((f != 0).sum(-1) == sae.cfg.k).all())
        units = 1.0 if sae.cfg.rescale_acts_by_decoder_norm else sae.W_dec.norm(dim=1)
        signed = f * units
        unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
        assert w is None and torch.equal(x, WORLD)
        assert torch.equal(z, torch.cat([signed.clamp(min=0), (-signed).clamp(min=0)], 1))
        torch.testing.assert_close(view.atoms(), torch.cat([unit, -unit]), rtol=0, atol=1e-15)
        torch.testing.assert_close(x - view.bias() - z @ view.atoms(), error, rtol=0, atol=1e-12)
        assert (view.scope, view.lam, view.signed) == (SCOPE, None, True)
        assert any("signed codes" in note for note in view.notes)
    assert world_sae.cfg.rescale_acts_by_decoder_norm and inference.cfg.rescale_acts_by_decoder_norm


# ---- oh.audit_activations -----------------------------------------------------------------------


def test_audit_activations_equals_the_signed_brute_force(world_sae):
    """Every count, extreme and sum against the float64 brute force of the signed problem (lam given: C4
    and C6 too), the rows named by latent and sign, and the held-out L the SAE's own objective. Without
    lam it is estimated (THEORY.md 3.7, as for TopK) or C4, C6 and the code gap are skipped."""
    expected = signed_brute_force(world_sae, row_batches(WORLD, len(WORLD)))
    held = WORLD[held_out_windows(len(WORLD), HELD_OUT)]
    for lam in (LAM, None):
        layer = oh.audit_activations(world_sae, WORLD, held_out=HELD_OUT, lam=lam).layers["sae"]
        assert (layer.scope, layer.architecture) == (SCOPE, "abstopk")
        assert_signed_rows(layer, expected)
        if lam is not None:
            assert (layer.lam, layer.lam_estimated) == (LAM, False)
            assert_matches_brute_force(layer, expected)
        elif expected.lam_estimate() > 0:
            assert layer.lam_estimated and layer.lam == pytest.approx(expected.lam_estimate(), rel=1e-9)
        else:
            assert layer.lam is None and {"C4", "C6", "codes"} <= set(layer.skipped)
        own = own_objective(world_sae, held, layer.lam)
        assert layer.objective["n_tokens"] == len(held)
        assert layer.objective["L"] == pytest.approx(float(own.mean()), rel=1e-9)
        assert layer.objective["l0"] == world_sae.cfg.k
    assert expected.untied_pairs() > 0 and expected.pairs(), "the world has pairs of both kinds"
    assert all(a.i != a.j for a in layer.antipodal)  # a latent's two signs are no antipodal pair


def test_tied_certificates_turn_the_decoder_row_for_both_signs(world_sae):
    """C3's turn of latent i moves d_i and -d_i (one decoder row) along the tied gradient, the signed
    codes' (1/N) sum z_in (r_n - <d_i, r_n> d_i); its audit and held-out changes are the recomputed
    changes of the signed SAE with the turned row, on the tokens of both signs. The decoder gap's step
    moves every row along its tied gradient, its gain the recomputed one."""
    layer = oh.audit_activations(world_sae, WORLD, held_out=HELD_OUT, lam=LAM).layers["sae"]
    audit = signed_brute_force(world_sae, row_batches(WORLD, len(WORLD)))
    held = signed_brute_force(world_sae, held_out_rows(WORLD))
    gradient, atoms = audit.tied_gradient(), audit.unit_atoms

    def turned(expected: SignedExpected, i: int, theta: float) -> Tensor:
        new = math.cos(theta) * atoms[i] + math.sin(theta) * gradient[i] / gradient[i].norm()
        moved = expected.r - expected.signed[:, i:i + 1] * (new - atoms[i])
        return (moved**2).sum(-1) - (expected.r**2).sum(-1)

    checks = {f.id: f.certificates["C3"] for f in layer.features if "C3" in f.certificates}
    both = [i for i in checks if bool((audit.signed[:, i] > 0).any() and (audit.signed[:, i] < 0).any())]
    assert both, "no tied certificate of a latent firing with both signs: the test would not see the tie"
    for i, check in checks.items():
        assert check.measured == pytest.approx(float(turned(audit, i, check.step).sum()) / audit.n, rel=1e-9)
        assert check.held_out == pytest.approx(float(turned(held, i, check.step).mean()), rel=1e-9)
    assert layer.features[both[0]].certificates["C3"] is layer.features[both[0] + audit.k].certificates["C3"]

    t = layer.gaps["decoder"]["step"]
    growth = (atoms + t * gradient).norm(dim=1)  # each row d_i + t g_i, its code scaled by the norm
    moved = held.r - t * held.signed @ gradient
    change = (moved**2).sum(-1) - (held.r**2).sum(-1) + LAM * (held.signed.abs() * (growth - 1)).sum(-1)
    assert t > 0 and layer.gaps["decoder"]["gain"] == pytest.approx(-float(change.mean()), rel=1e-9)


def test_c2_and_c6_certificates_move_both_signs_of_a_row():
    """On tokens where the moved latent's other sign fires (held-out tokens may have them), C2's
    absorption step and C6's resampled atom change that sign's reconstruction too: their per-token
    changes are the recomputed changes of the signed SAE, whose row serves both signs."""
    gen = torch.Generator().manual_seed(3)
    k, d, n, lam = 4, 6, 300, 0.1
    atoms = torch.randn(k, d, generator=gen, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    signed = torch.randn(n, k, generator=gen, dtype=torch.float64) * (torch.rand(n, k, generator=gen) < 0.5)
    bias = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    x = signed @ atoms + bias + 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    doubled = lambda z: torch.cat([z.clamp(min=0), (-z).clamp(min=0)], 1)  # noqa: E731
    tokens = TokenBatch(x, doubled(signed), torch.cat([atoms, -atoms]), bias)

    def loss(z: Tensor, rows: Tensor, b: Tensor, l1: Tensor) -> Tensor:
        return ((x - b - z @ rows) ** 2).sum() + lam * l1.sum()

    before = loss(signed, atoms, bias, doubled(signed).sum(-1))
    assert bool((signed[:, 1] < 0).any()), "latent 1 fires with its other sign"

    # C2, hierarchy (0+, 1+): d_1 turns towards d_0 with its opposite; z_0+ and z_1+ follow the rule, z_1- stays
    eps, bound, rho = 0.1, 0.2, float(atoms[0] @ atoms[1])
    f64 = dict(dtype=torch.float64)
    pair = PairCertificates(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([bound], **f64),
                            torch.tensor([rho], **f64), torch.tensor([1 + k]))
    pair.step = torch.tensor([eps], dtype=torch.float64)
    c = (1 + eps * rho) / math.sqrt(1 + eps**2 * (1 - rho**2))
    t_eps = bound * max(1.0, c)
    plus, minus = signed.clamp(min=0), (-signed).clamp(min=0)
    plus[:, 0] = (plus[:, 0] + eps * (t_eps - c * plus[:, 1])).clamp(min=0)
    plus[:, 1] = plus[:, 1] * (1 + eps * rho)
    rows = atoms.clone()
    rows[1] = (1 - eps * rho) * atoms[1] + eps * atoms[0]
    rows[1] = rows[1] / rows[1].norm()
    after = loss(plus - minus, rows, bias - eps * t_eps * atoms[0], (plus + minus).sum(-1))
    assert float(pair.held_out(tokens, lam).sum) == pytest.approx(float(after - before), rel=1e-10)

    # C6: latent 2 resampled to the atom a (code c where the rule codes), both signs' old codes replaced
    a = torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    spare = SpareCertificate(2, a, atoms[2], -1.0, partner=2 + k)
    spare.step = torch.tensor([0.5], dtype=torch.float64)
    r = x - bias - signed @ atoms
    new = signed.clone()
    new[:, 2] = 0.5 * (2 * (r @ a) > lam).double()
    rows = atoms.clone()
    rows[2] = a
    after = loss(new, rows, bias, new.abs().sum(-1))
    assert float(spare.held_out(tokens, lam).sum) == pytest.approx(float(after - before), rel=1e-10)


def test_a_latents_two_signs_are_one_row_not_an_antipodal_pair():
    """A latent dense in both signs has atoms d_i and -d_i (rho = -1) that never fire together: the pair
    map of the unsigned problem would call them an antipodal pair; for a signed SAE they are one decoder
    row, and neither an antipodal pair nor a C2 pair."""
    gen = torch.Generator().manual_seed(4)
    k, d, n = 4, 8, 400
    atoms = torch.randn(k, d, generator=gen, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    signed = torch.randn(n, k, generator=gen, dtype=torch.float64) * (torch.rand(n, k, generator=gen) < 0.3)
    signed[:, 0] = torch.randn(n, generator=gen, dtype=torch.float64).sign() * (1 + torch.rand(n, generator=gen))
    x = signed @ atoms + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    found = {}
    for is_signed in (False, True):
        audit = LayerAudit(torch.cat([atoms, -atoms]), torch.zeros(d, dtype=torch.float64), lam=LAM,
                              signed=is_signed)
        audit.update(x, torch.cat([signed.clamp(min=0), (-signed).clamp(min=0)], 1))
        plan = audit.plan()
        found[is_signed] = {(a.i, a.j) for a in plan.pair_map.antipodal}
        if is_signed:
            assert not any(j == (i + k) % (2 * k) for i, j in zip(plan.pairs.i.tolist(), plan.pairs.j.tolist()))
    assert (0, k) in found[False] and (0, k) not in found[True]


# ---- oh.audit on a HookedTransformer, beside the model and spliced in ----------------------------


def test_audit_on_a_tiny_model_equals_brute_force(tiny_model_cfg):
    """`oh.audit` on a tiny model's activations equals the signed brute force on the audit windows, and
    an AbsTopK SAE spliced into a HookedSAETransformer (its signed codes read at hook_sae_acts_post) is
    audited as the same SAE beside the model."""
    model = sae_lens.HookedSAETransformer(tiny_model_cfg)
    sae = train_sae("abstopk", cached(model, random_tokens(32, seed=5), HOOK1), hook_name=HOOK1,
                    model_name="tiny-test-model", d_sae=24)
    windows = random_tokens(12, seed=6)
    expected = signed_brute_force(sae, audit_batches(model, windows, HOOK1))
    beside = audit_tokens(model, sae, windows, lam=LAM).layers[HOOK1]
    assert (beside.scope, beside.lam) == (SCOPE, LAM)
    assert_signed_rows(beside, expected)
    assert_matches_brute_force(beside, expected)
    held = cached(model, windows[held_out_windows(len(windows), HELD_OUT)], HOOK1).reshape(-1, 16).double()
    assert beside.objective["L"] == pytest.approx(float(own_objective(sae, held, LAM).mean()), rel=1e-9)

    model.add_sae(sae)
    spliced = audit_tokens(model, sae, windows, lam=LAM).layers[HOOK1]
    model.reset_saes()
    assert_layers_match(spliced, beside)


# ---- the command line, the report and compare -------------------------------------------------


def test_cli_report_and_compare(world_sae, tmp_path, minilm_tokenizer):
    """An AbsTopK SAE folder audited by `opt-hooks report` on a local model folder: report.json is valid
    and names rows by latent and sign, the page and the summary show "k−"; `opt-hooks compare` sets it
    beside an `audit_activations` report of the same SAE."""
    hook = "blocks.0.hook_resid_pre"
    sae = train_sae("abstopk", WORLD, hook_name=hook, d_sae=12)
    sae.save_inference_model(tmp_path / "sae_0")
    out, report = report_on_tiny_model(tmp_path, minilm_tokenizer, "--sae-path", str(tmp_path / "sae_{layer}"),
                                       "--layers", "0")
    jsonschema.Draft202012Validator(load_schema()).validate(report)
    layer = report["layers"][hook]
    assert (layer["architecture"], layer["scope"], layer["signed"], layer["d_sae"]) == ("abstopk", SCOPE, True, 12)
    assert [(f["id"], f["sign"]) for f in layer["features"]] == [(a % 12, "+-"[a // 12]) for a in range(24)]
    assert all(p["sign_i"] in "+-" and p["sign_j"] in "+-" for p in layer["pairs"])
    flagged = [f for f in layer["features"] if f["tier"] != "satisfied" and f["sign"] == "-"]
    assert flagged, "no negative sign flagged: the page would not show one"
    audited = oh.AuditResult.from_dict(report)
    top = [audited.layers[hook].features[row] for row in audited.layers[hook].flagged()]
    labels = [f"{f.id}{'+' if f.sign == '+' else '−'}" for f in top]
    summary, page = render_summary(audited), (out / REPORT_HTML).read_text()
    assert all(f"#{label} " in summary for label in labels[:5])  # the terminal's top features
    assert "of 24 latent signs with a descent" in page
    assert all(f"<h4>feature {label} " in page for f, label in zip(top[:12], labels) if f.top_tokens)

    other = oh.audit_activations({hook: sae}, {hook: WORLD}, held_out=HELD_OUT).save(tmp_path / "acts")
    compared = tmp_path / "cmp"
    assert cli.main(["compare", str(out), str(other), "--out", str(compared)]) == 0
    rows = json.loads((compared / COMPARE_JSON).read_text())["rows"]
    assert [row["hook"] for row in rows] == [hook]
    assert [entry["scope"] for entry in rows[0]["entries"]] == [SCOPE, SCOPE]
    assert rows[0]["entries"][0]["objective"]["L"] == layer["objective"]["L"]


# ---- repair -----------------------------------------------------------------------------------


def test_repair_writes_tied_turns_and_refuses_one_sign_changes(world_sae):
    """A decoder row serves both signs: the tied C3 turns go into W_dec; a floor, a code scale of one sign,
    a planted or merged latent are refused with the reason; the repaired SAE's objective is its own
    encode / decode with |z| in the L1 term."""
    edit = SAEEdit(world_sae)
    ids = torch.tensor([0])
    for change, reason in ((lambda: edit.scale_codes(ids, torch.tensor([0.5])), "one sign"),
                           (lambda: edit.lower_codes(ids, torch.tensor([0.1])), "in magnitude"),
                           (lambda: edit.plant(0, torch.ones(16), 1.0, 0.0, 1.0), "in magnitude"),
                           (lambda: edit.merge(0, 1, 0.9), "in magnitude")):
        with pytest.raises(NotExpressible, match=reason):
            change()
    assert torch.equal(edit.sae.W_dec, world_sae.W_dec)
    codes = SAEView(world_sae).encode(WORLD)[1]
    new_atom = torch.ones(1, 16, dtype=torch.float64)
    edit.turn_atoms(ids, new_atom)
    turned = SAEView(edit.sae)
    torch.testing.assert_close(turned.atoms()[[0, 12]], torch.cat([new_atom, -new_atom]) / 4, rtol=1e-12, atol=0)
    torch.testing.assert_close(turned.encode(WORLD)[1], codes, rtol=1e-12, atol=0)  # the row keeps its norm
    delta = torch.full((16,), 0.1, dtype=torch.float64)
    edit.shift_bias(delta)  # as TopK: b_enc takes W_enc^T delta, every pre-activation stays
    torch.testing.assert_close(SAEView(edit.sae).bias(), world_sae.b_dec.detach() + delta, rtol=0, atol=1e-15)
    torch.testing.assert_close(SAEView(edit.sae).encode(WORLD)[1], codes, rtol=1e-10, atol=1e-12)

    rep = oh.repair_activations(world_sae, WORLD, held_out=0.2, lam=LAM)
    steps = {c["step"]: c for c in rep.changes["sae"]}
    assert not steps["codes"]["applied"] and "one sign" in steps["codes"]["reason"]
    assert {item.get("sign") for item in steps["codes"]["items"]} <= {"+", "-"}
    assert all(item["feature"] < 12 for step in steps.values() for item in step["items"] if "feature" in item)
    assert steps["atoms"]["applied"] and all("sign" not in item for item in steps["atoms"]["items"])
    assert type(rep.saes["sae"]) is type(world_sae)
    loss, mse, l1, l0, _ = sae_objective(world_sae, WORLD, LAM)
    torch.testing.assert_close(loss, own_objective(world_sae, WORLD, LAM), rtol=1e-12, atol=0)
    assert bool((l1 > 0).all()) and bool((l0 == world_sae.cfg.k).all())
