"""Planted synthetic worlds for the validation study (scripts/validate_theory.py,
tests/test_validation.py, docs/VALIDATION.md).

A world is a sae_lens.synthetic FeatureDictionary and ActivationGenerator whose structure is
known: strict hierarchies (HierarchyNode), independent features, Gaussian-copula correlated
pairs, "leaky" near-hierarchies, always-on and never-firing features. Knowing the truth lets
every C2 flag be sorted into "planted hierarchy" or "false flag".

`ground_truth_audit` audits the ground-truth dictionary itself: codes and bias solved exactly
(float64) for the L1 objective by `theory.reference`, then `engine.LayerAudit`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    HierarchyNode,
    create_correlation_matrix_from_correlations,
    hierarchy_modifier,
    init_sae_to_match_feature_dict,
)
from torch import Tensor

from opt_hooks.run import held_out_windows
from opt_hooks.engine import LayerAudit
from opt_hooks.records import LayerResult
from opt_hooks.theory.reference import codes_and_bias, nonneg_lasso

MAGNITUDE_STD = 0.15  # firing magnitudes ~ relu(N(1, 0.15)): never near the shrinkage lam/2
LEAK_RATE = 0.05  # a leaky child fires alone on this share of the tokens where its parent is off
WEAK_LEAK = 0.05  # amplitude of the weak leaks: below lam/2 for every lam > 0.1


@dataclass
class World:
    """A synthetic world and the ground truth of its structure (feature indices)."""

    name: str
    feature_dict: FeatureDictionary
    generator: ActivationGenerator
    hierarchies: list[tuple[int, list[int]]] = field(default_factory=list)  # (parent, children), strict
    independent: list[int] = field(default_factory=list)
    correlated: list[tuple[int, int, float]] = field(default_factory=list)  # copula correlation
    leaky: list[tuple[int, int, float]] = field(default_factory=list)  # (parent, child, amplitude alone)
    dense: list[int] = field(default_factory=list)  # fire on every token
    dead: list[int] = field(default_factory=list)  # never fire

    @property
    def n_features(self) -> int:
        return self.feature_dict.num_features

    @property
    def atoms(self) -> Tensor:
        """(K, d) float64 unit rows: the ground-truth dictionary."""
        vectors = self.feature_dict.feature_vectors.detach().double()
        return vectors / vectors.norm(dim=1, keepdim=True)

    @property
    def planted(self) -> list[tuple[int, int]]:
        """Every (parent, child) of a strict hierarchy: the pairs C2 must flag."""
        return [(parent, child) for parent, children in self.hierarchies for child in children]

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(feature activations, x), both float64 (n, K) and (n, d). The generator draws from
        torch's global RNG, so it is seeded inside a forked RNG state."""
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            acts = self.generator.sample(n).double()
        bias = self.feature_dict.bias.detach().double()
        return acts, acts @ self.feature_dict.feature_vectors.detach().double() + bias


def _generator(
    n_features: int,
    firing: dict[int, float],
    *,
    roots: Sequence[HierarchyNode] = (),
    correlated: Sequence[tuple[int, int, float]] = (),
    leaky: Sequence[tuple[int, int, float]] = (),
    default_firing: float = 0.1,
) -> ActivationGenerator:
    probabilities = torch.full((n_features,), default_firing)
    for feature, p in firing.items():
        probabilities[feature] = p
    modifiers: list[Callable[[Tensor], Tensor]] = [hierarchy_modifier(list(roots))] if roots else []
    if leaky:
        modifiers.append(_leaks(leaky))
    correlation = (
        create_correlation_matrix_from_correlations(n_features, {(i, j): c for i, j, c in correlated})
        if correlated else None
    )
    return ActivationGenerator(
        n_features, probabilities, std_firing_magnitudes=MAGNITUDE_STD, mean_firing_magnitudes=1.0,
        modify_activations=modifiers or None, correlation_matrix=correlation,
    )


def _leaks(leaky: Sequence[tuple[int, int, float]]) -> Callable[[Tensor], Tensor]:
    """After the hierarchy has gated each child, let it also fire alone (on a share LEAK_RATE
    of the tokens where its parent is off) at a fixed amplitude: a near-hierarchy."""

    def leak(acts: Tensor) -> Tensor:
        for parent, child, amplitude in leaky:
            alone = (acts[:, parent] == 0) & (torch.rand(acts.shape[0], device=acts.device) < LEAK_RATE)
            acts[alone, child] = amplitude
        return acts

    return leak


