"""Repair (THEORY.md section 7, docs/REPAIR.md): every change written into an SAE's parameters does
what the theory-unit change says (per architecture), every step's measured validation change equals
the audit's held-out measurement of its certificate, planted defects are repaired, changes that do not
hold up on tokens they were not chosen on are not applied, and the repaired SAEs save and load."""
from __future__ import annotations

import math

import pytest
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata

import opt_hooks as oh
from opt_hooks.adapters.sae import SAEView
from opt_hooks.adapters.sae_edit import NotExpressible, SAEEdit
from opt_hooks.engine import AuditOptions
from opt_hooks.repair_run import RepairOptions, sae_objective
from opt_hooks.run import held_out_windows
from tests.sae_training import to_inference, train_sae
from tests.test_verdicts import LAM, Stationary

D = 12
ARCHITECTURES = {
    "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 3}),
}


def random_sae(architecture: str, k: int = 10, seed: int = 0, apply_b_dec_to_input: bool = True):
    cls, cfg_cls, extra = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    sae = cls(cfg_cls(d_in=D, d_sae=k, dtype="float64", apply_b_dec_to_input=apply_b_dec_to_input,
                      metadata=SAEMetadata(hook_name="sae"), **extra))
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.copy_(0.5 * torch.randn_like(parameter))
        sae.W_dec.mul_(torch.rand(k, 1, dtype=torch.float64) + 0.5)
        if architecture == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(k, dtype=torch.float64))
        if architecture in ("standard", "jumprelu", "topk"):
            sae.b_enc.add_(0.3)
    return sae.eval()


def theory(sae, x):
    view = SAEView(sae, hook_name="sae")
    _, z, _ = view.encode(x)
    return view.atoms(), z, view.bias()


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_each_edit_is_its_theory_unit_change(architecture, apply_b_dec):
    """Every SAEEdit change, read back through SAEView (the audit's units), is exactly the change
    it names, or is refused with a reason where the class cannot express it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, D, generator=gen, dtype=torch.float64)
    sae = random_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    atoms, z, bias = theory(sae, x)
    live = int(torch.argmax((z > 0).sum(0)))
    exact = dict(atol=1e-10, rtol=1e-10)

    edit = SAEEdit(sae)
    delta = torch.randn(D, generator=gen, dtype=torch.float64)
    edit.shift_bias(delta)
    a2, z2, b2 = theory(edit.sae, x)
    torch.testing.assert_close(z2, z, **exact)
    torch.testing.assert_close(b2, bias + delta, **exact)
    torch.testing.assert_close(a2, atoms, **exact)

    edit = SAEEdit(sae)
    new_atom = torch.randn(1, D, generator=gen, dtype=torch.float64)
    edit.turn_atoms(torch.tensor([live]), new_atom)
    a2, z2, _ = theory(edit.sae, x)
    torch.testing.assert_close(a2[live], new_atom[0] / new_atom.norm(), **exact)
    torch.testing.assert_close(z2, z, **exact)

    s = float(z[:, live][z[:, live] > 0].median())
    edit = SAEEdit(sae)
    if architecture == "topk":
        with pytest.raises(NotExpressible, match="k largest"):
            edit.lower_codes(torch.tensor([live]), torch.tensor([s], dtype=torch.float64))
        torch.testing.assert_close(theory(edit.sae, x)[1], z)  # refused before anything changed
    else:
        edit.lower_codes(torch.tensor([live]), torch.tensor([s], dtype=torch.float64))
        expected = z.clone()
        expected[:, live] = (z[:, live] - s).clamp(min=0)
        torch.testing.assert_close(theory(edit.sae, x)[1], expected, **exact)

    edit = SAEEdit(sae)
    edit.scale_codes(torch.tensor([live]), torch.tensor([0.7], dtype=torch.float64))
    expected = z.clone()
    expected[:, live] *= 0.7
    torch.testing.assert_close(theory(edit.sae, x)[1], expected, **exact)

    edit = SAEEdit(sae)  # a factor 0 removes the latent and leaves every other code (a TopK ranking too)
    edit.scale_codes(torch.tensor([live]), torch.tensor([0.0], dtype=torch.float64))
    expected[:, live] = 0
    torch.testing.assert_close(theory(edit.sae, x)[1], expected, **exact)

    free, direction = (live + 1) % sae.cfg.d_sae, torch.randn(D, generator=gen, dtype=torch.float64)
    edit = SAEEdit(sae)
    if architecture == "topk":
        with pytest.raises(NotExpressible):
            edit.plant(free, direction, 1.3, 0.4, 2.0)
    else:
        edit.plant(free, direction, 1.3, 0.4, 2.0)
        a2, z2, b2 = theory(edit.sae, x)
        unit = direction / direction.norm()
        torch.testing.assert_close(a2[free], unit, **exact)
        torch.testing.assert_close(z2[:, free], 1.3 * ((x - b2) @ unit - 0.4).clamp(min=0), **exact)
        others = torch.arange(sae.cfg.d_sae) != free
        torch.testing.assert_close(z2[:, others], z[:, others], **exact)

    edit = SAEEdit(sae)
    edit.silence(free)
    assert bool((theory(edit.sae, x)[1][:, free] == 0).all())


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_merge_adds_the_dropped_code_where_both_fire(architecture):
    """Two latents with proportional encoders: the merged one codes z_keep + factor z_drop, the
    dropped one is silent."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, D, generator=gen, dtype=torch.float64)
    sae = random_sae(architecture)
    with torch.no_grad():
        sae.W_enc[:, 1] = 0.5 * sae.W_enc[:, 0]
        sae.b_enc[1] = 0.5 * sae.b_enc[0]
        if architecture == "jumprelu":
            sae.threshold[1] = 0.5 * sae.threshold[0]
    _, z, _ = theory(sae, x)
    edit = SAEEdit(sae)
    edit.merge(0, 1, 0.9)
    _, z2, _ = theory(edit.sae, x)
    torch.testing.assert_close(z2[:, 0], z[:, 0] + 0.9 * z[:, 1], atol=1e-10, rtol=1e-10)
    assert bool((z2[:, 1] == 0).all())
    with pytest.raises(NotExpressible, match="gated"):
        SAEEdit(random_sae("gated")).merge(0, 1, 0.9)


