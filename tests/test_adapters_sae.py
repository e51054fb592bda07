"""SAEView: every supported SAE-Lens architecture mapped to theory units, checked in float64
against SAE-Lens' own forward pass (and, for the standard SAE, its own training loss)."""
from __future__ import annotations

import warnings

import pytest
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

from opt_hooks.adapters.sae import EXACT_SCOPE, SAEView, make_views

D_IN, D_SAE = 8, 12
HOOK = "blocks.0.hook_resid_pre"

# name -> (SAE class, config class, architecture-specific config fields)
KINDS = {
    "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 3}),
    "topk_rescaled": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 3, "rescale_acts_by_decoder_norm": True}),
    "standard_training": (sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig, {"l1_coefficient": 2.0}),
    "gated_training": (sae_lens.GatedTrainingSAE, sae_lens.GatedTrainingSAEConfig, {"l1_coefficient": 2.0}),
    "jumprelu_training": (sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig, {}),
    "topk_training": (sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig, {"k": 3}),
    "batchtopk_training": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig, {"k": 3}),
    "matryoshka_batchtopk_training": (
        sae_lens.MatryoshkaBatchTopKTrainingSAE,
        sae_lens.MatryoshkaBatchTopKTrainingSAEConfig,
        {"k": 3, "matryoshka_widths": [4, D_SAE]},
    ),
    # a tied pursuit over W_dec; b_dec is applied only with apply_b_dec_to_input (tests/test_matching_pursuit.py)
    "matching_pursuit": (sae_lens.MatchingPursuitSAE, sae_lens.MatchingPursuitSAEConfig, {"max_iterations": 4}),
    "matching_pursuit_no_bias": (
        sae_lens.MatchingPursuitSAE, sae_lens.MatchingPursuitSAEConfig,
        {"max_iterations": 4, "apply_b_dec_to_input": False},
    ),
    "matching_pursuit_training": (
        sae_lens.MatchingPursuitTrainingSAE, sae_lens.MatchingPursuitTrainingSAEConfig,
        {"residual_threshold": 0.5, "decoder_init_norm": 1.0},
    ),
    # signed codes: the view is the doubled dictionary [d; -d] with codes [relu(z), relu(-z)] (tests/test_abstopk.py)
    "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig, {"k": 3}),
    "abstopk_training": (sae_lens.AbsTopKTrainingSAE, sae_lens.AbsTopKTrainingSAEConfig, {"k": 3}),
}
SIGNED = ("abstopk", "abstopk_training")
MODES = ("none", "expected_average_only_in", "covariance_whitening")
WEIGHTED_MODES = ("constant_norm_rescale", "layer_norm")  # their training loss weights tokens
EXTERNAL_MODES = ("expected_average_only_in", "covariance_whitening")


