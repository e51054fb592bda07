"""Planted synthetic worlds for the validation study (scripts/validate_theory.py,
tests/test_validation.py, docs/VALIDATION.md).

A world is a sae_lens.synthetic FeatureDictionary and ActivationGenerator whose structure is
known: strict hierarchies (HierarchyNode), independent features, Gaussian-copula correlated
pairs, "leaky" near-hierarchies, always-on and never-firing features. Knowing the truth lets
every C2 flag be sorted into "planted hierarchy" or "false flag".

`ground_truth_audit` audits the ground-truth dictionary itself: codes and bias solved exactly
(float64) for the L1 objective by `theory.reference`, then `engine.LayerAudit`.

For the absorption map (docs/VALIDATION.md, section E): `absorbed_audit` (an exactly absorbed
dictionary), `match_latents` / `learned_features` / `true_absorption` (an SAE against the truth),
`judgeable_edges` / `judge_rows` (a map's rows against the truth: precision and recall),
`evidence_parts` (where a pair's evidence comes from, feature group by feature group),
`absorption_category` (sorting a map row), `probe_absorption` (an SAEBench-style probe score),
`batchtopk_sae` (BatchTopK and Matryoshka SAEs) and `zipfian_hierarchy_world` / `sample_columns`
(a 4,096-feature world of sae_lens' SyntheticModel).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    HierarchyConfig,
    HierarchyNode,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
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
    return GroundTruthAudit(audit_codes(atoms, bias, x, z, held, lam=lam, hook_name=world.name), bias, acts, z, held)


def audit_codes(atoms: Tensor, bias: Tensor, x: Tensor, z: Tensor, held: Tensor, *, lam: float | None,
                hook_name: str = "sae") -> LayerResult:
    """`engine.LayerAudit` of given codes z (n, K) of x (n, d): pass 1 on the tokens not `held`
    out, pass 2 on every token (the held-out ones measure)."""
    audit = LayerAudit(atoms, bias, lam=lam, hook_name=hook_name)
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    return plan.result()


def absorbed_atoms(world: World) -> Tensor:
    """The ground-truth dictionary with every planted hierarchy absorbed (THEORY.md section 6):
    each child's atom becomes normalise(parent + child), the parent's stays. Exact L1 codes for
    it switch the parent off on most of the child's tokens: absorption with a known truth."""
    atoms = world.atoms.clone()
    for parent, child in world.planted:
        mixed = world.atoms[parent] + world.atoms[child]
        atoms[child] = mixed / mixed.norm()
    return atoms


def absorbed_audit(world: World, lam: float, *, n_audit: int, n_held_out: int, seed: int) -> GroundTruthAudit:
    """`ground_truth_audit` of the absorbed dictionary (`absorbed_atoms`), the world's own bias
    kept: exact float64 L1 codes on every token, audit and held-out."""
    n = n_audit + n_held_out
    acts, x = world.sample(n, seed)
    held = held_out_windows(0, n, n_held_out / n)
    atoms, bias = absorbed_atoms(world), world.feature_dict.bias.detach().double()
    z = nonneg_lasso(x, atoms, bias, lam)
    return GroundTruthAudit(audit_codes(atoms, bias, x, z, held, lam=lam, hook_name=world.name), bias, acts, z, held)


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


# -- the absorption map against the ground truth (docs/VALIDATION.md, section E) ---------------

LEARNED_COS = 0.5  # a latent represents its matched feature when it fires and its decoder has at least this cosine
NEAREST_TIE = 1e-3  # cosines closer than this count as equally near (`learned_features`)


def match_latents(true_atoms: Tensor, sae_atoms: Tensor) -> dict[int, int]:
    """True feature -> SAE latent, one-to-one by |cosine| of the unit atoms (Hungarian, as sae_lens'
    `mean_correlation_coefficient` matches them). With more features than latents, only as many
    features as there are latents get one."""
    from scipy.optimize import linear_sum_assignment  # a dependency of the study and the tests only

    cos = (sae_atoms.double() @ true_atoms.double().T).abs()
    latents, features = linear_sum_assignment(-cos.cpu().numpy())
    return {int(f): int(k) for k, f in zip(latents, features)}