# -- constructed cases: one defect each, certified, applied, measured ----------------------------------

OPTS = RepairOptions(audit_held_out=0.25)


def repair_one(sae, x, **audit_options):
    options = AuditOptions(**audit_options) if audit_options else None
    return oh.repair_activations(sae, x, held_out=0.2, options=options, repair_options=OPTS)


def step(rep, name):
    return next(s for s in rep.changes["sae"] if s["step"] == name)


def test_bias_defect_repaired_with_the_audits_measured_gain():
    """b_dec moved outside the atoms' span (codes unchanged): C5 is certified, the repair applies
    the bias step, and its change measured with the SAE's own encode / decode on the validation
    tokens is the audit's held-out measurement of the certificate, to rounding."""
    world = Stationary(4)
    sae = world.sae()
    with torch.no_grad():
        sae.b_dec.add_(0.4 * world.outside[0])
    rep = repair_one(sae, world.sample(6000), c3_tol=math.inf)
    bias = step(rep, "bias")
    c5 = rep.audits[0].layers["sae"].layer_conditions["C5"]
    assert c5["tier"] == "certified" and bias["applied"]
    print(f"bias step: validation gain {bias['gain']:.6g}, audit's held-out gain {c5['certificate'].gain:.6g}")
    assert bias["gain"] == pytest.approx(c5["certificate"].gain, rel=1e-9)
    table = rep.table["sae"]
    assert table["after"]["L"] < table["before"]["L"] and table["change"]["L"] + 3 * table["change"]["se"] < 0
    torch.testing.assert_close(rep.saes["sae"].b_dec.detach(), world.bias, atol=0.05, rtol=0)  # moved back


def test_decoder_defect_repaired_with_the_audits_measured_gain():
    world = Stationary(3)
    decoder = world.atoms.clone()
    decoder[0] = math.cos(0.3) * world.atoms[0] + math.sin(0.3) * world.outside[0]
    rep = repair_one(world.sae(decoder), world.sample(8000), c5_tol=math.inf)
    atoms = step(rep, "atoms")
    assert atoms["applied"] and [item["feature"] for item in atoms["items"]] == [0]
    print(f"atoms step: validation gain {atoms['gain']:.6g}, certified gain {atoms['items'][0]['certified_gain']:.6g}")
    assert atoms["gain"] == pytest.approx(atoms["items"][0]["certified_gain"], rel=1e-9)
    turned = rep.saes["sae"].W_dec.detach()[0]
    assert float(turned @ world.atoms[0] / turned.norm()) > math.cos(0.03)  # turned back, to 0.03 rad


