"""The verdict policy end to end, calibrated in both directions (THEORY.md section 3): on SAEs
where nothing is wrong it certifies (almost) nothing, on planted defects it certifies them, first,
with the measured gain; and the layer gaps of section 5 against brute force."""
from __future__ import annotations

import functools
import math

import pytest
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata
from scipy import stats

import opt_hooks as oh
from opt_hooks.adapters.sae import SAEView
from opt_hooks.run import held_out_windows
from opt_hooks.engine import AuditOptions, LayerAudit, TokenSample
from opt_hooks.report.html import render_html
from opt_hooks.theory.objective import residuals, token_losses
from opt_hooks.theory.reference import nonneg_lasso

LAM = 0.4
D_IN, K = 24, 16
HELD_OUT = 0.25


def amplitudes(n: int, k: int, p: float, gen: torch.Generator) -> torch.Tensor:
    on = torch.rand(n, k, generator=gen) < p
    return on * (1 + torch.rand(n, k, generator=gen, dtype=torch.float64)) + 0.1 * torch.randn(
        n, k, generator=gen, dtype=torch.float64)


@functools.lru_cache
def population_shift(p: float) -> float:
    """beta with E[min(a - beta, lam/2)] = 0 for one feature's amplitude a (a 2M-sample estimate;
    its error, about 1e-4, is far below what a test's few thousand tokens can see)."""
    big = amplitudes(2_000_000, 1, p, torch.Generator().manual_seed(12345)).flatten()
    low, high = -1.0, 1.0  # the expectation falls as beta grows: bisection
    for _ in range(40):
        beta = (low + high) / 2
        low, high = (beta, high) if float(torch.clamp(big - beta, max=LAM / 2).mean()) > 0 else (low, beta)
    return beta


class Stationary:
    """An SAE at an exact stationary point of its population objective: orthonormal atoms,
    independent features x = sum_k a_k d_k + c + noise (a_k = on_k * U(1, 2) + N(0, 0.1^2),
    noise outside the span), an encoder giving the exact L1 codes relu(<d_k, x - b> - lam/2),
    and the bias b = c + beta sum_k d_k with beta solving E[min(a - beta, lam/2)] = 0, so that
    the population mean residual is 0. Then C3, C4 and C5 hold in the population, C4 exactly
    on every token, and no feature is dense or dead."""

    def __init__(self, seed: int, d_in: int = D_IN, k: int = K, p: float = 0.3) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=self.gen, dtype=torch.float64))[0].T
        self.atoms, self.outside = basis[:k], basis[k:]
        self.offset = 0.5 * torch.randn(d_in, generator=self.gen, dtype=torch.float64)
        self.p, self.k = p, k
        self.bias = self.offset + population_shift(p) * self.atoms.sum(0)

    def amplitudes(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return amplitudes(n, self.k, self.p, gen)

    def sample(self, n: int) -> torch.Tensor:
        noise = 0.1 * torch.randn(n, len(self.outside), generator=self.gen, dtype=torch.float64) @ self.outside
        return self.amplitudes(n, self.gen) @ self.atoms + self.offset + noise

    def sae(self, decoder: torch.Tensor | None = None) -> sae_lens.StandardTrainingSAE:
        sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
            d_in=self.atoms.shape[1], d_sae=self.k, l1_coefficient=LAM, dtype="float64",
            metadata=SAEMetadata(hook_name="sae")))
        with torch.no_grad():
            sae.W_enc.copy_(self.atoms.T)
            sae.b_enc.fill_(-LAM / 2)
            sae.b_dec.copy_(self.bias)
            sae.W_dec.copy_(self.atoms if decoder is None else decoder)
        return sae


def certified_findings(layer) -> int:
    return (layer.tier_counts()["certified"] + sum(p.tier == "certified" for p in layer.pairs)
            + sum(c["tier"] == "certified" for c in layer.layer_conditions.values()))