def learned_features(
    true_atoms: Tensor, sae_atoms: Tensor, z: Tensor, latent_of: dict[int, int], *, nearest: bool = False
) -> set[int]:
    """The features the SAE learned: the matched latent fires on some token of `z` (n, K) and its
    decoder has cosine >= LEARNED_COS with the feature's atom (a one-to-one matching always pairs
    a feature with some latent; an absorbing child latent keeps cos ~0.7 with its own atom).
    With `nearest`, also no other true atom is nearer to that decoder (larger |cosine|, by more
    than NEAREST_TIE): a child latent that absorbed its parent (cos 0.70 with the parent, 0.71
    with the child) then does not count as the parent's; normalise(parent + child), equally near
    to both, still counts as the child's."""
    fires = (z > 0).any(dim=0)
    cos = sae_atoms.double() @ true_atoms.double().T
    closest = cos.abs().max(dim=1).values
    return {
        f for f, k in latent_of.items()
        if bool(fires[k]) and float(cos[k, f]) >= LEARNED_COS
        and (not nearest or float(closest[k]) - float(cos[k, f]) <= NEAREST_TIE)
    }


def true_absorption(acts: Tensor, z: Tensor, parent_latent: int, child: int) -> float:
    """Share of the child's true firing tokens (acts (n, K_true)) on which the parent's latent is
    off in the codes z (n, K): the ground truth of a planted pair's absorption (NaN if the child
    never fires)."""
    on = acts[:, child] > 0
    if not bool(on.any()):
        return math.nan
    return float((z[on, parent_latent] == 0).double().mean())


ABSORBED = 0.5  # an edge is absorbed when its parent's latent is off on at least this share of the child's tokens
MIN_CHILD_TOKENS = 20  # an edge is judgeable when its child fires on at least this many tokens


@dataclass(frozen=True)
class JudgedEdge:
    """A direct (parent, child) edge of the truth whose features both have a latent (Hungarian,
    cosine >= LEARNED_COS) and whose child fires on >= MIN_CHILD_TOKENS tokens."""

    parent: int
    child: int
    parent_latent: int
    child_latent: int
    rate: float  # `true_absorption`: the share of the child's tokens with the parent's latent off

    @property
    def absorbed(self) -> bool:
        return self.rate >= ABSORBED


def judgeable_edges(true_atoms: Tensor, edges: Sequence[tuple[int, int]], acts: Tensor, sae_atoms: Tensor,
                    z: Tensor, latent_of: dict[int, int] | None = None) -> list[JudgedEdge]:
    """The edges an absorption map is judged on, with their true absorption (acts (n, F) the
    truth's activations, z (n, K) the SAE's codes of the same tokens)."""
    latent_of = match_latents(true_atoms, sae_atoms) if latent_of is None else latent_of
    cos = sae_atoms.double() @ true_atoms.double().T
    out = []
    for parent, child in edges:
        if parent not in latent_of or child not in latent_of:
            continue
        lp, lc = latent_of[parent], latent_of[child]
        if cos[lp, parent] < LEARNED_COS or cos[lc, child] < LEARNED_COS:
            continue
        if int((acts[:, child] > 0).sum()) < MIN_CHILD_TOKENS:
            continue
        out.append(JudgedEdge(parent, child, lp, lc, true_absorption(acts, z, lp, child)))
    return out


@dataclass(frozen=True)
class RowsJudged:
    """An absorption map's rows against the truth. precision: the share of rows whose parent
    latent's matched feature is an ancestor of the child latent's (NaN without rows); recall: the
    share of the judgeable absorbed edges found as a row, oriented (NaN without such edges). The
    wrong rows by what the truth makes of their two features: a descendant named the parent of
    its own ancestor (reversed), two children of one parent (siblings), two features of one tree in
    neither relation (cousins, uncle and nephew: same tree), anything else (other: two trees, a
    feature in none, a latent without a feature). `direct`: the right rows whose parent latent's
    feature is the child latent's direct parent (the others name a further ancestor; recall counts
    direct edges only)."""

    rows: int
    right: int
    absorbed: int
    found: int
    direct: int = 0
    reversed: int = 0
    siblings: int = 0
    same_tree: int = 0
    other: int = 0

    @property
    def precision(self) -> float:
        return self.right / self.rows if self.rows else math.nan

    @property
    def recall(self) -> float:
        return self.found / self.absorbed if self.absorbed else math.nan