def test_code_defect_repaired_with_the_audits_measured_gain():
    """Feature 0's codes 1.5 times too large (its encoder row and bias scaled): C4 scales them back."""
    world = Stationary(5)
    sae = world.sae()
    with torch.no_grad():
        sae.W_enc[:, 0] *= 1.5
        sae.b_enc[0] *= 1.5
    rep = repair_one(sae, world.sample(6000), c3_tol=math.inf, c5_tol=math.inf)
    codes = step(rep, "codes")
    assert codes["applied"] and 0 in [item["feature"] for item in codes["items"]]
    certified = sum(item["certified_gain"] for item in codes["items"])
    print(f"codes step ({len(codes['items'])} features): validation gain {codes['gain']:.6g}, certified {certified:.6g}")
    if len(codes["items"]) == 1:  # one feature: the step is its certificate exactly
        assert codes["gain"] == pytest.approx(certified, rel=1e-9)
    item = next(i for i in codes["items"] if i["feature"] == 0)
    assert item["factor"] == pytest.approx(1 / 1.5, rel=0.05)


def test_floor_defect_repaired_with_the_audits_measured_gain():
    """Feature 0 never switches off (its encoder bias raised by 2): C1's floor moves into b_dec."""
    world = Stationary(6)
    sae = world.sae()
    with torch.no_grad():
        sae.b_enc[0] += 2.0
    rep = repair_one(sae, world.sample(6000), c3_tol=math.inf, c5_tol=math.inf)
    floor = step(rep, "floor")
    layer = rep.audits[0].layers["sae"]
    assert layer.feature(0).certificates["C1"].tier == "certified" and floor["applied"]
    print(f"floor step: validation gain {floor['gain']:.6g}, certified {floor['items'][0]['certified_gain']:.6g}")
    assert floor["gain"] == pytest.approx(floor["items"][0]["certified_gain"], rel=1e-9)
    fresh = world.sample(2000)
    assert bool((theory(sae, fresh)[1][:, 0] > 0).all())  # always on before
    assert bool((theory(rep.saes["sae"], fresh)[1][:, 0] == 0).any())  # off somewhere after


def duplicated_world(seed: int = 7) -> tuple[Stationary, sae_lens.StandardTrainingSAE]:
    """The last true feature has no latent; the second to last is coded twice (two latents with
    proportional encoders and atoms 0.0005 rad apart, each carrying half its code)."""
    world = Stationary(seed)
    sae = world.sae()
    k = world.k
    with torch.no_grad():
        sae.W_enc[:, k - 1] = 0.5 * world.atoms[k - 2]
        sae.b_enc[k - 1] = -LAM / 4
        sae.W_enc[:, k - 2] *= 0.5
        sae.b_enc[k - 2] = -LAM / 4
        sae.W_dec[k - 1] = math.cos(5e-4) * world.atoms[k - 2] + math.sin(5e-4) * world.outside[0]
    return world, sae


def test_duplicates_merged_and_the_freed_latent_resampled_onto_the_missing_feature():
    world, sae = duplicated_world()
    rep = repair_one(sae, world.sample(8000), c3_tol=math.inf, c5_tol=math.inf)
    respawn = step(rep, "respawn")
    k = world.k
    merges = [i for i in respawn["items"] if "keep" in i]
    plants = [i for i in respawn["items"] if "threshold" in i]
    print(f"respawn: gain {respawn['gain']:.4g} ± {respawn['se']:.2g}; merges {merges}; plants {plants}")
    assert respawn["applied"] and {(m["keep"], m["drop"]) for m in merges} <= {(k - 2, k - 1), (k - 1, k - 2)}
    planted = next(p for p in plants if p["kept"])
    # the resampled latent's fitted gain on the audit tokens is its prediction; held out it agrees
    assert abs(planted["gain"] - planted["audit_gain"]) < 4 * planted["se"]
    atom = rep.saes["sae"].W_dec.detach()[planted["feature"]]
    assert abs(float(atom @ world.atoms[k - 1] / atom.norm())) > 0.9  # the missing feature's direction
    table = rep.table["sae"]
    print(f"test tokens: L {table['before']['L']:.5g} -> {table['after']['L']:.5g}")
    assert table["change"]["L"] < -0.05 * table["before"]["L"]


