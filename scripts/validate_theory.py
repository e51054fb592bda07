"""Validation study (issue #7): the theory's predictions, measured on planted synthetic worlds.

Does the audit find real problems, and only real ones? The worlds of opt_hooks/synthetic.py
(built with sae_lens.synthetic) plant strict hierarchies, independent features, correlated
pairs, near-hierarchies, an always-on and a never-firing feature. Five studies:

  A. the ground-truth dictionary with exact L1 codes (engine.LayerAudit): C2 recall, false flags
  B. StandardTrainingSAEs trained by sae_lens (train_toy_sae), audited with audit_activations:
     does a hierarchy survive (flagged) or is it absorbed?
  C. dense features and C1
  D. dead features and C6
  E. the label-free absorption map (layer.absorption) against the planted truth: the exactly
     absorbed dictionary, the SAEs of B, BatchTopK and Matryoshka BatchTopK SAEs, beside a
     probe-based (SAEBench-style) score; and a 4,096-feature Zipfian world of sae_lens'
     SyntheticModel with a 1,024-latent standard SAE

    python scripts/validate_theory.py            # docs/VALIDATION.md: 3 seeds, ~10 min on 2 cores
    python scripts/validate_theory.py --quick    # 1 seed, smaller samples, ~1 min

It prints markdown tables; docs/VALIDATION.md holds the output of the default run.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # sae_lens' trainer draws a progress bar per SAE
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from sae_lens import StandardTrainingSAE, TrainingSAE  # noqa: E402
from sae_lens.synthetic import eval_sae_on_synthetic_data, train_toy_sae  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import opt_hooks as oh  # noqa: E402
from opt_hooks.adapters.sae import SAEView  # noqa: E402
from opt_hooks.pair_map import PairMap  # noqa: E402
from opt_hooks.records import LayerResult  # noqa: E402
from opt_hooks.synthetic import (  # noqa: E402
    GroundTruthAudit,
    PairTally,
    World,
    absorbed_atoms,
    absorbed_audit,
    absorption_category,
    batchtopk_sae,
    dense_dead_world,
    ground_truth_audit,
    learned_features,
    match_latents,
    mixed_world,
    one_per_token_world,
    probe_absorption,
    role,
    sample_columns,
    standard_sae,
    tally_pairs,
    true_absorption,
    zipfian_hierarchy_world,
)

LAM = 0.2  # lam of the ground-truth audits; also the SAEs' l1_coefficient in B2, C and D
HELD_OUT = 1 / 3  # share of held-out tokens in every audit
DATA_SEED = 1000  # audit samples use seed DATA_SEED + seed, never the training stream
BATCH = 1024  # SAE training batch
SNAPSHOTS = 5  # audits during the training of each ground-truth-initialised SAE (B2)


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]
    n_tokens: int  # tokens per audit, held-out share included
    sae_samples: int  # training samples per SAE (train_toy_sae)
    l1_sweep: tuple[float, ...]
    trajectory_samples: int  # training samples of the ground-truth-initialised SAEs (B2)
    big_features: int  # features of the larger world (E4)
    big_samples: int  # training samples of its SAE
    big_tokens: int  # its audit sample, held-out share included


DEFAULT = Sizes(seeds=(0, 1, 2), n_tokens=6000, sae_samples=1_500_000, l1_sweep=(0.1, 0.2, 0.4, 0.8),
                trajectory_samples=100_000, big_features=4096, big_samples=1_000_000, big_tokens=90_000)
QUICK = Sizes(seeds=(0,), n_tokens=3000, sae_samples=300_000, l1_sweep=(0.2,), trajectory_samples=50_000,
              big_features=4096, big_samples=100_000, big_tokens=15_000)


class Table:
    def __init__(self, title: str, headers: list[str]) -> None:
        self.title, self.headers, self.rows = title, headers, []

    def add(self, *cells: object) -> None:
        self.rows.append([_cell(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "---|" * len(self.headers)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "–" if value is None else str(value)


def _ground_truth(world: World, sizes: Sizes, seed: int, **kwargs) -> GroundTruthAudit:
    n_held = round(sizes.n_tokens * HELD_OUT)
    return ground_truth_audit(world, LAM, n_audit=sizes.n_tokens - n_held, n_held_out=n_held,
                              seed=DATA_SEED + seed, **kwargs)


# -- A. the ground-truth dictionary -----------------------------------------------------------


def study_ground_truth(sizes: Sizes) -> tuple[Table, Table, dict[int, GroundTruthAudit]]:
    c2 = Table(
        f"A1. Ground-truth dictionary, exact L1 codes (lam = {LAM}): C2 flags sorted by the planted truth",
        ["d (K = 24)", "seed", "planted pairs flagged", "certified", "false flags: independent",
         "correlated (copula 0.6, 0.9)", "leaky, leaks at full size", "other pairs",
         "leaky, leaks below lam/2", "all C2 flags certified", "child coded without parent (tokens)"],
    )
    other = Table(
        "A2. Same audits, decoder stationarity C3 by role of the feature (certified / audit only / features), "
        "and the exactness of the codes (C4) and bias (C5)",
        ["d (K = 24)", "seed", "C3 hierarchy", "C3 correlated", "C3 leaky", "C3 independent",
         "C3 size, independent (max)", "C3 size, hierarchy (min)", "max C4 size", "C5 size"],
    )
    orthogonal = {}
    for d in (32, 16):
        for seed in sizes.seeds:
            world = mixed_world(seed, d=d)
            gt = _ground_truth(world, sizes, seed)
            if d == 32:
                orthogonal[seed] = gt
            t = tally_pairs(world, gt.layer)
            weak, full = (f"leaky {amplitude:g}" for _, _, amplitude in world.leaky)
            c2.add(d, seed, f"{t.planted_flagged}/{t.planted}", f"{t.planted_certified}/{t.planted}",
                   t.flags.get("independent", 0), t.flags.get("correlated", 0), t.flags.get(full, 0),
                   t.flags.get("other", 0), f"{t.flags.get(weak, 0)}/1", f"{t.n_certified}/{t.n_flags}",
                   _orphans(world, gt))
            (hierarchy, hierarchy_sizes), (independent, independent_sizes) = (
                _c3(world, gt.layer, r) for r in ("hierarchy", "independent"))
            other.add(d, seed, hierarchy, _c3(world, gt.layer, "correlated")[0], _c3(world, gt.layer, "leaky")[0],
                      independent, max(independent_sizes), min(hierarchy_sizes),
                      max(f.c4_size for f in gt.layer.features), gt.layer.layer_conditions["C5"]["size"])
    return c2, other, orthogonal


def _orphans(world: World, gt: GroundTruthAudit) -> str:
    """Audit tokens where a planted child has a code and its parent none (which breaks the strict
    hierarchy in code space), and how many of them have the child truly off (interference)."""
    z, acts = gt.z[~gt.held], gt.acts[~gt.held]
    orphan = spurious = 0
    for parent, child in world.planted:
        rows = (z[:, child] > 0) & (z[:, parent] == 0)
        orphan += int(rows.sum())
        spurious += int((rows & (acts[:, child] == 0)).sum())
    return f"{orphan} ({spurious} child truly off)"


def _c3(world: World, layer: LayerResult, of_role: str) -> tuple[str, list[float]]:
    """"certified / audit only / features" of one role under C3, and those features' C3 sizes."""
    rows = [f for f in layer.features if role(world, f.id) == of_role]
    tiers = [f.certificates["C3"].tier for f in rows if "C3" in f.certificates]
    cell = f"{tiers.count('certified')} / {tiers.count('violated')} / {len(rows)}"
    return cell, [f.c3_size for f in rows]