def ancestors(feature: int, parent_of: dict[int, int]) -> set[int]:
    """Every ancestor of `feature` in the forest `parent_of` (child -> parent)."""
    out = set()
    while feature in parent_of and parent_of[feature] not in out:
        feature = parent_of[feature]
        out.add(feature)
    return out


def row_kind(parent_latent: int, child_latent: int, feature_of: dict[int, int], parent_of: dict[int, int]) -> str:
    """What the truth makes of a map row (parent latent, child latent), through the latents'
    matched features (`feature_of`) and the forest `parent_of` (child -> parent): "right" (the
    parent's feature an ancestor of the child's), "reversed", "siblings", "same_tree" (one tree,
    neither relation) or "other" (two trees, a feature in none, a latent without a feature)."""
    if parent_latent not in feature_of or child_latent not in feature_of:
        return "other"
    fp, fc = feature_of[parent_latent], feature_of[child_latent]
    up_p, up_c = ancestors(fp, parent_of), ancestors(fc, parent_of)
    if fp in up_c:
        return "right"
    if fc in up_p:
        return "reversed"
    if fp in parent_of and parent_of.get(fp) == parent_of.get(fc):
        return "siblings"
    if (up_p | {fp}) & (up_c | {fc}):  # a common ancestor: one tree
        return "same_tree"
    return "other"


EVIDENCE_PARTS = ("parent", "ancestors", "other descendants", "child", "other features", "offset")


@dataclass(frozen=True)
class EvidenceParts:
    """Where the map's evidence for a pair (parent latent, child latent) comes from, by the truth:
    the mean of the centred input's component along the parent latent's unit atom on the parent
    latent's tokens (`on_parent`) and on the child latent's tokens with the parent latent off
    (`on_child`: the map's evidence is their ratio, `evidence`), each split over EVIDENCE_PARTS:
    the parent feature, its ancestors, its descendants other than the child and the child's own
    (other descendants), the child feature and its descendants (child), every other feature, and
    what no feature carries (offset: the world's bias against the SAE's b_dec)."""

    on_parent: dict[str, float]
    on_child: dict[str, float]

    @property
    def evidence(self) -> float:
        parent = sum(self.on_parent.values())
        return sum(self.on_child.values()) / parent if parent else math.nan


def descendants(feature: int, parent_of: dict[int, int]) -> set[int]:
    """Every descendant of `feature` in the forest `parent_of` (child -> parent)."""
    children: dict[int, list[int]] = {}
    for child, parent in parent_of.items():
        children.setdefault(parent, []).append(child)
    out, stack = set(), list(children.get(feature, ()))
    while stack:
        f = stack.pop()
        if f not in out:
            out.add(f)
            stack += children.get(f, ())
    return out


def evidence_parts(acts: Tensor, centred: Tensor, true_atoms: Tensor, direction: Tensor, parent_fires: Tensor,
                   child_fires: Tensor, parent: int, child: int, parent_of: dict[int, int]) -> EvidenceParts:
    """`EvidenceParts` of a pair whose latents are matched to the features `parent` and `child`
    (any two features: for two siblings `parent` is the one whose latent plays the parent). acts
    (n, F) the truth's activations, centred (n, d) the inputs less the SAE's b_dec, direction (d,)
    the parent latent's unit atom, parent_fires / child_fires (n,) where the two latents fire."""
    weight = true_atoms.double() @ direction.double()  # each feature's component along the atom
    below = descendants(child, parent_of) | {child}
    groups = {"parent": {parent}, "ancestors": ancestors(parent, parent_of) - below,
              "other descendants": descendants(parent, parent_of) - below - {parent}, "child": below - {parent}}
    member = torch.full((true_atoms.shape[0],), EVIDENCE_PARTS.index("other features"), dtype=torch.long)
    for name, features in groups.items():
        member[sorted(features)] = EVIDENCE_PARTS.index(name)
    split = torch.zeros(true_atoms.shape[0], len(EVIDENCE_PARTS), dtype=torch.float64)
    split[torch.arange(true_atoms.shape[0]), member] = weight

    def parts(tokens: Tensor) -> dict[str, float]:
        if not bool(tokens.any()):
            return dict.fromkeys(EVIDENCE_PARTS, math.nan)
        mean = (acts[tokens].double() @ split).mean(0)
        mean[EVIDENCE_PARTS.index("offset")] = (centred[tokens].double() @ direction.double()).mean() - mean.sum()
        return dict(zip(EVIDENCE_PARTS, mean.tolist()))

    return EvidenceParts(on_parent=parts(parent_fires), on_child=parts(child_fires & ~parent_fires))