def build(kind: str, *, d_in=D_IN, dtype="float64", normalize="none", seed=0, metadata=None, **fields):
    """A sae_lens SAE with random weights (decoder rows of assorted norms, nonzero b_dec)."""
    sae_class, config_class, extra = KINDS[kind]
    config = config_class(
        d_in=d_in, d_sae=D_SAE, dtype=dtype, normalize_activations=normalize,
        metadata=metadata or SAEMetadata(hook_name=HOOK, model_name="tiny-test-model"), **{**extra, **fields},
    )
    sae = sae_class(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            values = torch.randn(parameter.shape, generator=gen, dtype=torch.float64) * 0.5
            parameter.copy_((values.abs() * 0.2 if name == "threshold" else values).to(parameter.dtype))
    return sae


def view_of(sae, **kwargs) -> SAEView:
    with warnings.catch_warnings():  # the unfolded external-normalisation warning is tested below
        warnings.simplefilter("ignore", UserWarning)
        return SAEView(sae, **kwargs)


def activations(seed=1, shape=(3, 5, D_IN)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3


def sae_lens_reference(sae, acts):
    """(internal input, reconstruction error in internal space, codes) from sae_lens' forward
    (the modes audited apply no run-time normalisation inside the SAE, so x is hook_sae_input)."""
    with torch.no_grad():
        _, cache = sae.run_with_cache(acts)
    x = cache["hook_sae_input"]
    error = x - cache["hook_sae_recons"]
    if "hook_sae_acts_post" in cache:
        codes = cache["hook_sae_acts_post"].reshape(-1, sae.cfg.d_sae)
    else:  # a matching-pursuit SAE's encode runs no hook on its codes
        with torch.no_grad():
            codes = sae.encode(acts).reshape(-1, sae.cfg.d_sae)
    return x.reshape(-1, sae.cfg.d_in), error.reshape(-1, sae.cfg.d_in), codes


@pytest.mark.parametrize("kind, mode", [
    (kind, mode) for kind in KINDS for mode in MODES
    if (kind, mode) != ("matching_pursuit_training", "covariance_whitening")  # sae_lens refuses to train it
])
def test_residual_is_the_sae_reconstruction_error(kind, mode):
    sae = build(kind, normalize=mode)
    view = view_of(sae)
    acts = activations()
    state_before = dict(sae.__dict__)

    x, z, _ = view.encode(acts)

    assert sae.__dict__ == state_before, "encode left per-call state on the SAE"
    x_ref, error_ref, codes_ref = sae_lens_reference(sae, acts)
    assert x.dtype == z.dtype == torch.float64
    signed = kind in SIGNED  # codes of either sign: those of the doubled dictionary, each sign one atom
    assert x.shape == (15, D_IN) and z.shape == (15, 2 * D_SAE if signed else D_SAE)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
    residual = x - view.bias() - z @ view.atoms()
    torch.testing.assert_close(residual, error_ref, rtol=0, atol=1e-10)
    assert (z >= 0).all()
    assert torch.equal(z > 0, torch.cat([codes_ref > 0, codes_ref < 0], 1) if signed else codes_ref > 0)
    assert bool((codes_ref < 0).any()) is signed
    assert (z > 0).sum() >= 10, "too few active codes for the check to mean anything"


@pytest.mark.parametrize("mode", WEIGHTED_MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_weighted_residual_is_the_de_normalised_error(kind, mode):
    """sae_lens compares the SAE's de-normalised output with its raw input: the view's
    w_n ||r_n||^2 is that squared error, token by token (layer_norm up to its eps = 1e-5 in the
    normalising denominator, THEORY.md section 1)."""
    sae = build(kind, normalize=mode)
    view = view_of(sae)
    acts = activations() * torch.linspace(0.2, 5.0, 5)[:, None]  # per-token scales 0.2 .. 5
    state_before = dict(sae.__dict__)

    x, z, w = view.encode(acts)

    assert sae.__dict__ == state_before, "encode left per-call state on the SAE"
    assert w.shape == (15,) and w.dtype == torch.float64 and bool((w > 0).all())
    assert float(w.max() / w.min()) > 100, "the weights must differ for the check to mean anything"
    with torch.no_grad():
        error = ((acts - sae(acts)) ** 2).sum(-1).reshape(-1)
    residual = x - view.bias() - z @ view.atoms()
    # layer_norm's error is s_n r_n + eps x_norm: relative to w_n ||r_n||^2 a few eps / s_n off
    rtol = 20 * 1e-5 / float(w.min().sqrt()) if mode == "layer_norm" else 1e-10
    torch.testing.assert_close(w * (residual**2).sum(-1), error, rtol=rtol, atol=0)
    assert any("weighted by w_n" in note for note in view.notes)


@pytest.mark.parametrize("kind", ["standard", "standard_training"])
def test_hook_z_sae_on_a_tiny_model(tiny_model, kind):
    """(batch, pos, n_heads, d_head) activations; an inference SAE reshapes them itself, a
    training SAE expects them flat (sae_lens turns its hook_z reshaping off)."""
    hook = "blocks.0.attn.hook_z"
    sae = build(kind, d_in=16, reshape_activations="hook_z", metadata=SAEMetadata(hook_name=hook))
    view = SAEView(sae)
    tokens = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        acts = tiny_model.run_with_cache(tokens, names_filter=hook)[1][hook]
    assert acts.shape == (2, 6, 4, 4)
    state_before = dict(sae.__dict__)

    x, z, _ = view.encode(acts)

    assert sae.__dict__ == state_before, "encode left hook_z state (d_head, reshape_fn_in) on the SAE"
    flat_x, flat_z, _ = view.encode(acts.flatten(-2))  # cached activations arrive flat
    torch.testing.assert_close((flat_x, flat_z), (x, z), rtol=0, atol=0)
    sae_input = acts.double() if sae.hook_z_reshaping_mode else acts.double().flatten(-2)
    x_ref, error_ref, codes_ref = sae_lens_reference(sae, sae_input)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(x - view.bias() - z @ view.atoms(), error_ref, rtol=0, atol=1e-10)
    assert torch.equal(z > 0, codes_ref > 0) and (z > 0).any()


def test_sae_on_one_head_selects_that_head():
    metadata = SAEMetadata(hook_name="blocks.0.attn.hook_z", hook_head_index=2)
    view = SAEView(build("standard", d_in=4, metadata=metadata))
    acts = activations(shape=(2, 3, 4, 4))
    x, *_ = view.encode(acts)
    torch.testing.assert_close(x, acts[:, :, 2, :].reshape(-1, 4), rtol=0, atol=0)
    torch.testing.assert_close(view.encode(acts.flatten(-2))[0], x, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["standard_training", "standard"])
def test_objective_matches_sae_lens_training_loss(kind):
    """THEORY.md section 1: mse + l1 * sum f ||W_dec|| per token equals ||r||^2 + lam * sum z."""
    training = build("standard_training", l1_coefficient=0.7)
    if kind == "standard":  # the inference SAE it saves carries the coefficient in its metadata
        inference = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
            d_in=D_IN, d_sae=D_SAE, dtype="float64", metadata=training.cfg.metadata))
        inference.load_state_dict(training.state_dict())
        view = SAEView(inference)
    else:
        view = SAEView(training)
    assert view.lam == 0.7 and view.lam_source == "config" and view.scope == EXACT_SCOPE

    x_in = activations(shape=(64, D_IN))
    step = TrainStepInput(
        sae_in=x_in, coefficients={"l1": 0.7}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    with torch.no_grad():
        loss = training.training_forward_pass(step).loss
    x, z, _ = view.encode(x_in)
    residual = x - view.bias() - z @ view.atoms()
    objective = (residual.pow(2).sum(dim=1) + view.lam * z.sum(dim=1)).mean()
    torch.testing.assert_close(loss, objective, rtol=1e-12, atol=0)


def test_saved_and_reloaded_standard_sae_keeps_lam(tmp_path):
    training = build("standard_training", l1_coefficient=3.0)
    training.save_inference_model(tmp_path)
    reloaded = sae_lens.SAE.load_from_disk(tmp_path)
    view = SAEView(reloaded)
    assert type(reloaded) is sae_lens.StandardSAE
    assert (view.lam, view.lam_source, view.scope) == (3.0, "config", EXACT_SCOPE)


def test_lam_and_scope_by_architecture():
    standard = SAEView(build("standard"))  # no training record: L1 assumed, lam unknown
    assert (standard.scope, standard.lam, standard.lam_source) == (EXACT_SCOPE, None, None)
    assert standard.is_exact

    given = SAEView(build("standard"), lam=0.25)
    assert (given.lam, given.lam_source) == (0.25, "argument")

    lp2 = SAEView(build("standard_training", lp_norm=2.0))
    assert lp2.lam is None and lp2.scope == "L1 surrogate (standard, lp_norm=2)"

    gated = SAEView(build("gated_training"))  # its l1 acts on the gate, not on the codes
    assert (gated.scope, gated.lam, gated.lam_source) == ("L1 surrogate (gated)", None, None)
    for kind, architecture in [("jumprelu", "jumprelu"), ("topk_training", "topk"),
                               ("matryoshka_batchtopk_training", "matryoshka_batchtopk")]:
        view = SAEView(build(kind))
        assert (view.architecture, view.scope, view.lam) == (architecture, f"L1 surrogate ({architecture})", None)
    assert any("per batch" in note for note in SAEView(build("batchtopk_training")).notes)
    for kind in ("matching_pursuit", "matching_pursuit_no_bias", "matching_pursuit_training"):
        view = SAEView(build(kind))  # no L1 term: an L0 budget (residual threshold, iterations)
        assert (view.architecture, view.scope, view.lam) == ("matching_pursuit", "L1 surrogate (matching_pursuit)", None)
        assert any("greedy pursuit over W_dec" in note for note in view.notes)

    with pytest.raises(ValueError, match="lam must be"):
        SAEView(build("standard"), lam=-1.0)


def test_metadata_fields_and_hook_name_override():
    view = SAEView(build("topk"))
    assert (view.hook_name, view.d_in, view.d_sae, view.model_name) == (HOOK, D_IN, D_SAE, "tiny-test-model")
    assert SAEView(build("topk"), hook_name="blocks.1.hook_resid_post").hook_name == "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="hook_name="):
        SAEView(build("standard", metadata=SAEMetadata()))


def test_pretrained_identity_from_the_sae_lens_directory():
    view = SAEView(build("standard"), release="gpt2-small-res-jb", sae_id="blocks.0.hook_resid_pre")
    assert view.neuronpedia_id == "gpt2-small/0-res-jb"

    # older configs keep the neuronpedia id in the metadata: the release is found from it
    metadata = SAEMetadata(hook_name=HOOK, neuronpedia_id="gpt2-small/0-res-jb")
    found = SAEView(build("standard", metadata=metadata))
    assert (found.release, found.sae_id) == ("gpt2-small-res-jb", "blocks.0.hook_resid_pre")

    plain = SAEView(build("standard"))
    assert (plain.release, plain.sae_id, plain.neuronpedia_id) == (None, None, None)


def test_lam_is_divided_by_a_folded_norm_scaling_factor():
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    release, sae_id = "gpt2-small-mlp-tm", "blocks.0.hook_mlp_out"
    factor = get_norm_scaling_factor(release, sae_id)
    metadata = SAEMetadata(
        hook_name=sae_id, training_architecture="standard", training_architecture_details={"l1_coefficient": 2.0}
    )
    view = SAEView(build("standard", metadata=metadata), release=release, sae_id=sae_id)
    assert factor is not None and factor != 1
    assert view.lam == pytest.approx(2.0 / factor)
    assert any("norm_scaling_factor" in note for note in view.notes)


def test_codes_are_float32_from_half_precision_saes():
    sae = build("standard", dtype="bfloat16")
    acts = activations().float()
    x, z, _ = SAEView(sae).encode(acts)
    with torch.no_grad():
        expected = sae.encode(acts).float().reshape(-1, D_SAE) * sae.W_dec.float().norm(dim=1)
    assert x.dtype == z.dtype == torch.float32
    torch.testing.assert_close(z, expected)
    assert SAEView(build("standard", dtype="float32")).atoms().dtype == torch.float32


def test_zero_norm_decoder_rows_are_dead_atoms():
    sae = build("topk_training")
    with torch.no_grad():
        sae.W_dec[[2, 5]] = 0.0
    view = view_of(sae)
    x, z, _ = view.encode(activations())
    assert view.dead_atoms().nonzero().flatten().tolist() == [2, 5]
    assert torch.equal(view.atoms()[[2, 5]], torch.zeros(2, D_IN, dtype=torch.float64))
    assert (z[:, [2, 5]] == 0).all() and torch.isfinite(z).all()
    torch.testing.assert_close(view.atoms().norm(dim=1)[[0, 1, 3]], torch.ones(3, dtype=torch.float64))
    assert any("norm 0" in note for note in view.notes)


def test_sparse_codes_from_topk_training_are_densified():
    sae = build("topk_training", use_sparse_activations=True)
    dense = build("topk_training")
    x, z, _ = SAEView(sae).encode(activations())
    _, z_dense, _ = SAEView(dense).encode(activations())
    assert not z.is_sparse
    torch.testing.assert_close(z, z_dense)


def test_external_normalisation_warns():
    with pytest.warns(UserWarning, match="fold_activation_norm_scaling_factor"):
        view = SAEView(build("standard", normalize="expected_average_only_in"))
    assert any("expected_average_only_in" in note for note in view.notes)
    with pytest.warns(UserWarning, match="cannot fold whitening"):
        SAEView(build("matching_pursuit", normalize="covariance_whitening"))


def test_width_mismatch_names_both_widths():
    view = SAEView(build("standard"))
    with pytest.raises(ValueError, match=r"d_in=8 but the activations have width 6"):
        view.encode(torch.randn(2, 3, 6))


def test_unsupported_saes_are_refused_with_the_reason():
    transcoder = sae_lens.Transcoder(sae_lens.TranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(ValueError, match="transcoder"):
        SAEView(transcoder)
    temporal = sae_lens.TemporalSAE(sae_lens.TemporalSAEConfig(
        d_in=D_IN, d_sae=D_SAE, n_heads=2, bottleneck_factor=2, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(ValueError, match="earlier tokens through attention"):
        SAEView(temporal)
    with pytest.raises(TypeError):
        SAEView(torch.nn.Linear(2, 2))


def test_make_views_accepts_an_sae_a_list_and_a_dict():
    a, b = build("standard"), build("topk", metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
    assert list(make_views(a)) == [HOOK]
    assert list(make_views([a, b])) == [HOOK, "blocks.1.hook_resid_pre"]
    views = make_views({"blocks.1.hook_mlp_out": a})
    assert views["blocks.1.hook_mlp_out"].sae is a
    assert list(make_views([a, b], hook_names=["x.0", "x.1"])) == ["x.0", "x.1"]
    existing = SAEView(a)
    assert make_views([existing])[HOOK] is existing

    # several SAEs on one hook: keys that also name the SAE (its sae_id, else its position)
    c = build("gated")
    assert list(make_views([a, b, c])) == [f"{HOOK}/sae0", "blocks.1.hook_resid_pre", f"{HOOK}/sae2"]
    named = make_views([SAEView(a, sae_id="wide"), SAEView(c, sae_id="narrow")])
    assert list(named) == [f"{HOOK}/wide", f"{HOOK}/narrow"] and named[f"{HOOK}/wide"].hook_name == HOOK
    with pytest.raises(ValueError, match="same SAE is given twice"):
        make_views([a, a])
    with pytest.raises(ValueError, match="one per SAE"):
        make_views([a, b], hook_names=["only-one"])
    with pytest.raises(ValueError, match="no SAEs"):
        make_views([])