# -- B. trained SAEs --------------------------------------------------------------------------


def train(sae: StandardTrainingSAE, world: World, seed: int, samples: int, snapshot=None,
          n_snapshots: int = 0) -> StandardTrainingSAE:
    """sae_lens' own trainer on the world's stream (seeded: train_toy_sae draws from torch's RNG)."""
    torch.manual_seed(seed)
    train_toy_sae(sae, world.feature_dict, world.generator, training_samples=samples, batch_size=BATCH,
                  lr=3e-3, n_snapshots=n_snapshots, snapshot_fn=snapshot)
    return sae.eval()


@dataclass
class SAEAudit:
    layer: LayerResult
    latent_of: dict[int, int]  # true feature -> matched latent
    codes: torch.Tensor  # (n, d_sae) sae.encode on the audit sample
    acts: torch.Tensor  # (n, K) true activations of the same sample
    x: torch.Tensor  # (n, d) the sample, float32 as audited


def audit_sae(world: World, sae: TrainingSAE, l1: float | None, sizes: Sizes, seed: int) -> SAEAudit:
    """The product's own path: audit_activations with lam = l1_coefficient (None for the TopK
    family: the audit estimates lam or skips what needs it). Latents are matched to true
    features one-to-one by decoder cosine (Hungarian), as sae_lens' MCC matches them."""
    acts, x = world.sample(sizes.n_tokens, DATA_SEED + seed)
    x = x.float()
    layer = oh.audit_activations(sae, [x], held_out=HELD_OUT, lam=l1).layers["sae"]
    with torch.no_grad():
        decoder = torch.nn.functional.normalize(sae.W_dec.double(), dim=1)
        codes = sae.encode(x)
    latents, features = linear_sum_assignment(-(decoder @ world.atoms.T).abs().numpy())
    return SAEAudit(layer, {int(f): int(k) for k, f in zip(latents, features)}, codes, acts, x)