def judging_maps(edges: Sequence[tuple[int, int]], latent_of: dict[int, int], judged: Sequence[JudgedEdge]
                 ) -> tuple[dict[int, int], dict[int, int], set[tuple[int, int]]]:
    """What a row is judged against: each feature's parent (the direct `edges`), each latent's
    feature (the inverse of the matching `latent_of`), and the judgeable absorbed edges as
    (parent latent, child latent)."""
    parent_of = {child: parent for parent, child in edges}
    feature_of = {k: f for f, k in latent_of.items()}
    return parent_of, feature_of, {(e.parent_latent, e.child_latent) for e in judged if e.absorbed}


def judge_rows(rows: Sequence[tuple[int, int]], edges: Sequence[tuple[int, int]], latent_of: dict[int, int],
               judged: Sequence[JudgedEdge]) -> RowsJudged:
    """`rows` (parent latent, child latent) against the truth's direct `edges` (features) and its
    `judged` edges; `latent_of` the Hungarian matching (every latent has a feature when there are
    at least as many features as latents; one without counts as wrong)."""
    parent_of, feature_of, absorbed = judging_maps(edges, latent_of, judged)
    kinds = Counter(row_kind(p, c, feature_of, parent_of) for p, c in rows)
    direct = sum(p in feature_of and c in feature_of and parent_of.get(feature_of[c]) == feature_of[p] for p, c in rows)
    return RowsJudged(rows=len(rows), right=kinds["right"], absorbed=len(absorbed), found=len(absorbed & set(rows)),
                      direct=direct,
                      reversed=kinds["reversed"], siblings=kinds["siblings"], same_tree=kinds["same_tree"],
                      other=kinds["other"])


def candidates_judged(pairs: Sequence[tuple[int, int]], edges: Sequence[tuple[int, int]], latent_of: dict[int, int],
                      judged: Sequence[JudgedEdge]) -> tuple[list[bool], list[bool]]:
    """Per candidate pair (parent latent, child latent), what `judge_rows` would make of it as a
    row: right (the parent latent's feature an ancestor of the child latent's) and found (a
    judgeable absorbed direct edge, oriented)."""
    parent_of, feature_of, absorbed = judging_maps(edges, latent_of, judged)
    right = [row_kind(p, c, feature_of, parent_of) == "right" for p, c in pairs]
    return right, [(p, c) in absorbed for p, c in pairs]


def absorption_category(world: World, i: int | None, j: int | None) -> str:
    """What the ground truth says about an absorption row whose parent latent is matched to true
    feature i and whose child latent to feature j: "planted" ((i, j) is a strict hierarchy's
    (parent, child)), "reversed" ((j, i) is), "sibling" (two children of one parent),
    "near-hierarchy" (a leaky pair, either orientation), "distractor" (i or j an independent or
    copula-correlated feature), "other"; "unmatched" where a latent has no feature."""
    if i is None or j is None:
        return "unmatched"
    if (i, j) in world.planted:
        return "planted"
    if (j, i) in world.planted:
        return "reversed"
    if any(i in children and j in children for _, children in world.hierarchies):
        return "sibling"
    if any({i, j} == {parent, child} for parent, child, _ in world.leaky):
        return "near-hierarchy"
    correlated = {f for a, b, _ in world.correlated for f in (a, b)}
    if {i, j} & (set(world.independent) | correlated):
        return "distractor"
    return "other"


@dataclass
class ProbeAbsorption:
    """A probe-based absorption score of one planted (parent, child) pair, after SAEBench's
    absorption eval (`FeatureAbsorptionCalculator`), with the true parent atom as the probe."""

    n_tokens: int  # the child's true firing tokens on which the probe sees the parent
    full: float  # share of them with full absorption by a single latent (SAEBench `is_full_absorption`)
    fraction: float  # mean absorption fraction (SAEBench `absorption_fraction`, up to 3 absorbing latents)