def test_dead_latent_resampled_when_c6_is_certified():
    world = Stationary(8)
    sae = world.sae()
    k = world.k
    with torch.no_grad():
        sae.b_enc[k - 1] = -100.0  # dead: the last true feature is left in the residuals
    rep = repair_one(sae, world.sample(8000), c3_tol=math.inf, c5_tol=math.inf)
    assert rep.audits[0].layers["sae"].layer_conditions["C6"]["tier"] == "certified"
    respawn = step(rep, "respawn")
    assert respawn["applied"], respawn
    planted = next(i for i in respawn["items"] if i.get("feature") == k - 1)
    print(f"resampled latent: audit gain {planted['audit_gain']:.4g}, held out {planted['gain']:.4g} ± {planted['se']:.2g}")
    assert abs(planted["gain"] - planted["audit_gain"]) < 4 * planted["se"]
    atom = rep.saes["sae"].W_dec.detach()[k - 1]
    assert abs(float(atom @ world.atoms[k - 1] / atom.norm())) > 0.9
    assert rep.table["sae"]["after"]["dead"] < rep.table["sae"]["before"]["dead"]


def test_a_latent_fitted_on_audit_tokens_that_does_not_hold_up_is_not_applied():
    """The missing feature appears on the audit tokens only: the resampled latent is fitted there
    (its audit gain is positive) but lowers nothing on the validation tokens, so it is dropped and the
    repaired SAE keeps the duplicate pair unmerged."""
    world, sae = duplicated_world(9)
    n, k = 8000, world.k
    x = world.sample(n)
    test = held_out_windows(0, n, 0.2)
    validation = torch.zeros(n, dtype=torch.bool)
    validation[~test] = held_out_windows(0, int((~test).sum()), OPTS.audit_held_out)
    seen = ((x - world.offset) @ world.atoms[k - 1])[:, None] * world.atoms[k - 1]
    x[test | validation] -= seen[test | validation]  # the last feature only on the audit tokens
    rep = repair_one(sae, x, c3_tol=math.inf, c5_tol=math.inf)
    respawn = step(rep, "respawn")
    plants = [i for i in respawn["items"] if "threshold" in i]
    print(f"respawn: {respawn}")
    assert plants and max(p["audit_gain"] for p in plants) > 0
    assert not respawn["applied"]
    torch.testing.assert_close(rep.saes["sae"].W_enc.detach(), sae.W_enc.detach())
    assert rep.table["sae"]["change"]["L"] == pytest.approx(0, abs=1e-12)


def test_nothing_wrong_nothing_applied():
    """A stationary SAE: no certified finding, so no step; the SAE comes back unchanged."""
    world = Stationary(0)
    sae = world.sae()
    rep = repair_one(sae, world.sample(4000))
    assert not [s for s in rep.changes["sae"] if s["applied"]]
    assert rep.saes["sae"] is sae or all(
        torch.equal(a, b) for a, b in zip(rep.saes["sae"].state_dict().values(), sae.state_dict().values()))


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_trained_surrogate_saes_repair_only_what_they_express(kind, tmp_path):
    """TopK and JumpReLU SAEs trained by sae_lens: the repair runs, refuses what the class cannot
    express (with the reason), and does not raise the test tokens' objective."""
    world = Stationary(11)
    x = world.sample(6000)
    sae = to_inference(train_sae(kind, x, hook_name="sae", d_sae=24, steps=300), tmp_path / "sae")
    rep = oh.repair_activations(sae, x, held_out=0.2, repair_options=OPTS)
    table = rep.table["sae"]
    print(kind, {s["step"]: (s["applied"], s["reason"][:50]) for s in rep.changes["sae"]},
          f"L {table['before']['L']:.5g} -> {table['after']['L']:.5g} ± {table['change']['se']:.2g}")
    assert table["change"]["L"] <= 2 * (table["change"]["se"] or 0)
    assert rep.saes["sae"].cfg.architecture() == sae.cfg.architecture()
    for s in rep.changes["sae"]:
        if "not expressible" in s["reason"]:
            assert not s["applied"]