@dataclass
class Trained:
    """A trained SAE of B1 or E and its audit (study E maps it)."""

    name: str  # e.g. "standard, l1 0.2"
    architecture: str  # "standard", "batchtopk", "matryoshka"
    seed: int
    world: World
    sae: TrainingSAE
    audit: SAEAudit
    l0: float  # eval_sae_on_synthetic_data
    true_l0: float  # the world's, same evaluation sample


@dataclass
class Hierarchies:
    """What became of the planted hierarchies in one SAE."""

    tally: PairTally
    weak_leak: int  # the sub-threshold near-hierarchy flagged (0 or 1)
    unplanted: int  # flags on pairs the world did not plant, the near-hierarchy aside
    unplanted_certified: int
    # Per planted pair: share of the child's tokens where the parent latent is off (absorption),
    # None where the child was not learned (see `hierarchies`).
    absorption: list[float | None]
    cosines: list[float | None]  # per planted pair: cos(child latent's decoder, parent's true atom)

    def bins(self) -> tuple[int, int, int, int]:
        """Planted pairs absorbed on >= 50% of the child's tokens, on fewer, on none; children not learned."""
        learned = [a for a in self.absorption if a is not None]
        return (sum(a >= 0.5 for a in learned), sum(0 < a < 0.5 for a in learned), learned.count(0.0),
                len(self.absorption) - len(learned))

    @property
    def mean_absorption(self) -> float:
        return _mean([a for a in self.absorption if a is not None])

    @property
    def mean_cosine(self) -> float:
        return _mean([c for c in self.cosines if c is not None])