def probe_absorption(
    acts: Tensor, centred: Tensor, z: Tensor, sae_atoms: Tensor, probe: Tensor, parent_latent: int, parent: int,
    child: int, *, present: float = 0.5, full_cos: float = 0.025, fraction_cos: float = 0.1, share: float = 0.4,
    max_absorbers: int = 3,
) -> ProbeAbsorption:
    """SAEBench's absorption score of a (parent, child) pair, on labels the map does not use.

    probe: unit vector (the parent's true atom); centred (n, d): the input minus the world's bias,
    so s_n = <centred_n, probe> is the probe's projection; z (n, K) the SAE's codes on unit
    atoms, so latent k contributes q_nk = z_nk <d_k, probe> to the reconstruction's projection.
    Tokens: the child fires (acts) and s_n > present * the parent's mean true magnitude. The
    parent's latent is the "main" latent. On such a token, full absorption: the main latent is
    off, the top-projecting latent has <d_k, probe> >= full_cos and carries q >= share * s_n.
    Absorption fraction: A = the sum of the (at most max_absorbers) largest q_nk > 0 among other
    latents with <d_k, probe> >= fraction_cos and m = q_n,main; 0 if m >= s_n or A < share * s_n,
    1 if m <= 0, else min(A, s_n - m) / (min(A, s_n - m) + m)."""
    typical = float(acts[acts[:, parent] > 0, parent].double().mean()) if bool((acts[:, parent] > 0).any()) else 0.0
    s = centred.double() @ probe.double()
    tokens = (acts[:, child] > 0) & (s > present * typical)
    n = int(tokens.sum())
    if n == 0:
        return ProbeAbsorption(0, math.nan, math.nan)
    cos = sae_atoms.double() @ probe.double()
    s, codes = s[tokens], z[tokens].double()
    q = codes * cos
    main = q[:, parent_latent]
    top = q.argmax(dim=1)
    full = (codes[:, parent_latent] == 0) & (cos[top] >= full_cos) & (q.gather(1, top[:, None])[:, 0] >= share * s)
    others = q.clone()
    others[:, parent_latent] = 0.0
    others = torch.where((cos >= fraction_cos) & (others > 0), others, torch.zeros_like(others))
    absorbed = others.topk(min(max_absorbers, others.shape[1]), dim=1).values.sum(dim=1)
    credited = torch.minimum(absorbed, s - main)
    partial = (credited / (credited + main)).clamp(0.0, 1.0)
    fraction = torch.where((main >= s) | (absorbed < share * s), 0.0, torch.where(main <= 0, 1.0, partial))
    return ProbeAbsorption(n, float(full.double().mean()), float(fraction.mean()))


def zipfian_hierarchy_world(
    seed: int = 0, *, n_features: int = 4096, d: int = 256, roots: int = 48, branching: tuple[int, int] = (2, 4),
    exclusive: float = 0.5, exponent: float = 1.0, max_prob: float = 0.3, min_prob: float = 1e-4,
) -> World:
    """A larger world from sae_lens' SyntheticModel: Zipfian firing probabilities
    (ZipfianFiringProbabilityConfig: feature r fires with about max_prob / r, at least
    min_prob), a forest of `roots` one-level trees from HierarchyConfig (the roots take the
    most frequent indices, their `branching` children the next ones; a share `exclusive` of the
    trees has mutually exclusive children; firing probabilities compensated for the gating, so
    a child fires about as often as its index says), magnitudes relu(N(1, MAGNITUDE_STD)), a
    bias of norm 1, FeatureDictionary's default atoms. Every other feature is independent."""
    cfg = SyntheticModelConfig(
        num_features=n_features, hidden_dim=d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=exponent, max_prob=max_prob, min_prob=min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=branching, max_depth=1,
                                  mutually_exclusive_portion=exclusive, compensate_probabilities=True),
        std_firing_magnitudes=MAGNITUDE_STD, mean_firing_magnitudes=1.0, bias=1.0, seed=seed,
    )
    model = SyntheticModel(cfg)
    assert model.hierarchy is not None
    hierarchies = [(r.feature_index, [c.feature_index for c in r.children]) for r in model.hierarchy.roots]
    in_trees = {f for parent, children in hierarchies for f in (parent, *children)}
    return World(
        name=f"zipfian hierarchies, K={n_features}, d={d}", feature_dict=model.feature_dict,
        generator=model.activation_generator, hierarchies=hierarchies,
        independent=[f for f in range(n_features) if f not in in_trees],
    )