def test_repaired_sae_saves_and_loads_bitwise(tmp_path):
    world = Stationary(4)
    sae = world.sae()
    with torch.no_grad():
        sae.b_dec.add_(0.4 * world.outside[0])
    x = world.sample(4000)
    rep = repair_one(sae, x)
    out = rep.save(tmp_path / "out")
    repaired = rep.saes["sae"]
    assert repaired.cfg.metadata.neuronpedia_id is None and "bias" in repaired.cfg.metadata.opt_hooks_repair
    loaded = sae_lens.SAE.load_from_disk(out / "saes" / "sae", dtype="float64")
    assert type(loaded).__name__ == "StandardSAE" and loaded.cfg.metadata.opt_hooks_repair
    inference_state = {k: v for k, v in repaired.state_dict().items()}
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, inference_state[name]), name
    assert torch.equal(loaded.encode(x), repaired.encode(x))
    assert (out / "repair.json").exists() and (out / "report.json").exists()


def test_sae_objective_is_the_training_loss():
    """The table's objective is what sae_lens trains: sum of squared errors + l1 * sum f ||W_dec||."""
    world = Stationary(2)
    sae = world.sae()
    x = world.sample(500)
    loss, mse, l1, l0, fired = sae_objective(sae, x, LAM)
    feature_acts = sae.encode(x)
    expected_mse = ((sae.decode(feature_acts) - x) ** 2).sum(-1)
    torch.testing.assert_close(mse, expected_mse.double())
    torch.testing.assert_close(l1, (feature_acts * sae.W_dec.norm(dim=1)).sum(-1).double())
    torch.testing.assert_close(loss, mse + LAM * l1)
    assert bool((l0 == (feature_acts > 0).sum(-1)).all()) and fired.shape == (world.k,)


def test_embedded_default_repair_lowers_every_layers_own_objective_on_unseen_tokens():
    """The acceptance test: on the embedded default, the repaired SAEs' training objective (mse +
    l1_coefficient * sum f ||W_dec||, computed here with sae_lens' encode / decode at the model's
    hooks, not with the repair's code) is lower than the released SAEs' on the test windows, which
    neither the audit nor the repair read, on every layer; the transcoder's against its output hook."""
    from opt_hooks import embedded
    from opt_hooks.adapters.data import special_token_mask, token_windows

    model, saes, texts = embedded.load_default()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = oh.repair(model, list(saes.values()), texts, n_tokens=embedded.DEFAULT_TOKENS, progress=False)
    finally:
        torch.set_num_threads(threads)
    windows = torch.cat(list(token_windows(texts, model, 128, n_tokens=embedded.DEFAULT_TOKENS)))
    test = windows[held_out_windows(0, len(windows), 0.2)]
    keep = ~special_token_mask(test, model).flatten()
    targets = {hook: sae.cfg.metadata.hook_name_out or hook for hook, sae in saes.items()}
    _, cache = model.run_with_cache(test, names_filter=[*saes, *targets.values()])
    for hook, sae in saes.items():
        acts = cache[hook].reshape(-1, sae.cfg.d_in)[keep]
        target = cache[targets[hook]].reshape(len(keep), -1)[keep]
        lam = rep.audits[0].layers[hook].lam
        assert lam == sae.cfg.metadata.training_architecture_details["l1_coefficient"]
        losses = {}
        with torch.no_grad():
            for side, s in (("before", sae), ("after", rep.saes[hook])):
                f = s.encode(acts)
                error = ((s(acts) - target) ** 2).sum(-1)  # forward: decode, and a skip transcoder's skip
                losses[side] = float((error + lam * (f * s.W_dec.norm(dim=1)).sum(-1)).double().mean())
        applied = [c["step"] for c in rep.changes[hook] if c["applied"]]
        print(f"{hook}: L {losses['before']:.5g} -> {losses['after']:.5g} on {len(acts)} unseen tokens; applied {applied}")
        assert losses["after"] < losses["before"]
        assert rep.table[hook]["before"]["L"] == pytest.approx(losses["before"], rel=1e-6)
        assert rep.table[hook]["after"]["L"] == pytest.approx(losses["after"], rel=1e-6)
        assert rep.table[hook]["change"]["L"] + 3 * rep.table[hook]["change"]["se"] < 0


