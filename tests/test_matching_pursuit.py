"""sae_lens' matching-pursuit SAEs (`MatchingPursuitTrainingSAE`, the `MatchingPursuitSAE` it saves)
audited end to end: their codes are nonnegative, the view maps them into theory units exactly (b_dec
only where the SAE applies it), `oh.audit_activations`, `oh.audit` on a tiny HookedTransformer, the
CLI and `compare` report statistics equal to a float64 brute force and the held-out objective the
SAE's own reconstruction error; the repair refuses what a tied pursuit cannot express.

The SAEs are trained by sae_lens' own training step (tests/sae_training.py, 30 steps).
"""
from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit

import opt_hooks as oh
from opt_hooks import cli
from opt_hooks.adapters.sae import SAEView
from opt_hooks.adapters.sae_edit import NotExpressible, SAEEdit
from opt_hooks.comparison import COMPARE_JSON
from opt_hooks.repair_run import sae_objective
from tests.planted import planted_hierarchy
from tests.sae_training import assert_layers_match, to_inference, train_sae
from tests.test_api import (
    HELD_OUT, HOOK1, assert_matches_brute_force, audit_batches, audit_tokens, brute_force, cached,
    held_out_windows, random_tokens, row_batches,
)
from tests.test_cli import report_on_tiny_model

SCOPE = "L1 surrogate (matching_pursuit)"
APPLY = [True, False]  # sae_lens' default is True: the encoder reads x - b_dec, decode adds b_dec
WORLD = planted_hierarchy(n=2000, d=16, k=6)  # x = codes @ atoms + 0.3: an offset for the bias


