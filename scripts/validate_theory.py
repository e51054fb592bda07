"""Validation study (issue #7): the theory's predictions, measured on planted synthetic worlds.

Does the audit find real problems, and only real ones? The worlds of opt_hooks/synthetic.py
(built with sae_lens.synthetic) plant strict hierarchies, independent features, correlated
pairs, near-hierarchies, an always-on and a never-firing feature. Four studies:

  A. the ground-truth dictionary with exact L1 codes (engine.LayerAudit): C2 recall, false flags
  B. StandardTrainingSAEs trained by sae_lens (train_toy_sae), audited with audit_activations:
     does a hierarchy survive (flagged) or is it absorbed?
  C. dense features and C1
  D. dead features and C6

    python scripts/validate_theory.py            # docs/VALIDATION.md: 3 seeds, < 10 min on 2 cores
    python scripts/validate_theory.py --quick    # 1 seed, smaller samples, < 60 s

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
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from sae_lens import StandardTrainingSAE  # noqa: E402
from sae_lens.synthetic import eval_sae_on_synthetic_data, train_toy_sae  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import opt_hooks as oh  # noqa: E402
from opt_hooks.records import LayerResult  # noqa: E402
from opt_hooks.synthetic import (  # noqa: E402
    GroundTruthAudit,
    PairTally,
    World,
    dense_dead_world,
    ground_truth_audit,
    mixed_world,
    one_per_token_world,
    role,
    standard_sae,
    tally_pairs,
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


DEFAULT = Sizes(seeds=(0, 1, 2), n_tokens=6000, sae_samples=1_500_000, l1_sweep=(0.1, 0.2, 0.4, 0.8),
                trajectory_samples=100_000)
QUICK = Sizes(seeds=(0,), n_tokens=3000, sae_samples=300_000, l1_sweep=(0.2,), trajectory_samples=50_000)


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


def audit_sae(world: World, sae: StandardTrainingSAE, l1: float, sizes: Sizes, seed: int) -> SAEAudit:
    """The product's own path: audit_activations with lam = l1_coefficient. Latents are matched
    to true features one-to-one by decoder cosine (Hungarian), as sae_lens' MCC matches them."""
    acts, x = world.sample(sizes.n_tokens, DATA_SEED + seed)
    x = x.float()
    layer = oh.audit_activations(sae, [x], held_out=HELD_OUT, lam=l1).layers["sae"]
    with torch.no_grad():
        decoder = torch.nn.functional.normalize(sae.W_dec.double(), dim=1)
        codes = sae.encode(x)
    latents, features = linear_sum_assignment(-(decoder @ world.atoms.T).abs().numpy())
    return SAEAudit(layer, {int(f): int(k) for k, f in zip(latents, features)}, codes, acts)


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


def study_trained(sizes: Sizes, ground_truth: dict[int, GroundTruthAudit]) -> tuple[Table, Table]:
    sweep = Table(
        f"B1. StandardTrainingSAEs (d_sae = 24, {sizes.sae_samples:,} samples, batch {BATCH}, lr 3e-3) from "
        "random initialisation: do planted hierarchies survive (C2 flag) or get absorbed?",
        ["l1 = lam", "seed", "L0 (true 2.1)", "MCC", "dead", "planted flagged", "certified",
         "absorbed >= 50%", "absorbed < 50%", "never absorbed", "child not learned", "mean absorption",
         "cos(child dec, parent)", "near-hierarchy (leaks < lam/2) flagged", "unplanted pairs flagged (certified)",
         "C3 certified / flagged", "C4 certified / flagged"],
    )
    for l1 in sizes.l1_sweep:
        for seed in sizes.seeds:
            world = mixed_world(seed)
            sae = train(standard_sae(world, l1, seed), world, seed, sizes.sae_samples)
            with torch.random.fork_rng():
                torch.manual_seed(DATA_SEED + seed)
                quality = eval_sae_on_synthetic_data(sae, world.feature_dict, world.generator, num_samples=20_000)
            audit = audit_sae(world, sae, l1, sizes, seed)
            h = hierarchies(world, sae, audit)
            t = h.tally
            sweep.add(l1, seed, quality.sae_l0, quality.mcc, quality.dead_latents,
                      f"{t.planted_flagged}/{t.planted}", f"{t.planted_certified}/{t.planted_flagged}",
                      *h.bins(),
                      h.mean_absorption, h.mean_cosine, f"{h.weak_leak}/1",
                      f"{h.unplanted} ({h.unplanted_certified})", _certified_features(audit.layer, "C3"),
                      _certified_features(audit.layer, "C4"))
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
    return sweep, trajectory


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, smaller samples (< 60 s)")
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
    b1, b2 = study_trained(sizes, ground_truth)
    timings["B"] = time.perf_counter() - tick
    tick = time.perf_counter()
    c, d = study_dense_dead(sizes)
    timings["C, D"] = time.perf_counter() - tick

    command = "python scripts/validate_theory.py" + (" --quick" if args.quick else "")
    print(f"`{command}`: seeds {list(sizes.seeds)}, {sizes.n_tokens} tokens per audit "
          f"({HELD_OUT:.0%} held out), torch {torch.__version__}\n")
    for table in (a1, a2, b1, b2, c, d):
        print(table.markdown() + "\n")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"Wall time {time.perf_counter() - started:.0f} s ({spent}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