def test_two_rounds_audit_the_repaired_sae_again_with_the_first_rounds_lam():
    world = Stationary(4)
    sae = world.sae()
    with torch.no_grad():
        sae.b_dec.add_(0.4 * world.outside[0])
        sae.W_dec[0] = math.cos(0.3) * world.atoms[0] + math.sin(0.3) * world.outside[1]
    rep = oh.repair_activations(sae, world.sample(6000), held_out=0.2,
                                repair_options=RepairOptions(audit_held_out=0.25, rounds=2))
    assert len(rep.audits) == 2 and rep.audits[1].layers["sae"].lam == rep.audits[0].layers["sae"].lam
    rounds = {s["round"] for s in rep.changes["sae"]}
    applied = [(s["round"], s["step"]) for s in rep.changes["sae"] if s["applied"]]
    print(f"applied (round, step): {applied}")
    assert rounds == {1, 2} and {name for _, name in applied} >= {"bias", "atoms"}
    second = rep.audits[1].layers["sae"]
    assert second.layer_conditions["C5"]["tier"] != "certified" or second.layer_conditions["C5"]["size"] < \
        rep.audits[0].layers["sae"].layer_conditions["C5"]["size"]
    assert rep.table["sae"]["change"]["L"] < 0


def test_window_clustered_standard_error_matches_brute_force():
    """Tokens of a window are not independent: the SE is the ratio estimator's over windows, and the
    sums merge exactly however the tokens are split."""
    from opt_hooks.policy import clustered_estimate
    from opt_hooks.theory.accumulator import Clustered

    gen = torch.Generator().manual_seed(3)
    windows = torch.arange(40).repeat_interleave(torch.randint(1, 9, (40,), generator=gen))
    values = torch.randn(len(windows), 2, generator=gen, dtype=torch.float64) + torch.randn(40, 2, generator=gen, dtype=torch.float64)[windows]
    whole, parts = Clustered(2), Clustered(2)
    whole.update(values, windows)
    cut = int((windows < 17).sum())
    parts.update(values[:cut], windows[:cut])
    other = Clustered(2)
    other.update(values[cut:], windows[cut:])
    parts.merge(other)
    for sums in (whole, parts):
        est = clustered_estimate(sums.total, sums.cluster_sq, sums.cluster_cross, float(sums.count_sq),
                                 int(sums.n_tokens), int(sums.n_windows))
        totals = torch.stack([values[windows == w].sum(0) for w in range(40)])
        counts = torch.stack([(windows == w).sum() for w in range(40)]).double()
        mean = values.sum(0) / len(values)
        se = torch.sqrt(40 / 39 * ((totals - counts[:, None] * mean) ** 2).sum(0)) / len(values)
        torch.testing.assert_close(est.mean, mean)
        torch.testing.assert_close(est.se, se)


def test_spliced_sae_is_repaired_from_its_own_input_as_the_plain_model_gives_it(tiny_model_cfg):
    """A HookedSAETransformer user's spliced SAE: the repair reads it at its own hook_sae_input, so
    repairing it gives what repairing the same SAE beside the plain model gives; the spliced SAE
    itself stays as it was."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformer

    hook = "blocks.1.hook_resid_pre"
    ids = torch.randint(0, tiny_model_cfg.d_vocab, (96, 16), generator=torch.Generator().manual_seed(0))
    plain = HookedTransformer(tiny_model_cfg).eval()
    acts = plain.run_with_cache(ids[:32], names_filter=[hook])[1][hook].reshape(-1, tiny_model_cfg.d_model)
    trained = train_sae("standard", acts, hook_name=hook, d_sae=24, steps=200, dtype="float32")
    with torch.no_grad():  # a bias defect for the repair to find
        trained.b_dec.add_(0.5 * acts.std(0))
    spliced_model = HookedSAETransformer(tiny_model_cfg).eval()
    spliced = SAEEdit(trained).sae
    spliced_model.add_sae(spliced)
    before = {k: v.clone() for k, v in spliced.state_dict().items()}
    reps = [oh.repair(m, sae, ids, n_tokens=ids.numel(), context_size=16, progress=False)
            for m, sae in ((plain, trained), (spliced_model, spliced))]
    print({s["step"]: s["applied"] for s in reps[0].changes[hook]}, reps[0].table[hook]["change"])
    assert any(s["applied"] for s in reps[0].changes[hook]) and reps[0].table == reps[1].table
    assert [s["applied"] for s in reps[0].changes[hook]] == [s["applied"] for s in reps[1].changes[hook]]
    assert all(torch.equal(v, before[k]) for k, v in spliced.state_dict().items())