def sample_columns(
    world: World, n: int, seed: int, columns: Sequence[int], *, chunk: int = 4096
) -> tuple[Tensor, Tensor, Tensor]:
    """`World.sample` for a large world, in chunks: (acts of `columns` (n, len(columns)) float64,
    x (n, d) float64, true L0 per token (n,)), without the dense (n, K) activations."""
    vectors = world.feature_dict.feature_vectors.detach().double()
    bias = world.feature_dict.bias.detach().double()
    cols = torch.as_tensor(list(columns), dtype=torch.int64)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, chunk):
            acts = world.generator.sample(min(chunk, n - start))
            acts = (acts.to_dense() if acts.is_sparse else acts).double()
            x = torch.sparse.mm(acts.to_sparse(), vectors) + bias  # a few active features per token
            parts.append((acts[:, cols], x, (acts > 0).sum(dim=1)))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def batchtopk_sae(
    world: World, k: float, seed: int, *, d_sae: int | None = None, matryoshka_widths: Sequence[int] | None = None
) -> BatchTopKTrainingSAE:
    """A fresh BatchTopKTrainingSAE for the world (seeded), k latents active per token on average
    over a batch; with `matryoshka_widths` a MatryoshkaBatchTopKTrainingSAE whose nested levels
    end at those widths (the last is d_sae, added if missing). Both train with train_toy_sae."""
    torch.manual_seed(seed)
    width = d_sae or world.n_features
    shape = {"d_in": world.feature_dict.hidden_dim, "d_sae": width, "k": k,
             "metadata": SAEMetadata(hook_name="synthetic")}
    if matryoshka_widths is None:
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**shape))
    widths = list(matryoshka_widths)
    if widths[-1] != width:
        widths.append(width)
    return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**shape, matryoshka_widths=widths))


# SynthSAEBench-16k (Chanin and Garriga-Alonso 2026): 16,384 features in d = 768, 128 roots of
# depth-3 trees of branching 4, all mutually exclusive, seed 42. `synthsaebench_world` keeps every
# other setting and scales the feature count, the width and the number of roots together.
SYNTHSAEBENCH_FEATURES, SYNTHSAEBENCH_D, SYNTHSAEBENCH_ROOTS = 16_384, 768, 128


def synthsaebench_world(
    seed: int = 42, *, n_features: int = SYNTHSAEBENCH_FEATURES, d: int = SYNTHSAEBENCH_D, hierarchy: bool = True,
) -> World:
    """The SynthSAEBench-16k recipe at `n_features` x `d` (sae_lens' SyntheticModel): Zipfian
    firing (exponent 0.5, max_prob 0.4, min_prob 5e-4), a forest of 128 * n_features / 16,384
    roots of depth-3 trees with branching 4, every parent's children mutually exclusive,
    probabilities compensated for the gating, children scaled by their parent's activation,
    mean magnitudes linear 5 -> 4 with folded-normal spreads (mean 0.5, std 0.5), a low-rank
    correlation (rank 25, scale 0.1), orthogonalised atoms (100 steps, lr 3e-4), bias norm 0.5.
    `hierarchy=False`: the same recipe with no trees (every feature independent).

    `World.hierarchies` lists every parent with its direct children (internal nodes at every
    depth), so `World.planted` is every direct edge."""
    from sae_lens.synthetic import FoldedNormalMagnitudeConfig, LinearMagnitudeConfig
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, OrthogonalizationConfig

    roots = max(1, round(SYNTHSAEBENCH_ROOTS * n_features / SYNTHSAEBENCH_FEATURES))
    cfg = SyntheticModelConfig(
        num_features=n_features, hidden_dim=d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=roots, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
            compensate_probabilities=True, scale_children_by_parent=True,
        ) if hierarchy else None,
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=seed,
    )
    model = SyntheticModel(cfg)
    groups: list[tuple[int, list[int]]] = []
    if model.hierarchy is not None:
        stack = list(model.hierarchy.roots)
        while stack:
            node = stack.pop()
            if node.children:
                groups.append((node.feature_index, [c.feature_index for c in node.children]))
                stack.extend(node.children)
    in_trees = {f for parent, children in groups for f in (parent, *children)}
    return World(
        name=f"SynthSAEBench recipe, K={n_features}, d={d}" + ("" if hierarchy else ", no hierarchy"),
        feature_dict=model.feature_dict, generator=model.activation_generator, hierarchies=groups,
        independent=[f for f in range(n_features) if f not in in_trees],
    )