def test_stationary_sae_codes_are_exact():
    world = Stationary(0)
    x = world.sample(2000)
    layer = oh.audit_activations(world.sae(), x, held_out=HELD_OUT).layers["sae"]
    assert layer.scope == "L1 objective (exact)" and layer.lam == LAM
    assert max(f.c4_size for f in layer.features) < 1e-3  # every active atom sees lam/2
    assert layer.gaps["codes"]["gain"] == pytest.approx(0, abs=1e-9)  # the exact codes are the SAE's
    assert layer.pairs == [] and layer.dead_features == []


def test_calibration_nothing_wrong_certifies_at_most_five_percent_of_audits():
    """20 seeds, fresh tokens each: every audit with any certified finding counts against the
    policy; at alpha = 0.05 with Bonferroni, at most 1 of 20 may have one."""
    flagged, violated = [], 0
    for seed in range(20):
        world = Stationary(seed)
        layer = oh.audit_activations(world.sae(), world.sample(4000), held_out=HELD_OUT).layers["sae"]
        violated += layer.tier_counts()["violated"]
        if certified_findings(layer):
            flagged.append(seed)
    print(f"audits with a certified finding: {flagged} of 20; violated feature rows: {violated}")
    assert violated > 0, "nothing even descended on the audit tokens: the test would be vacuous"
    assert len(flagged) <= 1, flagged


def test_planted_decoder_defect_is_certified_first_with_its_gain():
    """One decoder row rotated out of the span by 0.3 rad (the encoder unchanged): C3 certifies
    it, it is first in flagged(), and its held-out gain is within 10% of the exact cost of the
    defect on the held-out tokens (L with the defect minus L without, same codes)."""
    world = Stationary(3)
    angle = 0.3
    decoder = world.atoms.clone()
    decoder[0] = math.cos(angle) * world.atoms[0] + math.sin(angle) * world.outside[0]
    x = world.sample(8000)
    layer = oh.audit_activations(world.sae(decoder), x, held_out=HELD_OUT).layers["sae"]
    assert layer.flagged()[0] == 0
    feature = layer.feature(0)
    assert feature.tier == "certified" and feature.conditions[0] == "C3"
    held = held_out_windows(0, len(x), HELD_OUT)
    xh = x[held]
    z = torch.relu((xh - world.bias) @ world.atoms.T - LAM / 2)
    cost = float((token_losses(xh, decoder, z, world.bias, LAM) - token_losses(xh, world.atoms, z, world.bias, LAM)).mean())
    print(f"held-out gain {feature.gain:.5g} ± {feature.gain_se:.2g}, exact cost of the defect {cost:.5g}")
    assert feature.gain == pytest.approx(cost, rel=0.10)
    assert feature.certificates["C3"].step == pytest.approx(angle, rel=0.05)  # it turns the row back


def test_shrink_on_audit_grow_on_held_out_is_not_certified():
    """The audit tokens' codes are too large (shrink feature 0), the held-out tokens' too small
    (grow): the fixed C4 rule chosen on the audit tokens raises L held out and is not certified."""
    world = Stationary(1)
    x = world.sample(6000)
    held = held_out_windows(0, len(x), HELD_OUT)
    z = torch.relu((x - world.bias) @ world.atoms.T - LAM / 2)
    z[~held, 0] *= 1.3
    z[held, 0] *= 0.7
    audit = LayerAudit(world.atoms, world.bias, lam=LAM)
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    check = plan.result().feature(0).certificates["C4"]
    assert check.step < 0 and check.measured < 0  # shrink, and it descends on the audit tokens
    assert check.held_out > 0 and check.tier == "violated"


