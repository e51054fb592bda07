"""The repair's decisions (docs/REPAIR.md, "The validation rule" and "The respawn step") against the
rule recomputed here from its definition: a step is kept when its validation change per token
satisfies change + z SE < 0, SE the clustered (ratio estimator over windows) standard error and
z = Phi^-1(1 - alpha / m), m the number of steps tested in the layer's chain (the merged-only version
is not one); a resampled latent alone is tested the same way at m = the number of resampled latents,
and needs `min_touched` tokens it changes.

The layers are real: a real repair run on a constructed SAE gives the layer's steps, chain and
resampled latents (its chain rebuilt with every step). Only the validation sums are planted, built
with the project's own accumulators (`VariantSums`, and `LatentChanges` fed with residuals and codes),
so that each step's and each latent's z-score is known by construction and can sit strictly between
two Bonferroni thresholds. The reference (mean, clustered SE, z, the decision) is computed here, with
`statistics.NormalDist`, from the per-token changes and their windows, not with the code under test."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

import opt_hooks as oh
from opt_hooks import repair_run
from opt_hooks.engine import AuditOptions
from opt_hooks.repair_run import RepairOptions
from opt_hooks.theory.repair_sums import VariantSums
from tests.test_verdicts import Stationary

POLICY = AuditOptions().policy


def critical(m: int) -> float:
    """Phi^-1(1 - alpha / m), the one-sided Bonferroni threshold, from the standard library."""
    return NormalDist().inv_cdf(1 - POLICY.alpha / m)


def between(m_low: int, m_high: int) -> float:
    """A z-score strictly between the thresholds for m_low and m_high tests (the midpoint)."""
    return (critical(m_low) + critical(m_high)) / 2


def clustered(values: torch.Tensor, windows: torch.Tensor) -> tuple[float, float]:
    """Brute force: the mean per token and its standard error over windows (the ratio estimator,
    var = W / (W - 1) sum_w (T_w - n_w mean)^2 / n^2), window by window."""
    n, mean = len(values), float(values.sum()) / len(values)
    ids = sorted(set(windows.tolist()))
    spread = sum((float(values[windows == w].sum()) - int((windows == w).sum()) * mean) ** 2 for w in ids)
    return mean, math.sqrt(len(ids) / (len(ids) - 1) * spread) / n


def kept(values: torch.Tensor, windows: torch.Tensor, m: int) -> bool:
    mean, se = clustered(values, windows)
    return mean + critical(m) * se < 0


def with_z_score(t: float, windows: torch.Tensor, fires: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-token changes, zero where `fires` is False, whose clustered z-score -mean / SE is t:
    zero-sum noise on the firing tokens plus a mean there. When every window has the same share of
    firing tokens, the mean moves every window's total by its share of the overall total, so the SE
    is the noise's alone and the mean sets t exactly (t = 0: a change that is pure noise)."""
    on = fires.double()
    noise = torch.randn(len(windows), generator=gen, dtype=torch.float64) * on
    noise[fires] -= noise[fires].mean()
    _, se = clustered(noise, windows)
    values = noise - t * se * len(windows) / int(fires.sum()) * on
    mean, se = clustered(values, windows)
    assert -mean / se == pytest.approx(t, abs=1e-9)  # planted as intended
    return values


def real_layer(sae, x, **audit_options) -> repair_run._LayerRepair:
    """The layer of a real repair run (as `_repair` makes it, its resampled latents fitted), its
    chain rebuilt with every step and latent the audit gave (whatever the run's own validation
    decided): the chain's names, references and resampled latents are the real ones."""
    made = []
    original = repair_run._LayerRepair.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repair_run._LayerRepair, "__init__", record)
        oh.repair_activations(sae, x, held_out=0.2, options=AuditOptions(**audit_options),
                              repair_options=RepairOptions(audit_held_out=0.25))
    layer = made[-1]
    layer.dropped, layer.dropped_plants, layer.changes, layer.pruned = set(), set(), {}, False
    layer.build()
    return layer


def defect_world(dead: int, codes_and_floor: bool):
    """Stationary SAE with `dead` dead latents (the last true features left in the residuals: C6,
    resampled), and optionally feature 0's codes 1.5 times too large (C4) and feature 1 never off (C1)."""
    world = Stationary(8)
    sae = world.sae()
    with torch.no_grad():
        for j in range(dead):
            sae.b_enc[world.k - 1 - j] = -100.0
        if codes_and_floor:
            sae.W_enc[:, 0] *= 1.5
            sae.b_enc[0] *= 1.5
            sae.b_enc[1] += 2.0
    return real_layer(sae, world.sample(8000), c3_tol=math.inf, c5_tol=math.inf)