def mixed_world(seed: int = 0, d: int = 32) -> World:
    """24 features: three strict hierarchies (2 mutually exclusive children, 3 free children,
    4 mutually exclusive children), 4 independent features, 2 copula-correlated pairs (0.6,
    0.9), and 2 leaky near-hierarchies whose child also fires alone, weakly (amplitude
    WEAK_LEAK) or at full size (1.0).

    d >= 24 gives near-orthogonal atoms; d < 24 puts the features in superposition."""
    hierarchies = [(0, [1, 2]), (3, [4, 5, 6]), (7, [8, 9, 10, 11])]
    exclusive = {0: True, 3: False, 7: True}
    leaky = [(20, 21, WEAK_LEAK), (22, 23, 1.0)]
    roots = [
        HierarchyNode(parent, [HierarchyNode(c) for c in children], mutually_exclusive_children=exclusive[parent])
        for parent, children in hierarchies
    ] + [HierarchyNode(parent, [HierarchyNode(child)]) for parent, child, _ in leaky]
    parents = [p for p, _ in hierarchies] + [p for p, _, _ in leaky]
    children = [c for _, cs in hierarchies for c in cs] + [c for _, c, _ in leaky]
    # A child's probability is before gating: it fires on about half of its parent's tokens.
    firing = {**{p: 0.2 for p in parents}, **{c: 0.5 for c in children}}
    correlated = [(16, 17, 0.6), (18, 19, 0.9)]
    generator = _generator(24, firing, roots=roots, correlated=correlated, leaky=leaky)
    return World(
        name=f"mixed, d={d}", feature_dict=FeatureDictionary(24, d, bias=True, seed=seed), generator=generator,
        hierarchies=hierarchies, independent=[12, 13, 14, 15], correlated=correlated, leaky=leaky,
    )


def dense_dead_world(seed: int = 0, d: int = 32) -> World:
    """12 features: feature 0 fires on every token, feature 1 never, 2..11 independently."""
    generator = _generator(12, {0: 1.0, 1: 0.0}, default_firing=0.15)
    return World(
        name="dense + dead", feature_dict=FeatureDictionary(12, d, bias=True, seed=seed), generator=generator,
        independent=list(range(2, 12)), dense=[0], dead=[1],
    )


def one_per_token_world(seed: int = 0, d: int = 32) -> World:
    """12 features, at most one active per token (mutually exclusive children of an
    organisational root node); feature 11 never fires."""
    root = HierarchyNode(None, [HierarchyNode(f) for f in range(11)], mutually_exclusive_children=True)
    generator = _generator(12, {11: 0.0}, roots=[root], default_firing=0.15)
    return World(
        name="one feature per token + dead", feature_dict=FeatureDictionary(12, d, bias=True, seed=seed),
        generator=generator, dead=[11],
    )


# -- auditing the ground-truth dictionary ------------------------------------------------------


@dataclass
class GroundTruthAudit:
    layer: LayerResult
    bias: Tensor  # (d,) the bias the codes were solved for
    acts: Tensor  # (n, K) true feature activations
    z: Tensor  # (n, K) exact L1 codes, audit and held-out tokens
    held: Tensor  # (n,) bool, held-out tokens


def ground_truth_audit(
    world: World, lam: float, *, n_audit: int, n_held_out: int, seed: int, bias: Tensor | None = None
) -> GroundTruthAudit:
    """Audit the ground-truth dictionary with exact L1 codes (float64).

    The bias is the exact optimum on the audit tokens (solved jointly with their codes) unless
    `bias` is given; held-out codes are then the exact codes for that same bias, as an encoder
    would produce them. Held-out tokens are spread through the sample the way
    `audit_activations` spreads them."""
    n = n_audit + n_held_out
    acts, x = world.sample(n, seed)
    held = held_out_windows(0, n, n_held_out / n)
    atoms = world.atoms
    if bias is None:
        z_audit, bias = codes_and_bias(x[~held], atoms, lam)
    else:
        z_audit = nonneg_lasso(x[~held], atoms, bias, lam)
    z = torch.zeros(n, world.n_features, dtype=torch.float64)
    z[~held], z[held] = z_audit, nonneg_lasso(x[held], atoms, bias, lam)
    audit = LayerAudit(atoms, bias, lam=lam, hook_name=world.name)
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    return GroundTruthAudit(plan.result(), bias, acts, z, held)