def hierarchies(world: World, sae: StandardTrainingSAE, audit: SAEAudit) -> Hierarchies:
    tally = tally_pairs(world, audit.layer, audit.latent_of)
    weak = f"leaky {world.leaky[0][2]:g}"
    weak_leak = tally.flags.get(weak, 0)
    absorption, cosines = [], []
    decoder = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1)
    for parent, child in world.planted:
        latent = audit.latent_of[child]
        # A one-to-one matching always pairs the child with some latent; it is the child's own
        # only if it fires and its decoder still points mostly along the child (an absorbing
        # child latent keeps cos ~0.7 with it; a latent of other features has ~0).
        learned = bool((audit.codes[:, latent] > 0).any()) and float(decoder[latent] @ world.atoms[child]) >= 0.5
        child_on = audit.acts[:, child] > 0
        off = audit.codes[child_on, audit.latent_of[parent]] == 0
        absorption.append(float(off.double().mean()) if learned else None)
        cosines.append(float(decoder[latent] @ world.atoms[parent]) if learned else None)
    return Hierarchies(
        tally, weak_leak, tally.n_flags - tally.planted_flagged - weak_leak,
        tally.n_certified - tally.planted_certified - tally.certified.get(weak, 0), absorption, cosines,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _certified_features(layer: LayerResult, condition: str) -> str:
    flagged = [f.certificates[condition] for f in layer.features if condition in f.certificates]
    return f"{sum(c.tier == 'certified' for c in flagged)}/{len(flagged)}"


def study_trained(sizes: Sizes, ground_truth: dict[int, GroundTruthAudit]) -> tuple[Table, Table, list[Trained]]:
    sweep = Table(
        f"B1. StandardTrainingSAEs (d_sae = 24, {sizes.sae_samples:,} samples, batch {BATCH}, lr 3e-3) from "
        "random initialisation: do planted hierarchies survive (C2 flag) or get absorbed?",
        ["l1 = lam", "seed", "L0 (true {true_l0})", "MCC", "dead", "planted flagged", "certified",
         "absorbed >= 50%", "absorbed < 50%", "never absorbed", "child not learned", "mean absorption",
         "cos(child dec, parent)", "near-hierarchy (leaks < lam/2) flagged", "unplanted pairs flagged (certified)",
         "C3 certified / flagged", "C4 certified / flagged"],
    )
    trained: list[Trained] = []  # the SAEs of B1, mapped again in E
    for l1 in sizes.l1_sweep:
        for seed in sizes.seeds:
            world = mixed_world(seed)
            sae = train(standard_sae(world, l1, seed), world, seed, sizes.sae_samples)
            with torch.random.fork_rng():
                torch.manual_seed(DATA_SEED + seed)
                quality = eval_sae_on_synthetic_data(sae, world.feature_dict, world.generator, num_samples=20_000)
            audit = audit_sae(world, sae, l1, sizes, seed)
            trained.append(Trained(f"standard, l1 {l1:g}", "standard", seed, world, sae, audit, quality.sae_l0,
                                   quality.true_l0))
            h = hierarchies(world, sae, audit)
            t = h.tally
            sweep.add(l1, seed, quality.sae_l0, quality.mcc, quality.dead_latents,
                      f"{t.planted_flagged}/{t.planted}", f"{t.planted_certified}/{t.planted_flagged}",
                      *h.bins(),
                      h.mean_absorption, h.mean_cosine, f"{h.weak_leak}/1",
                      f"{h.unplanted} ({h.unplanted_certified})", _certified_features(audit.layer, "C3"),
                      _certified_features(audit.layer, "C4"))
    sweep.headers[2] = sweep.headers[2].format(true_l0=f"{_mean([t.true_l0 for t in trained]):.2f}")
    trajectory = Table(
        f"B2. SAEs started at the ground truth's exact encoder (l1 = lam = {LAM}), audited during "
        f"training ({sizes.trajectory_samples:,} samples, batch {BATCH}), summed over seeds {list(sizes.seeds)}",
        ["training step", "planted flagged", "certified", "mean absorption", "cos(child dec, parent)",
         "near-hierarchy (leaks < lam/2) flagged", "unplanted pairs flagged (certified)"],
    )
    steps: dict[int, list[Hierarchies]] = {}
    for seed in sizes.seeds:
        world = mixed_world(seed)

        def record(sae: StandardTrainingSAE, step: int) -> None:
            steps.setdefault(step, []).append(hierarchies(world, sae, audit_sae(world, sae, LAM, sizes, seed)))

        sae = standard_sae(world, LAM, seed, init=ground_truth[seed])
        record(sae, 0)
        train(sae, world, seed, sizes.trajectory_samples, n_snapshots=SNAPSHOTS,
              snapshot=lambda trainer: record(trainer.sae, trainer.n_training_steps))
        record(sae, math.ceil(sizes.trajectory_samples / BATCH))
    for step, runs in sorted(steps.items()):
        flagged = sum(h.tally.planted_flagged for h in runs)
        trajectory.add(step, f"{flagged}/{sum(h.tally.planted for h in runs)}",
                       f"{sum(h.tally.planted_certified for h in runs)}/{flagged}",
                       _mean([h.mean_absorption for h in runs]), _mean([h.mean_cosine for h in runs]),
                       f"{sum(h.weak_leak for h in runs)}/{len(runs)}",
                       f"{sum(h.unplanted for h in runs)} ({sum(h.unplanted_certified for h in runs)})")
    return sweep, trajectory, trained


# -- C and D. dense and dead features ---------------------------------------------------------


def study_dense_dead(sizes: Sizes) -> tuple[Table, Table]:
    dense = Table(
        f"C. Dense features and C1 (feature 0 fires on every token; lam = l1 = {LAM})",
        ["case", "seed", "min code of the dense feature", "tokens where it is off", "C1 tier",
         "predicted dL = -lam m", "measured dL", "held-out dL", "C1 flags on other features"],
    )
    dead = Table(
        f"D. Dead features and C6 (lam = l1 = {LAM}: while a feature is dead, C6 asks every "
        f"‖r_n‖ <= lam/2 = {LAM / 2:g})",
        ["case", "seed", "dead", "max ‖r‖", "tokens with ‖r‖ > lam/2", "C6 tier", "measured dL", "held-out dL",
         "held-out p"],
    )
    for seed in sizes.seeds:
        world = dense_dead_world(seed)
        generative = world.feature_dict.bias.detach().double()
        fixed, exact = (_ground_truth(world, sizes, seed, bias=b) for b in (generative, None))
        sae = train(standard_sae(world, LAM, seed, d_sae=24), world, seed, sizes.sae_samples)
        audit = audit_sae(world, sae, LAM, sizes, seed)
        dense_latent = audit.latent_of[0]
        cases = [("ground truth, generative bias", fixed.layer, 0, fixed.z[:, 0]),
                 ("ground truth, exact bias", exact.layer, 0, exact.z[:, 0]),
                 ("SAE, d_sae = 24", audit.layer, dense_latent, audit.codes[:, dense_latent])]
        for name, layer, k, codes in cases:
            row, check = layer.features[k], layer.features[k].certificates.get("C1")
            others = sum(1 for f in layer.features if f.id != k and "C1" in f.conditions)
            dense.add(name, seed, row.min_code, f"{int((codes == 0).sum())}/{len(codes)}",
                      "satisfied" if check is None else check.tier,
                      *((None,) * 3 if check is None else (check.predicted, check.measured, check.held_out)), others)
            if layer is not fixed.layer:  # a non-optimal bias (C5 fails there) adds nothing to the C6 study
                _c6_row(dead, name, seed, layer)
        _c6_row(dead, "ground truth, one feature per token", seed,
                _ground_truth(one_per_token_world(seed), sizes, seed).layer)
    return dense, dead


def _c6_row(table: Table, name: str, seed: int, layer: LayerResult) -> None:
    c6 = layer.layer_conditions["C6"]
    check = c6["certificate"]
    share = c6["n_over_threshold"] / layer.n_tokens
    table.add(name, seed, c6["n_dead"], c6["max_rnorm"], f"{share:.0%}", c6["tier"],
              *((None,) * 3 if check is None else (check.measured, check.held_out, check.p_value)))


# -- E. the absorption map --------------------------------------------------------------------

# Matryoshka levels: the first holds the 5 parents (3 trees, 2 near-hierarchies; 20% of tokens
# each, the most frequent features), the second the rest.
MATRYOSHKA_WIDTHS = (5, 24)
# The larger world (sae_lens SyntheticModel): 4,096 Zipfian features in d = 256, 48 one-level
# trees; a standard SAE of 1,024 latents (the frequent features; the Zipf tail stays unlearned).
BIG_D_SAE = 1024
BIG_L1 = 0.5


@dataclass
class PairScore:
    """One planted (parent, child) pair whose child the SAE learned."""

    truth: float  # true absorption: share of the child's true tokens with the parent's latent off
    fraction: float | None  # the map's row (right orientation): its fraction; None without a row
    probe_full: float  # SAEBench-style full-absorption rate (`probe_absorption`)
    probe_fraction: float  # SAEBench-style absorption fraction
    parent_learned: bool  # the parent's latent represents it: cos >= 0.5 and no other atom nearer
    c2: bool  # C2 flags the pair as a hierarchy

    @property
    def absorbed(self) -> bool:
        return self.truth >= 0.5


@dataclass
class MapScore:
    """The absorption map of one SAE against the planted truth (see `score_map`)."""

    rows: int
    kinds: dict[str, int]  # rows by the ground truth of their matched features (`absorption_category`)
    no_feature: int  # rows with a latent that does not represent its matched feature (`learned_features`, nearest)
    nearest_planted: int  # rows not on a planted pair whose latents' nearest true atoms are one
    pairs: list[PairScore]
    c2_planted: int  # planted pairs C2 flags as a hierarchy (learned child or not)
    duplicates: int
    duplicates_same: int  # duplicate rows whose two latents are nearest to the same true atom

    @property
    def precision(self) -> float | None:
        return self.kinds.get("planted", 0) / self.rows if self.rows else None

    def count(self, absorbed: bool | None = None, *, found: bool | None = None, parent_learned: bool | None = None,
              c2: bool | None = None, positive: bool = False) -> int:
        """Planted pairs (child learned) by absorbed (truth >= 0.5) or kept, found by a row, ..."""
        return sum(
            (absorbed is None or p.absorbed == absorbed) and (found is None or (p.fraction is not None) == found)
            and (parent_learned is None or p.parent_learned == parent_learned) and (c2 is None or p.c2 == c2)
            and (not positive or p.truth > 0)
            for p in self.pairs
        )

    def found_pairs(self) -> list[tuple[float, float]]:
        return [(p.truth, p.fraction) for p in self.pairs if p.fraction is not None]


def score_map(world: World, layer: LayerResult, atoms: torch.Tensor, z: torch.Tensor, acts: torch.Tensor,
              centred: torch.Tensor, latent_of: dict[int, int], columns: dict[int, int] | None = None) -> MapScore:
    """Sort the layer's absorption rows by the planted truth and score them.

    atoms (K, d) and z (n, K): the SAE in theory units (unit atoms, their codes) on the audited
    sample; acts its true activations, of every feature or of the features `columns` maps to
    columns (a large world); centred = x - the world's bias (the probe's input);
    latent_of: true feature -> latent (one-to-one, `match_latents`). A planted pair's true
    absorption is the share of the child's true firing tokens on which the parent's latent is off
    (`true_absorption`); it counts as absorbed at >= 0.5 when the child was learned
    (`learned_features`)."""
    col = columns or {f: f for f in range(world.n_features)}
    feature_of = {k: f for f, k in latent_of.items()}
    learned = learned_features(world.atoms, atoms, z, latent_of)  # a child counts when learned (as in B)
    represented = learned_features(world.atoms, atoms, z, latent_of, nearest=True)  # ... and nearest to its atom
    nearest = (atoms.double() @ world.atoms.T).abs().argmax(dim=1).tolist()  # latent -> its nearest true atom
    kinds: dict[str, int] = {}
    found: dict[tuple[int, int], float] = {}
    no_feature = nearest_planted = 0
    for row in layer.absorption:
        i, j = feature_of.get(row.parent), feature_of.get(row.child)
        kind = absorption_category(world, i, j)
        kinds[kind] = kinds.get(kind, 0) + 1
        no_feature += not {i, j} <= represented
        if kind == "planted":
            found[(i, j)] = row.fraction
        else:  # e.g. a child learned twice: the row is on its second copy
            nearest_planted += absorption_category(world, nearest[row.parent], nearest[row.child]) == "planted"
    flagged = {(p.i, p.j) for p in layer.pairs if p.tier != "satisfied" and p.kind == "hierarchy"}
    pairs, c2_planted = [], 0
    for parent, child in world.planted:
        if parent not in latent_of or child not in latent_of:
            continue
        c2 = (latent_of[parent], latent_of[child]) in flagged
        c2_planted += c2
        if child not in learned:
            continue
        truth = true_absorption(acts, z, latent_of[parent], col[child])
        if math.isnan(truth):
            continue
        probe = probe_absorption(acts, centred, z, atoms, world.atoms[parent], latent_of[parent], col[parent],
                                 col[child])
        pairs.append(PairScore(truth, found.get((parent, child)), probe.full, probe.fraction, parent in represented,
                               c2))
    same = sum(nearest[d.i] == nearest[d.j] for d in layer.duplicates)
    return MapScore(len(layer.absorption), kinds, no_feature, nearest_planted, pairs, c2_planted, len(layer.duplicates),
                    same)


def _pearson(pairs: list[tuple[float, float]]) -> float | None:
    """Pearson correlation of (a, b) pairs; None for fewer than 3 pairs or a constant side."""
    if len(pairs) < 3:
        return None
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 1e-12 else None


def _share(found: int, total: int) -> str:
    return f"{found}/{total}"


MAP_HEADERS = ["rows", "precision", "absorbed pairs found", "absorbed, no parent latent",
               "all learned pairs (absorption > 0) found", "wrong orientation", "sibling rows", "near-hierarchy rows",
               "false rows on distractors", "other rows", "rows on a latent not its matched feature's",
               "non-planted rows on a planted pair by nearest atom", "corr(fraction, true absorption)",
               "duplicates (same true atom)", "C2 flags on planted pairs"]


def _map_cells(m: MapScore) -> list[object]:
    k = m.kinds
    return [m.rows, m.precision, _share(m.count(True, found=True), m.count(True)),
            m.count(True, parent_learned=False), _share(m.count(found=True, positive=True), m.count(positive=True)),
            k.get("reversed", 0), k.get("sibling", 0), k.get("near-hierarchy", 0), k.get("distractor", 0),
            k.get("other", 0) + k.get("unmatched", 0), m.no_feature, m.nearest_planted, _pearson(m.found_pairs()),
            f"{m.duplicates} ({m.duplicates_same})", m.c2_planted]


def _score_trained(t: Trained) -> MapScore:
    view = SAEView(t.sae)
    x, z, _ = view.encode(t.audit.x)
    atoms = view.atoms().double()
    centred = x.double() - t.world.feature_dict.bias.detach().double()
    return score_map(t.world, t.audit.layer, atoms, z.double(), t.audit.acts, centred, t.audit.latent_of)


def study_absorption_map(sizes: Sizes, trained: list[Trained]) -> tuple[Table, Table, Table]:
    per_sae = Table(
        "E1. Absorption map (`layer.absorption`) against the planted truth, mixed world (d = 32, K = d_sae = 24)",
        ["SAE", "seed", "L0 (true {true_l0})", *MAP_HEADERS],
    )
    probe = Table(
        "E2. The map beside a probe-based absorption score (SAEBench-style, true parent atom as the probe), "
        "per SAE: planted pairs whose child was learned",
        ["SAE", "seed", "learned pairs", "mean true absorption", "probe: full absorption", "probe: absorption fraction",
         "corr(probe full, truth)", "pairs with a map row", "their true absorption", "their map fraction",
         "corr(map fraction, truth)"],
    )
    scored: list[tuple[str, Trained | None, int, MapScore]] = []
    for seed in sizes.seeds:
        world = mixed_world(seed)
        n_held = round(sizes.n_tokens * HELD_OUT)
        gt = absorbed_audit(world, LAM, n_audit=sizes.n_tokens - n_held, n_held_out=n_held, seed=DATA_SEED + seed)
        _, x = world.sample(sizes.n_tokens, DATA_SEED + seed)
        identity = {f: f for f in range(world.n_features)}
        centred = x - world.feature_dict.bias.detach().double()
        scored.append(("ground truth, absorbed (exact L1 codes)", None, seed,
                       score_map(world, gt.layer, absorbed_atoms(world), gt.z, gt.acts, centred, identity)))
    for t in trained:
        scored.append((t.name, t, t.seed, _score_trained(t)))
    for seed in sizes.seeds:
        world = mixed_world(seed)
        acts, _ = world.sample(sizes.n_tokens, DATA_SEED + seed)
        k = round(float((acts > 0).sum(dim=1).double().mean()), 1)
        for architecture, widths in (("batchtopk", None), ("matryoshka", MATRYOSHKA_WIDTHS)):
            sae = train(batchtopk_sae(world, k, seed, matryoshka_widths=widths), world, seed, sizes.sae_samples)
            with torch.random.fork_rng():
                torch.manual_seed(DATA_SEED + seed)
                quality = eval_sae_on_synthetic_data(sae, world.feature_dict, world.generator, num_samples=20_000)
            name = f"batchtopk, k {k:g}" if widths is None else f"matryoshka, k {k:g}, widths {list(widths)}"
            t = Trained(name, architecture, seed, world, sae, audit_sae(world, sae, None, sizes, seed), quality.sae_l0,
                        quality.true_l0)
            scored.append((name, t, seed, _score_trained(t)))
    per_sae.headers[2] = per_sae.headers[2].format(
        true_l0=f"{_mean([t.true_l0 for _, t, _, _ in scored if t is not None]):.2f}")
    for name, t, seed, m in scored:
        per_sae.add(name, seed, None if t is None else t.l0, *_map_cells(m))
        found = m.found_pairs()
        mean = lambda values: _mean(values) if values else None  # noqa: E731
        probe.add(name, seed, len(m.pairs), mean([p.truth for p in m.pairs]), mean([p.probe_full for p in m.pairs]),
                  mean([p.probe_fraction for p in m.pairs]), _pearson([(p.probe_full, p.truth) for p in m.pairs]),
                  len(found), mean([a for a, _ in found]), mean([b for _, b in found]), _pearson(found))
    summary = Table(
        "E3. Per architecture, summed over the SAEs of E1 (correlations pooled over their planted pairs): "
        "kept hierarchies (C2) and absorbed ones (the map)",
        ["SAE", "SAEs", "rows", "precision", "absorbed pairs found", "absorbed, with a parent latent: found",
         "all learned pairs found", "corr(map fraction, truth)", "corr(probe full, truth)",
         "kept pairs (absorption < 0.5): C2 flagged", "absorbed pairs: C2 flagged", "absorbed pairs: map rows"],
    )
    groups: dict[str, list[MapScore]] = {}
    for name, t, _, m in scored:
        groups.setdefault(name if t is None else t.architecture, []).append(m)

    def total(runs: list[MapScore], *args, **kwargs) -> int:
        return sum(m.count(*args, **kwargs) for m in runs)

    for label, runs in groups.items():
        rows = sum(m.rows for m in runs)
        summary.add(label, len(runs), rows, sum(m.kinds.get("planted", 0) for m in runs) / rows if rows else None,
                    _share(total(runs, True, found=True), total(runs, True)),
                    _share(total(runs, True, found=True, parent_learned=True),
                           total(runs, True, parent_learned=True)),
                    _share(total(runs, found=True, positive=True), total(runs, positive=True)),
                    _pearson([p for m in runs for p in m.found_pairs()]),
                    _pearson([(p.probe_full, p.truth) for m in runs for p in m.pairs]),
                    _share(total(runs, False, c2=True), total(runs, False)),
                    _share(total(runs, True, c2=True), total(runs, True)),
                    _share(total(runs, True, found=True), total(runs, True)))
    return per_sae, probe, summary


@contextmanager
def _timed_pair_map() -> Iterator[list[float]]:
    """Seconds spent inside the absorption map (opt_hooks.pair_map.PairMap: candidates and counts
    after pass 1, held-out sums in pass 2, the rows), by wrapping its three methods."""
    spent = [0.0]
    originals = {name: getattr(PairMap, name) for name in ("__init__", "held_out", "absorption_rows")}

    def timed(method):
        def run(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - tick
        return run

    for name, method in originals.items():
        setattr(PairMap, name, timed(method))
    try:
        yield spent
    finally:
        for name, method in originals.items():
            setattr(PairMap, name, method)


def study_large_world(sizes: Sizes) -> Table:
    """E4: a standard SAE on a 4,096-feature Zipfian world of sae_lens' SyntheticModel."""
    table = Table(
        f"E4. Larger world: sae_lens SyntheticModel, {sizes.big_features:,} features (Zipfian firing), d = 256, "
        f"48 one-level trees; StandardTrainingSAE, d_sae = {BIG_D_SAE:,}, l1 = {BIG_L1:g}, "
        f"{sizes.big_samples:,} samples; audited on {sizes.big_tokens:,} tokens ({HELD_OUT:.0%} held out)",
        ["seed", "L0 (true)", "dead latents", "features learned", "planted pairs (child learned)", *MAP_HEADERS,
         "training (s)", "audit (s)", "map (s)"],
    )
    for seed in sizes.seeds[:1]:
        world = zipfian_hierarchy_world(seed, n_features=sizes.big_features)
        tick = time.perf_counter()
        sae = train(standard_sae(world, BIG_L1, seed, d_sae=BIG_D_SAE), world, seed, sizes.big_samples)
        trained_s = time.perf_counter() - tick
        in_trees = sorted({f for parent, children in world.hierarchies for f in (parent, *children)})
        acts, x, true_l0 = sample_columns(world, sizes.big_tokens, DATA_SEED + seed, in_trees)
        tick = time.perf_counter()
        with _timed_pair_map() as map_s:
            layer = oh.audit_activations(sae, [x.float()], held_out=HELD_OUT, lam=BIG_L1).layers["sae"]
        audit_s = time.perf_counter() - tick
        view = SAEView(sae)
        x_in, z, _ = view.encode(x.float())
        atoms = view.atoms().double()
        latent_of = match_latents(world.atoms, atoms)
        centred = x_in.double() - world.feature_dict.bias.detach().double()
        m = score_map(world, layer, atoms, z.double(), acts, centred, latent_of,
                      columns={f: c for c, f in enumerate(in_trees)})
        learned = learned_features(world.atoms, atoms, z, latent_of)
        l0 = float((z > 0).sum(dim=1).double().mean())
        table.add(seed, f"{l0:.2f} ({float(true_l0.double().mean()):.2f})", len(layer.dead_features), len(learned),
                  len(m.pairs), *_map_cells(m), trained_s, audit_s, map_s[0])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, smaller samples (~1 min)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    # Every tensor here is tiny: a second thread only adds synchronisation (a (6000, 24) x (24, 24)
    # product measured 25x slower with two threads than with one on a busy 2-core machine).
    torch.set_num_threads(1)
    started = time.perf_counter()
    timings = {}

    tick = time.perf_counter()
    a1, a2, ground_truth = study_ground_truth(sizes)
    timings["A"] = time.perf_counter() - tick
    tick = time.perf_counter()
    b1, b2, trained = study_trained(sizes, ground_truth)
    timings["B"] = time.perf_counter() - tick
    tick = time.perf_counter()
    c, d = study_dense_dead(sizes)
    timings["C, D"] = time.perf_counter() - tick
    tick = time.perf_counter()
    e1, e2, e3 = study_absorption_map(sizes, trained)
    timings["E1-E3"] = time.perf_counter() - tick
    tick = time.perf_counter()
    e4 = study_large_world(sizes)
    timings["E4"] = time.perf_counter() - tick

    command = "python scripts/validate_theory.py" + (" --quick" if args.quick else "")
    print(f"`{command}`: seeds {list(sizes.seeds)}, {sizes.n_tokens} tokens per audit "
          f"({HELD_OUT:.0%} held out), torch {torch.__version__}\n")
    for table in (a1, a2, b1, b2, c, d, e1, e2, e3, e4):
        print(table.markdown() + "\n")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"Wall time {time.perf_counter() - started:.0f} s ({spent}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