def plant_variant_sums(layer, planted: dict[str, float], windows: torch.Tensor, gen: torch.Generator):
    """The chain's validation sums with each version's change against its reference planted at
    z-score planted[name] (None: exactly 0 on every token): every version's loss is its reference's
    plus that change."""
    n, names = len(windows), layer.names
    everywhere = torch.ones(n, dtype=torch.bool)
    changes = {name: torch.zeros(n, dtype=torch.float64) if planted[name] is None  # no token changed
               else with_z_score(planted[name], windows, everywhere, gen) for name in names[1:]}
    loss = torch.zeros(n, len(names), dtype=torch.float64)
    loss[:, 0] = 1 + torch.rand(n, generator=gen, dtype=torch.float64)
    for v, name in enumerate(names[1:], 1):
        loss[:, v] = loss[:, layer.reference[v]] + changes[name]
    sums = VariantSums(layer.reference, layer.view.d_sae, layer.view.d_out)
    zeros = torch.zeros_like(loss)
    sums.update(loss, loss, zeros, zeros, torch.zeros(len(names), layer.view.d_sae, dtype=torch.bool),
                torch.randn(n, layer.view.d_out, generator=gen, dtype=torch.float64), windows)
    return sums, changes


# -- the steps: Bonferroni over the tested steps --------------------------------------------------