def trained(acts: torch.Tensor, apply_b_dec: bool, **kwargs) -> sae_lens.MatchingPursuitTrainingSAE:
    """An MP SAE trained 30 steps on `acts`; without apply_b_dec_to_input, b_dec (never used, so never
    trained) is set to random values: the audit must not see them."""
    kwargs.setdefault("hook_name", "sae")
    sae = train_sae("matching_pursuit", acts, d_sae=12, apply_b_dec_to_input=apply_b_dec, **kwargs)
    if not apply_b_dec:
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(sae.cfg.d_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return sae


@pytest.fixture(scope="module")
def world_saes() -> dict[bool, sae_lens.MatchingPursuitTrainingSAE]:
    return {apply: trained(WORLD.x, apply) for apply in APPLY}


def mp_brute_force(sae, batches):
    """test_api's brute force (codes from sae.encode, r = x - b_dec - z D in float64), with the bias
    that the MP SAE's decode adds: none without apply_b_dec_to_input."""
    expected = brute_force(sae, batches)
    if not sae.cfg.apply_b_dec_to_input:
        expected.r = expected.r + sae.b_dec.detach().double()
    return expected


def assert_missing_lam_rule(layer, expected) -> None:
    """THEORY.md 3.7: MP has no L1 term, so lam is estimated (2 x the median active <d_i, r_n>) where
    that is positive, and C4, C6 and the code gap are skipped with the reason where it is not. The
    pursuit leaves its active atoms nearly orthogonal to the residual: the median is near 0, either sign."""
    lam_hat = expected.lam_estimate()
    if lam_hat > 0:
        assert layer.lam_estimated and layer.lam == pytest.approx(lam_hat, rel=1e-6)  # kept in float32
        assert not {"C4", "C6", "codes"} & set(layer.skipped)
    else:
        assert (layer.lam, layer.lam_estimated) == (None, False)
        assert {"C4", "C6", "codes"} <= set(layer.skipped)
        assert all("cannot be estimated" in layer.skipped[name] for name in ("C4", "C6", "codes"))


def assert_held_out_objective(layer, sae, held_out_acts: torch.Tensor) -> None:
    """The audited held-out L is the SAE's own squared error ||decode(encode(x)) - x||^2 per token, plus
    lam times its L1 term only where a lam was estimated."""
    error, l1 = own_error(sae, held_out_acts)
    assert layer.objective["n_tokens"] == len(held_out_acts)
    assert layer.objective["mse"] == pytest.approx(float(error.mean()), rel=1e-9)
    assert layer.objective["L"] == pytest.approx(float((error + (layer.lam or 0.0) * l1).mean()), rel=1e-9)
    assert (layer.objective["l1"] is None) is (layer.lam is None)


@torch.no_grad()
def own_error(sae, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the SAE's own squared error ||decode(encode(x)) - x||^2 and sum_i f_i ||W_dec[i]||."""
    codes = sae.encode(acts)
    error = ((sae.decode(codes) - acts) ** 2).sum(-1)
    return error.double(), (codes * sae.W_dec.norm(dim=1)).sum(-1).double()


# ---- the codes and the view --------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", APPLY)
def test_pursuit_codes_are_nonnegative_and_the_view_is_exact(world_saes, tmp_path, apply_b_dec):
    """Each pursuit step adds relu(<residual, W_dec[i]>) to the latent of largest positive correlation:
    codes >= 0, exact zeros elsewhere; z = f ||W_dec[i]|| and r = x - b - z D is the SAE's own error,
    with b = b_dec only where the SAE applies it (its decode adds b_dec only then)."""
    sae = world_saes[apply_b_dec]
    inference = to_inference(sae, tmp_path)
    assert type(inference) is sae_lens.MatchingPursuitSAE
    for model in (sae, inference):
        view = SAEView(model)
        x, z, w = view.encode(WORLD.x)
        with torch.no_grad():
            f = model.encode(WORLD.x)
            error = WORLD.x - model.decode(f)
        assert bool((f >= 0).all()) and int((f > 0).sum()) > len(f), "codes are nonnegative, and some fire"
        assert w is None and torch.equal(x, WORLD.x)
        assert torch.equal(z, f * model.W_dec.norm(dim=1))
        torch.testing.assert_close(x - view.bias() - z @ view.atoms(), error, rtol=0, atol=1e-12)
        assert view.applies_bias is apply_b_dec
        assert torch.equal(view.bias(), model.b_dec.detach() if apply_b_dec else torch.zeros(16, dtype=torch.float64))
        assert (view.scope, view.lam, view.lam_source) == (SCOPE, None, None)
        assert any("greedy pursuit over W_dec" in note and "nonnegative" in note for note in view.notes)
        assert any("no bias" in note for note in view.notes) is not apply_b_dec
    assert torch.equal(SAEView(inference).encode(WORLD.x)[1], SAEView(sae).encode(WORLD.x)[1])

    # where no correlation with the residual is positive, the pursuit adds 0
    decoder = sae.W_dec.detach().abs()
    assert not _encode_matching_pursuit(-decoder[:3], decoder, 0.0, 4, True).any()


# ---- oh.audit_activations -----------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", APPLY)
def test_audit_activations_equals_brute_force(world_saes, apply_b_dec):
    """Every count, extreme and sum of the audit against the float64 brute force (lam given, so C4 and
    C6 are compared too). Without lam, on this world the median active <d_i, r_n> is not positive: C4,
    C6 and the code gap are skipped and the held-out L is the SAE's own squared error, no L1 term."""
    sae = world_saes[apply_b_dec]
    expected = mp_brute_force(sae, row_batches(WORLD.x, len(WORLD.x)))
    layer = oh.audit_activations(sae, WORLD.x, held_out=HELD_OUT, lam=0.05).layers["sae"]
    assert (layer.scope, layer.architecture, layer.lam, layer.lam_estimated) == (SCOPE, "matching_pursuit", 0.05, False)
    assert_matches_brute_force(layer, expected)

    layer = oh.audit_activations(sae, WORLD.x, held_out=HELD_OUT).layers["sae"]
    assert_missing_lam_rule(layer, expected)
    assert layer.lam is None and [f.active_count for f in layer.features] == (expected.z > 0).sum(0).tolist()
    assert_held_out_objective(layer, sae, WORLD.x[held_out_windows(len(WORLD.x), HELD_OUT)])


def test_inference_form_is_audited_as_the_training_sae(world_saes, tmp_path):
    """`save_inference_model` then `SAE.load_from_disk`: a MatchingPursuitSAE with the same pursuit
    settings, whose audit is the training SAE's, bit for bit where codes are concerned."""
    sae = world_saes[True]
    inference = to_inference(sae, tmp_path)
    for name in ("residual_threshold", "max_iterations", "stop_on_duplicate_support", "apply_b_dec_to_input"):
        assert getattr(inference.cfg, name) == getattr(sae.cfg, name)
    audits = [oh.audit_activations(s, WORLD.x, held_out=HELD_OUT).layers["sae"] for s in (sae, inference)]
    assert_layers_match(*audits)


# ---- oh.audit on a HookedTransformer ------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", APPLY)
def test_audit_on_a_tiny_model_equals_brute_force(tiny_model, apply_b_dec):
    """`oh.audit` on the model's activations: with lam given, the audit equals the brute force on
    the audit windows' tokens; without, it follows the missing-lam rule, and the held-out objective is
    the SAE's own on the held-out windows' tokens."""
    sae = trained(cached(tiny_model, random_tokens(32, seed=5), HOOK1), apply_b_dec, hook_name=HOOK1,
                  model_name="tiny-test-model")
    windows = random_tokens(12, seed=6)
    expected = mp_brute_force(sae, audit_batches(tiny_model, windows, HOOK1))
    layer = audit_tokens(tiny_model, sae, windows, lam=0.05).layers[HOOK1]
    assert (layer.scope, layer.lam) == (SCOPE, 0.05)
    assert_matches_brute_force(layer, expected)

    layer = audit_tokens(tiny_model, sae, windows).layers[HOOK1]
    assert_missing_lam_rule(layer, expected)
    held = held_out_windows(len(windows), HELD_OUT)
    assert_held_out_objective(layer, sae, cached(tiny_model, windows[held], HOOK1).reshape(-1, 16).double())


# ---- the command line and compare -------------------------------------------------------------


def test_cli_report_and_compare(world_saes, tmp_path, minilm_tokenizer):
    """Two MP SAE folders (apply_b_dec_to_input True at layer 0, False at layer 2) audited by
    `opt-hooks report` on a local model folder; `opt-hooks compare` sets that report beside an
    `audit_activations` report of the same SAEs."""
    hooks = {True: "blocks.0.hook_resid_pre", False: "blocks.2.hook_resid_pre"}
    saes = {}
    for apply, hook in hooks.items():
        saes[hook] = trained(WORLD.x, apply, hook_name=hook)
        saes[hook].save_inference_model(tmp_path / f"sae_{hook[7]}")
    out, report = report_on_tiny_model(tmp_path, minilm_tokenizer, "--sae-path", str(tmp_path / "sae_{layer}"),
                                       "--layers", "0,2")
    layers = report["layers"]
    assert list(layers) == list(hooks.values())
    for apply, hook in hooks.items():
        layer = layers[hook]
        assert (layer["architecture"], layer["scope"]) == ("matching_pursuit", SCOPE)
        assert any("greedy pursuit over W_dec" in note for note in layer["notes"])
        assert any("no bias" in note for note in layer["notes"]) is not apply
        assert layer["features"] and layer["objective"]["n_tokens"] > 0

    other = oh.audit_activations(saes, {hook: WORLD.x for hook in saes}, held_out=HELD_OUT).save(tmp_path / "acts")
    compared = tmp_path / "cmp"
    assert cli.main(["compare", str(out), str(other), "--out", str(compared)]) == 0
    rows = json.loads((compared / COMPARE_JSON).read_text())["rows"]
    assert [row["hook"] for row in rows] == list(hooks.values())
    for row in rows:
        assert [entry["scope"] for entry in row["entries"]] == [SCOPE, SCOPE]
        assert row["entries"][0]["objective"]["L"] == layers[row["hook"]]["objective"]["L"]


# ---- repair -----------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", APPLY)
def test_repair_refuses_encoder_changes_and_measures_with_its_own_encode(world_saes, apply_b_dec):
    """A tied pursuit has no encoder parameter for a code scale, a threshold, a planted or merged
    latent: refused. W_dec (and b_dec, where applied) can move; the pursuit then re-runs, and the
    repair's validation measures exactly the SAE's own encode / decode."""
    sae = world_saes[apply_b_dec]
    edit = SAEEdit(sae)
    ids = torch.tensor([0])
    for change in (lambda: edit.lower_codes(ids, torch.tensor([0.1])),
                   lambda: edit.scale_codes(ids, torch.tensor([0.5])),
                   lambda: edit.plant(0, torch.ones(16), 1.0, 0.0, 1.0),
                   lambda: edit.merge(0, 1, 0.9), lambda: edit.silence(0)):
        with pytest.raises(NotExpressible, match="pursuit over W_dec"):
            change()
    assert torch.equal(edit.sae.W_dec, sae.W_dec) and torch.equal(edit.sae.b_dec, sae.b_dec)

    delta = torch.full((16,), 0.1, dtype=torch.float64)
    if apply_b_dec:
        edit.shift_bias(delta)
        torch.testing.assert_close(edit.sae.b_dec, sae.b_dec + delta, rtol=0, atol=0)
    else:
        with pytest.raises(NotExpressible, match="no bias"):
            edit.shift_bias(delta)
    new_atom = torch.ones(1, 16, dtype=torch.float64)
    edit.turn_atoms(ids, new_atom)
    torch.testing.assert_close(edit.sae.W_dec[0], new_atom[0] / 4 * sae.W_dec[0].norm(), rtol=1e-12, atol=0)

    loss, mse, l1, l0, _ = sae_objective(edit.sae, WORLD.x, None)
    error, own_l1 = own_error(edit.sae, WORLD.x)
    assert torch.equal(loss, mse) and torch.equal(mse, error)
    torch.testing.assert_close(l1, own_l1, rtol=1e-12, atol=0)
    with torch.no_grad():
        assert torch.equal(l0, (edit.sae.encode(WORLD.x) > 0).sum(-1))

    rep = oh.repair_activations(sae, WORLD.x, held_out=0.2, lam=0.05)
    steps = {c["step"]: c for c in rep.changes["sae"]}
    assert not steps["codes"]["applied"] and "pursuit over W_dec" in steps["codes"]["reason"]
    assert steps["bias"]["applied"] is apply_b_dec
    assert ("no bias" in steps["bias"]["reason"]) is not apply_b_dec
    assert type(rep.saes["sae"]) is type(sae)


def test_a_spliced_pursuit_sae_is_refused_with_the_way_to_audit_it(tiny_model_cfg):
    """Its pursuit fires no hook_sae_acts_post, so a spliced MP SAE's codes cannot be read where it runs:
    the audit says so and how to audit it (beside the model), instead of finding no tokens."""
    from sae_lens import HookedSAETransformer

    model = HookedSAETransformer(tiny_model_cfg)
    sae = trained(cached(model, random_tokens(32, seed=5), HOOK1), True, hook_name=HOOK1, model_name="tiny-test-model")
    model.add_sae(sae)
    with pytest.raises(ValueError, match=r"matching-pursuit SAE spliced.*model\.reset_saes\(\)"):
        audit_tokens(model, sae, random_tokens(12, seed=6))
    model.reset_saes()
    layer = audit_tokens(model, sae, random_tokens(12, seed=6), lam=0.05).layers[HOOK1]
    assert layer.objective["n_tokens"] > 0