def test_zipf_frequencies_certify_no_pair():
    """Independent features, Zipf firing rates (many on 1-10 tokens): chance co-activations of
    rare features break C2, but none is certified."""
    k, n = 200, 4000
    gen = torch.Generator().manual_seed(7)
    atoms = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0].T
    rate = 0.3 / torch.arange(1, k + 1, dtype=torch.float64)
    amplitude = (torch.rand(n, k, generator=gen, dtype=torch.float64) < rate) * (
        1 + torch.rand(n, k, generator=gen, dtype=torch.float64))
    x = amplitude @ atoms + 0.05 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    z = torch.relu(x @ atoms.T - LAM / 2)
    held = held_out_windows(0, n, HELD_OUT)
    audit = LayerAudit(atoms, torch.zeros(k, dtype=torch.float64), lam=LAM)
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    layer = plan.result()
    rare = sum(1 for f in layer.features if 1 <= f.active_count <= 10)
    print(f"{rare} features on 1-10 audit tokens; {len(layer.pairs)} C2 violations")
    assert rare >= 50 and len(layer.pairs) > 0, "no chance violation: the test would be vacuous"
    assert not [p for p in layer.pairs if p.tier == "certified"]


def test_topk_sae_without_lam_audits_the_lam_free_conditions():
    world = Stationary(2)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=K, k=4, dtype="float64",
                                                  metadata=SAEMetadata(hook_name="sae")))
    with torch.no_grad():  # codes larger than the least-squares ones: 2 <d_i, r> < 0 on active codes
        sae.W_enc.copy_(1.5 * world.atoms.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(world.bias)
        sae.W_dec.copy_(world.atoms)
    layer = oh.audit_activations(sae, world.sample(3000), held_out=HELD_OUT).layers["sae"]
    assert layer.scope == "L1 surrogate (topk)" and layer.lam is None
    assert {"C4", "C6"} <= set(layer.skipped) and "cannot estimate lam" in layer.skipped["C4"]
    assert all("C4" not in f.certificates for f in layer.features)
    assert any("C3" in f.certificates for f in layer.features)
    assert layer.layer_conditions["C5"]["certificate"] is not None and "codes" not in layer.gaps
    assert layer.objective["l1"] is None and layer.objective["L"] == layer.objective["mse"]


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_normalising_sae_is_audited_on_its_own_training_loss(mode):
    """The audited held-out L of a normalising SAE is sae_lens' own training loss on the same
    tokens (training_forward_pass: de-normalised squared error plus l1_coefficient sum f ||W_dec||),
    not the unweighted objective of the normalised activations."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_training import train_sae

    gen = torch.Generator().manual_seed(6)
    n = 1600
    scale = 3 * torch.exp(0.7 * torch.randn(n, 1, generator=gen, dtype=torch.float64))  # token norms vary 10x
    acts = scale * (amplitudes(n, D_IN, 0.2, gen) + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    sae = train_sae("standard", acts, hook_name="sae", d_sae=K, steps=60, normalize_activations=mode)
    result = oh.audit_activations(sae, acts, held_out=HELD_OUT)
    layer = result.layers["sae"]
    held = held_out_windows(0, n, HELD_OUT)
    with torch.no_grad():
        output = sae.training_forward_pass(TrainStepInput(
            sae_in=acts[held], coefficients={"l1": sae.cfg.l1_coefficient}, dead_neuron_mask=None,
            n_training_steps=0, is_logging_step=False))
    # layer_norm: sae_lens' error is s_n r_n + eps x_norm (eps = 1e-5), a few eps / s_n off w_n r_n
    rtol = 1e-4 if mode == "layer_norm" else 1e-10
    assert layer.n_held_out == int(held.sum()) and layer.lam == sae.cfg.l1_coefficient
    assert layer.objective["L"] == pytest.approx(float(output.loss), rel=rtol)
    assert layer.objective["mse"] == pytest.approx(float(output.losses["mse_loss"]), rel=rtol)
    assert any("weighted by w_n" in note for note in layer.notes)
    assert layer.layer_conditions["C6"]["worst_weighted"] and "w ||r|| = " in render_html(result)
    view = SAEView(sae)  # the unweighted objective of the same codes is far from the training loss
    x, z, _ = view.encode(acts[held])
    unweighted = token_losses(x, view.atoms(), z, view.bias(), layer.lam).mean()
    assert abs(float(unweighted) / float(output.loss) - 1) > 0.2


@pytest.mark.parametrize("weighted", [False, True])
def test_code_gap_equals_a_brute_force_lasso_solve(weighted):
    gen = torch.Generator().manual_seed(4)
    d, k, n = 8, 12, 1200
    atoms = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    bias = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.relu(torch.randn(n, k, generator=gen, dtype=torch.float64) - 0.5) @ atoms + bias + 0.05 * torch.randn(
        n, d, generator=gen, dtype=torch.float64)
    z = torch.relu((x - bias) @ atoms.T - 0.2)  # a tied encoder: far from the exact codes
    # weighted: token n's problem is the lasso with lam / w_n; three weights, so three reference solves
    levels = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    w = levels[torch.randint(0, 3, (n,), generator=gen)] if weighted else None
    held = held_out_windows(0, n, HELD_OUT)
    options = AuditOptions(code_gap_tokens=200, code_gap_max_iter=20_000, code_gap_tol=1e-14)
    audit = LayerAudit(atoms, bias, lam=0.2, options=options)
    audit.update(x[~held], z[~held], weight=None if w is None else w[~held])
    plan = audit.plan()
    plan.update(x, z, torch.arange(n), held_out=held, weight=w)
    layer = plan.result()
    gap = layer.gaps["codes"]
    assert gap["share"] == pytest.approx(gap["gain"] / layer.objective["L"], rel=1e-12)  # of the held-out L
    candidates = torch.nonzero(held).flatten()  # the sample: the held-out tokens whose index hashes lowest
    sample = candidates[torch.argsort(TokenSample.key(candidates))[:200]]
    w_sample = torch.ones(200, dtype=torch.float64) if w is None else w[sample]
    exact = torch.zeros(200, k, dtype=torch.float64)
    for level in torch.unique(w_sample):
        rows = w_sample == level
        exact[rows] = nonneg_lasso(x[sample][rows], atoms, bias, 0.2 / float(level), iters=20_000)
    weight = None if w is None else w_sample
    gains = token_losses(x[sample], atoms, z[sample], bias, 0.2, weight) - token_losses(x[sample], atoms, exact, bias, 0.2, weight)
    assert gap["n_tokens"] == 200 and gap["converged"]
    assert gap["gain"] == pytest.approx(float(gains.mean()), rel=1e-6)
    assert gap["se"] == pytest.approx(float(gains.std() / math.sqrt(200)), rel=1e-4)
    assert gap["l0_after"] == pytest.approx(float((exact > 1e-9).sum(1).double().mean()), abs=0.05)
    assert gap["l0_after"] < gap["l0_before"]


def test_standard_error_and_p_value_against_a_direct_computation():
    world = Stationary(5)
    x = world.sample(3000)
    z = torch.relu((x - world.bias) @ world.atoms.T - LAM / 2)
    bias = world.bias + 0.1 * world.outside[0]  # a bias off by the noise scale, outside the span
    held = held_out_windows(0, len(x), HELD_OUT)
    audit = LayerAudit(world.atoms, bias, lam=LAM)
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    check = plan.result().layer_conditions["C5"]["certificate"]
    family = plan.families["C5"]
    xh, zh = x[held], z[held]
    atoms2, z2, bias2 = family.apply(0, world.atoms, zh, bias, residuals(xh, world.atoms, zh, bias), LAM)
    per_token = token_losses(xh, atoms2, z2, bias2, LAM) - token_losses(xh, world.atoms, zh, bias, LAM)
    se = float(per_token.std() / math.sqrt(len(per_token)))
    assert check.held_out == pytest.approx(float(per_token.mean()), rel=1e-9)
    assert check.held_out_se == pytest.approx(se, rel=1e-6)
    assert check.p_value == pytest.approx(float(stats.norm.cdf(check.held_out / se)), rel=1e-6)
    assert check.tier == "certified" and check.p_value < 1e-6, check


def test_the_pair_cap_keeps_the_largest_margins():
    from test_audit_side import LAM as PAIR_LAM, mixed_case

    x, atoms, z, bias = mixed_case()

    def plan(max_pairs):
        audit = LayerAudit(atoms, bias, lam=PAIR_LAM, options=AuditOptions(max_pairs=max_pairs))
        audit.update(x, z)
        return audit.plan()

    every, capped = plan(None), plan(2)
    margins = every.pairs.margin
    kept = capped.pair_order.tolist()
    assert len(kept) == 2 and len(every.pair_order) == len(margins) > 2
    assert sorted(margins[kept].tolist()) == sorted(margins.sort(descending=True).values[:2].tolist())
    layer = capped.result()
    assert len(layer.pairs) == 2 and any("max_pairs" in note for note in layer.notes)


def test_bad_token_weights_are_refused():
    atoms = torch.eye(3, dtype=torch.float64)
    audit = LayerAudit(atoms, torch.zeros(3, dtype=torch.float64), lam=0.1)
    x, z = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="token weights must be finite and > 0"):
        audit.update(x, z, weight=torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight must be \(2,\)"):
        audit.update(x, z, weight=torch.ones(3, dtype=torch.float64))
    assert audit.n_tokens == 0


def test_held_out_standard_error_is_over_windows():
    """Tokens of one window share a context: a certificate's held-out SE is the ratio estimator's
    over windows (brute force here), not the independent-token one, and any split of the windows
    into batches gives the same sums."""
    world = Stationary(5)
    n, size = 6000, 12
    x = world.sample(n)
    window = torch.arange(n) // size
    gen = torch.Generator().manual_seed(0)
    x = x + 0.3 * torch.randn(n // size, 1, generator=gen, dtype=torch.float64)[window] * world.outside[1]  # shared per window
    bias = world.bias + 0.2 * world.outside[0]  # a C5 defect
    z = torch.relu((x - bias) @ world.atoms.T - LAM / 2)
    held = held_out_windows(0, n // size, HELD_OUT).repeat_interleave(size)
    audit = LayerAudit(world.atoms, bias, lam=LAM)
    audit.update(x[~held], z[~held])
    results = []
    for cuts in ([n], [1200, 3600, n]):
        plan = audit.plan()
        start = 0
        for stop in cuts:
            sl = slice(start, stop)
            plan.update(x[sl], z[sl], held_out=held[sl], window=window[sl])
            start = stop
        results.append(plan.result())
    check = results[0].layer_conditions["C5"]["certificate"]
    assert check.held_out_se == pytest.approx(results[1].layer_conditions["C5"]["certificate"].held_out_se, rel=1e-12)
    family = audit.plan().families["C5"]
    step = float(family.step[0])
    r = (x - bias - z @ world.atoms)[held]
    change = -2 * step * (r @ family.direction.double()) + step**2
    totals = torch.zeros(n // size, dtype=torch.float64).index_add_(0, window[held], change)[held_out_windows(0, n // size, HELD_OUT)]
    mean = float(change.mean())
    windows_held = len(totals)
    se = math.sqrt(windows_held / (windows_held - 1) * float(((totals - size * mean) ** 2).sum())) / len(change)
    token_se = float(change.std() / math.sqrt(len(change)))
    print(f"C5 held-out change {mean:.5g}: SE over windows {se:.3g}, as if tokens were independent {token_se:.3g}")
    assert check.held_out == pytest.approx(mean, rel=1e-9)
    assert check.held_out_se == pytest.approx(se, rel=1e-9)
    assert se > 1.5 * token_se  # the shared offsets make windows, not tokens, the unit
    gap = results[0].gaps["codes"]  # its sample is spread over the held-out windows, its SE over them
    assert gap["n_tokens"] == 128 and gap["n_windows"] > 50
    assert results[1].gaps["codes"]["gain"] == pytest.approx(gap["gain"], rel=1e-9)