STEP_CASES = {
    # floor: zero-mean noise, useless; codes: between the thresholds for 3 and 4 tested steps
    "useless floor, codes just past Bonferroni for the 3 tested steps":
        ({"floor": 0.0, "codes": between(3, 4), "merged": -1.0, "respawn": 6.0}, {"floor"}),
    # floor: between the thresholds for 2 and 3 steps; codes raises L by one SE
    "floor just short of Bonferroni for the 3 tested steps, codes raises L":
        ({"floor": between(2, 3), "codes": -1.0, "merged": 4.0, "respawn": 6.0}, {"floor", "codes"}),
    # floor changes no validation token at all (SE 0): no descent, so not kept
    "floor changes nothing": ({"floor": None, "codes": 5.0, "merged": None, "respawn": 6.0}, {"floor"}),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_a_step_is_kept_exactly_when_it_descends_at_bonferroni_over_the_tested_steps(case):
    """Chain base -> floor -> codes -> merged -> respawn: 3 tested steps (merged is not one, nor is
    the base). A step that is pure noise, raises L, or changes no token is dropped; one whose
    z-score lies between the thresholds for 3 and for 4 or 5 tests is kept, and one between those
    for 2 and 3 dropped, as the rule with m = 3 says. The merged-only version is measured and
    recorded but never dropped."""
    layer = defect_world(dead=1, codes_and_floor=True)
    assert layer.names == ["base", "floor", "codes", "merged", "respawn"]  # the real chain of that SAE
    planted, expected_dropped = STEP_CASES[case]
    gen = torch.Generator().manual_seed(5)
    windows = torch.arange(200).repeat_interleave(torch.randint(1, 9, (200,), generator=gen))
    layer.sums, changes = plant_variant_sums(layer, planted, windows, gen)

    m = 3  # floor, codes, respawn
    rebuild = layer.decide(POLICY)

    reference = {name: kept(values, windows, m) for name, values in changes.items()}
    assert {name for name in ("floor", "codes") if not reference[name]} == expected_dropped  # planted as said
    for name, values in changes.items():
        mean, se = clustered(values, windows)
        record = layer.changes[name]
        print(f"{name}: mean {mean:.4g} ± {se:.3g} (z threshold {critical(m):.4f}), significant {record['significant']}")
        assert record["significant"] == reference[name], name
        assert record["gain"] == pytest.approx(-mean, rel=1e-9) and record["se"] == pytest.approx(se, rel=1e-9)
        p = NormalDist().cdf(mean / se) if se > 0 else float(mean >= 0)  # SE 0: exact (THEORY.md 3.3)
        assert record["p_value"] == pytest.approx(p, rel=1e-6)
        assert record["n_tokens"] == len(windows)
    assert layer.dropped == expected_dropped and rebuild
    assert not layer.pruned and not layer.dropped_plants  # respawn held as a whole


# -- the resampled latents: Bonferroni over the layer's resampled latents ---------------------------

EVERY_WINDOW = {14: [0, 1], 15: [1, 2, 3]}  # positions in each 6-token window where the latent fires

PLANT_CASES = {
    # 14 between the thresholds for 2 and 3 latents, 15 pure noise: 15 alone is pruned
    "one latent holds alone, the other is noise":
        ({"respawn": 1.0, 14: between(2, 3), 15: 0.0}, None, {15}),
    # both descend clearly; 14 changes exactly min_touched tokens, 15 one fewer: 15 alone is pruned
    "min_touched tokens changed, and one fewer":
        ({"respawn": 1.0, 14: 5.0, 15: 5.0}, {14: POLICY.min_touched, 15: POLICY.min_touched - 1}, {15}),
    # neither holds alone (14 between the thresholds for 1 and 2 latents): the step is declined whole
    "neither latent holds alone":
        ({"respawn": 1.0, 14: between(1, 2), 15: -1.0}, None, {14, 15}),
    # the step holds as a whole: it keeps all its latents, the noisy one included
    "the step holds as a whole":
        ({"respawn": 6.0, 14: between(2, 3), 15: 0.0}, None, {15}),
}


def plant_latent_changes(layer, planted: dict[int, float], touched: dict[int, int] | None,
                         windows: torch.Tensor, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Feed the layer's own `LatentChanges` (its real resampled atoms a_k) with residuals r and codes:
    each latent's code z_k > 0 where it fires (in every window, or in the first touched[k] windows),
    0 elsewhere and before (the latents were dead), and r chosen so that its change
    ||r - z_k a_k||^2 - ||r||^2 + lam z_k has the planted z-score (or, for `touched`, a clear descent).
    Returns each latent's per-token change recomputed here from r and the codes."""
    ids = layer.plant_ids.tolist()
    atoms = layer.plant_sums.new_atoms  # (R, d)
    n, lam = len(windows), layer.lam
    position = torch.arange(n) % 6
    codes = torch.zeros(n, len(ids), dtype=torch.float64)
    targets = torch.zeros(n, len(ids), dtype=torch.float64)
    for k, feature in enumerate(ids):
        if touched is None:
            fires = torch.isin(position, torch.tensor(EVERY_WINDOW[feature]))
            targets[:, k] = with_z_score(planted[feature], windows, fires, gen)
        else:
            fires = (position == k) & (windows < touched[feature])
            targets[:, k] = fires.double() * (-1 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64))
        codes[:, k] = fires.double() * (0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
    # <r, a_k> = q_k gives the change z_k^2 - 2 z_k q_k + lam z_k: solve for q, then r in the atoms' span
    safe = torch.where(codes > 0, codes, 1.0)
    q = torch.where(codes > 0, (codes**2 + lam * codes - targets) / (2 * safe), 0.0)
    r = q @ torch.linalg.solve(atoms @ atoms.T, atoms)
    layer.plant_sums.update(r, torch.zeros_like(codes), codes, None, lam, windows)
    return {feature: ((r - codes[:, k:k + 1] * atoms[k]) ** 2).sum(-1) - (r**2).sum(-1) + lam * codes[:, k]
            for k, feature in enumerate(ids)}


@pytest.mark.parametrize("case", list(PLANT_CASES))
def test_resampled_latents_are_pruned_exactly_where_each_fails_its_own_test(case):
    """Chain base -> merged -> respawn with 2 resampled latents (two dead latents, C6). When the
    respawn step does not hold as a whole, each latent is tested alone at Bonferroni over the 2
    latents, needing min_touched changed tokens: the ones that fail are pruned (the chain rebuilt
    with the others), or the step is declined when none holds. A step that holds keeps them all."""
    layer = defect_world(dead=2, codes_and_floor=False)
    assert layer.names == ["base", "merged", "respawn"] and layer.plant_ids.tolist() == [14, 15]
    planted, touched, intended_weak = PLANT_CASES[case]
    gen = torch.Generator().manual_seed(6)
    windows = torch.arange(100).repeat_interleave(6)  # 6 tokens a window: every window fires alike
    layer.sums, steps = plant_variant_sums(layer, {"merged": -2.0, "respawn": planted["respawn"]}, windows, gen)
    latents = plant_latent_changes(layer, planted, touched, windows, gen)

    rebuild = layer.decide(POLICY)

    respawn_holds = kept(steps["respawn"], windows, 1)  # the one tested step
    weak = set()
    for feature, values in latents.items():
        mean, se = clustered(values, windows)
        changed = int((values != 0).sum())
        record = next(p for p in layer.plants if p["feature"] == feature)
        print(f"latent {feature}: z {-mean / se:.4f} (threshold {critical(2):.4f}) on {changed} tokens; "
              f"recorded gain {record['gain']:.4g} ± {record['se']:.3g}")
        if not (changed >= POLICY.min_touched and mean + critical(2) * se < 0):
            weak.add(feature)
        assert record["gain"] == pytest.approx(-mean, rel=1e-9) and record["se"] == pytest.approx(se, rel=1e-9)
    assert weak == intended_weak and respawn_holds == (planted["respawn"] > critical(1))  # planted as said
    assert layer.changes["respawn"]["significant"] == respawn_holds
    if respawn_holds:
        assert not layer.dropped and not layer.dropped_plants and not layer.pruned and not rebuild
    elif weak != {14, 15}:
        assert layer.dropped_plants == weak and layer.pruned and "respawn" not in layer.dropped and rebuild
        layer.build()  # what the next validation pass measures: the latents that held up alone
        assert layer.names == ["base", "merged", "respawn"] and set(layer.plant_ids.tolist()) == {14, 15} - weak
    else:
        assert "respawn" in layer.dropped and not layer.dropped_plants and rebuild