def standard_sae(
    world: World, l1: float, seed: int, *, d_sae: int | None = None, init: GroundTruthAudit | None = None
) -> StandardTrainingSAE:
    """A fresh StandardTrainingSAE for the world (seeded). With `init` it starts as the ground
    truth's exact encoder: W_dec = W_enc^T = the true atoms, b_dec = the exact bias and
    b_enc = -l1/2, i.e. soft thresholding, which gives the exact L1 codes of a near-orthogonal
    dictionary when l1 is the lam `init` was solved for."""
    torch.manual_seed(seed)
    cfg = StandardTrainingSAEConfig(
        d_in=world.feature_dict.hidden_dim, d_sae=d_sae or world.n_features, l1_coefficient=l1,
        metadata=SAEMetadata(hook_name="synthetic"),
    )
    sae = StandardTrainingSAE(cfg)
    if init is not None:
        init_sae_to_match_feature_dict(sae, world.feature_dict)
        with torch.no_grad():
            sae.b_dec.copy_(init.bias)
            sae.b_enc.fill_(-l1 / 2)
    return sae


# -- sorting the flags by ground truth ---------------------------------------------------------


@dataclass
class PairTally:
    """C2 flags of one audit, sorted by what the world planted (counts of ordered pairs)."""

    planted: int
    planted_flagged: int
    planted_certified: int
    flags: dict[str, int]  # by category of the pair (see `pair_category`)
    certified: dict[str, int]

    @property
    def n_flags(self) -> int:
        return sum(self.flags.values())

    @property
    def n_certified(self) -> int:
        return sum(self.certified.values())


def pair_category(world: World, i: int, j: int) -> str:
    """What the ground truth says about the ordered pair (i, j), for a C2 hierarchy flag."""
    if (i, j) in world.planted:
        return "planted"
    for parent, child, amplitude in world.leaky:
        if (i, j) == (parent, child):
            return f"leaky {amplitude:g}"
    if i in world.independent or j in world.independent:
        return "independent"
    if any({i, j} & {a, b} for a, b, _ in world.correlated):
        return "correlated"
    return "other"


def tally_pairs(world: World, layer: LayerResult, latent_of: dict[int, int] | None = None) -> PairTally:
    """Sort the layer's C2 flags by ground truth. `latent_of` maps true features to SAE
    latents (identity for the ground-truth dictionary); flags on unmatched latents are "other"."""
    feature_of = {latent: f for f, latent in (latent_of or {f: f for f in range(world.n_features)}).items()}
    flags: dict[str, int] = {}
    certified: dict[str, int] = {}
    planted_flagged = planted_certified = 0
    for pair in layer.pairs:
        if pair.tier == "satisfied":
            continue
        i, j = feature_of.get(pair.i), feature_of.get(pair.j)
        kind = "other" if i is None or j is None else pair_category(world, i, j)
        if kind == "planted" and pair.kind != "hierarchy":
            kind = "other"
        flags[kind] = flags.get(kind, 0) + 1
        certified[kind] = certified.get(kind, 0) + (pair.tier == "certified")
        if kind == "planted":
            planted_flagged += 1
            planted_certified += pair.tier == "certified"
    return PairTally(len(world.planted), planted_flagged, planted_certified, flags, certified)


def role(world: World, feature: int) -> str:
    """The ground-truth role of a feature, for per-feature tallies (C3)."""
    if any(feature == p or feature in cs for p, cs in world.hierarchies):
        return "hierarchy"
    if any(feature in (p, c) for p, c, _ in world.leaky):
        return "leaky"
    if any(feature in (a, b) for a, b, _ in world.correlated):
        return "correlated"
    if feature in world.dense:
        return "dense"
    if feature in world.dead:
        return "dead"
    return "independent"
