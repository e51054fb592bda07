"""Can the audit tell a good SAE from a bad one? (docs/VALIDATION.md, section Q)

On worlds built with sae_lens.synthetic after the SynthSAEBench-16k recipe, scaled to a CPU
(`opt_hooks.synthetic.synthsaebench_world`: 2,048 features in d = 128 by default, true L0 about
11), SAEs of every SynthSAEBench architecture opt_hooks audits (standard L1, BatchTopK, JumpReLU,
Matryoshka BatchTopK, Matching Pursuit) at two L0 values each, width 512 (a quarter of the
features, SynthSAEBench's ratio), are trained with sae_lens' own training step on one fixed
tensor of activations, saved and loaded in the inference form users get (`save_inference_model`,
`SAE.load_from_disk`: BatchTopK and Matryoshka become JumpReLU SAEs), scored against the ground
truth (sae_lens.synthetic's MCC and uniqueness, its per-latent classification F1 on held-out
tokens, the true absorption rate of docs/VALIDATION.md section E) and audited by
`oh.audit_activations` on other held-out tokens.

Per world, every audit number of a layer (`AUDIT_NUMBERS`) and EV and L0 get their Spearman
correlation with F1, MCC and uniqueness across the world's SAEs, with a percentile bootstrap
interval over the SAEs. The number shown to users is chosen on the first world only (the
largest |Spearman| with F1) and reported on the others (`--worlds`).

    python scripts/study_quality.py                  # four worlds, 10 SAEs each; writes docs/VALIDATION.md section Q
    python scripts/study_quality.py --quick          # one small world, a smoke run (~2 min), prints only
    python scripts/study_quality.py --json out.json  # also every SAE's numbers
    python scripts/study_quality.py --width 1024 --marker study_quality_1024   # section Q6
    python scripts/study_quality.py --mid            # 4,096 features in d = 256, width 1,024: section Q8
    python scripts/study_quality.py --full           # SynthSAEBench-16k's own size, one SAE: section Q7
    python scripts/study_quality.py --full --worlds --control 43 --marker study_quality_full_control   # its control
    python scripts/study_quality.py --keep saes/ ...   # also save every SAE; --reuse saes/ audits them again
                                                       # without training (minutes, not the hour)

Runtime is printed at the end and written into the table's caption.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # map_ceiling, beside this script

import sae_lens  # noqa: E402
from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainStepInput  # noqa: E402
from sae_lens.synthetic.evals import (  # noqa: E402
    ClassificationMetricsCalculator,
    feature_uniqueness,
    mean_correlation_coefficient,
)

from map_ceiling import PairTable, ceiling_lines, pair_table  # noqa: E402
from opt_hooks.adapters import make_views  # noqa: E402
from opt_hooks.run import audit_rows, rows_hook_names  # noqa: E402
from opt_hooks.synthetic import (  # noqa: E402
    EVIDENCE_PARTS,
    LEARNED_COS,
    MIN_CHILD_TOKENS,
    RowsJudged,
    World,
    ancestors,
    candidates_judged,
    evidence_parts,
    judge_rows,
    judgeable_edges,
    learned_features,
    match_latents,
    probe_absorption,
    row_kind,
    synthsaebench_world,
)

VALIDATION = ROOT / "docs" / "VALIDATION.md"
MARKER = "study_quality"  # the section's markers: <!-- study_quality:start --> ... <!-- study_quality:end -->
MID_MARKER = "study_quality_mid"  # section Q8, `--mid`
FULL_MARKER = "study_quality_full"  # section Q7, `--full`
# truth keys of two counts of wrong rows (`absorption_truth`)
WRONG_FEATURE_ON = "rows wrong, parent's feature on"
WRONG_ANCESTOR_UNLEARNED = "rows in one tree, ancestor without latent"
WRONG_NEAREST_ANCESTOR = "rows wrong, parent latent nearest an ancestor"
# the pairs whose evidence `evidence_sums` takes apart: absorbed judgeable edges, learned siblings
PAIR_KINDS = ("edges", "siblings")


@dataclass
class Sizes:
    n_features: int = 2048
    d: int = 128
    width: int = 512
    n_train: int = 300_000
    n_eval: int = 40_000  # ground-truth F1 and absorption
    n_audit: int = 40_000  # the audit (a quarter held out)
    steps: int = 2000
    pursuit_steps: int = 300  # a pursuit encodes in up to max_iterations matmuls: fewer, costlier steps
    batch: int = 1024
    bootstrap: int = 2000
    sample_rows: int | None = None  # tokens' true activations drawn at once (None: each set in one draw)


QUICK = Sizes(n_features=1024, d=64, width=256, n_train=60_000, n_eval=10_000, n_audit=10_000, steps=300,
              pursuit_steps=100, bootstrap=500)
# 4,096 features in d = 256 (true L0 about 16) with SynthSAEBench's width ratio, 1,024 latents: a
# quarter of SynthSAEBench-16k's features, ten SAEs a world on 2 cores
MID = Sizes(n_features=4096, d=256, width=1024, sample_rows=50_000)
# SynthSAEBench-16k itself (16,384 features, d = 768, true L0 about 34) with its SAE width, 4,096 latents;
# training shortened to 1.5M samples, a quarter of an hour on 2 cores with the audit (SynthSAEBench trains on 200M)
# (its generator holds several copies of a draw's (tokens, 16,384) activations: 65,536 tokens at once
# ran the 24 GB machine out of memory)
FULL = Sizes(n_features=16_384, d=768, width=4096, n_train=200_000, n_eval=20_000, n_audit=40_000, steps=1500,
             bootstrap=0, sample_rows=4096)
FULL_SEED = 42  # the recipe's own seed

JUMPRELU = {"l0_coefficient": 1.0, "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 0.5}


def specs_at(low: int, high: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, sae_lens training class, its config fields): every architecture at two L0 values,
    about half the world's true L0 and about it (the standard SAEs by their L1 coefficient)."""
    return [
        ("standard l1=5", "standard", {"l1_coefficient": 5.0}),
        ("standard l1=3", "standard", {"l1_coefficient": 3.0}),
        *[(f"batchtopk k={k}", "batchtopk", {"k": k}) for k in (low, high)],
        # Gemma Scope 2's quadratic penalty around a target L0; thresholds start at 0.5 (codes are ~4-5)
        *[(f"jumprelu L0 {k}", "jumprelu", {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(k),
                                             **JUMPRELU}) for k in (low, high)],
        *[(f"matryoshka k={k}", "matryoshka_batchtopk", {"k": k}) for k in (low, high)],
        *[(f"pursuit {k} steps", "matching_pursuit", {"max_iterations": k}) for k in (low, high)],
    ]


SPECS = specs_at(6, 12)  # the CPU-scaled worlds' true L0 is about 11
MID_SPECS = specs_at(8, 16)  # ... and the mid-size worlds' about 16
# the full-size world: SynthSAEBench's BatchTopK at its table's L0 (25)
FULL_SPECS: list[tuple[str, str, dict[str, Any]]] = [("batchtopk k=25", "batchtopk", {"k": 25})]


def control_specs(specs: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """The control world (the recipe with its hierarchy switched off): one SAE per architecture,
    its higher L0."""
    return specs[1::2]


CLASSES = {
    "standard": (sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig),
    "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig),
    "jumprelu": (sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig),
    "matryoshka_batchtopk": (sae_lens.MatryoshkaBatchTopKTrainingSAE, sae_lens.MatryoshkaBatchTopKTrainingSAEConfig),
    "matching_pursuit": (sae_lens.MatchingPursuitTrainingSAE, sae_lens.MatchingPursuitTrainingSAEConfig),
}

# The audit's numbers of a layer, each oriented as the audit reads it (larger: further from a
# stationary point of its own objective, or more flagged); `flagged share` is the one combination,
# fixed before any world was looked at: the share of latents the audit names in any table
# (a certified finding, a duplicate pair, an absorption row, dead).
AUDIT_NUMBERS = ("absorption score", "code gap", "decoder gap", "bias gap", "certified share", "flagged share", "duplicates share",
                 "absorption share", "dead share")
BASELINES = ("EV", "L0")
TRUTHS = ("F1", "MCC", "uniqueness")
QUALITY = ("F1", "MCC")  # what the shown number is chosen for


@dataclass
class SAEScore:
    world: str
    name: str
    architecture: str  # the inference SAE's (BatchTopK and Matryoshka load as jumprelu)
    truth: dict[str, float] = field(default_factory=dict)  # F1, MCC, uniqueness, true absorption rate
    baselines: dict[str, float] = field(default_factory=dict)  # EV, L0
    audit: dict[str, float] = field(default_factory=dict)  # AUDIT_NUMBERS, NaN where not measured
    seconds: float = 0.0
    reused: bool = False  # loaded from an earlier run's --keep folder (--reuse), not trained by this run
    pairs: PairTable | None = field(default=None, repr=False)  # the map's candidate pairs, judged (Q9; not saved)


def saved(score: SAEScore) -> dict[str, Any]:
    """An SAE's numbers as --json writes them (without its candidate pairs)."""
    return {k: v for k, v in asdict(replace(score, pairs=None)).items() if k != "pairs"}


DEAD_WINDOW = 100  # steps without firing after which a latent counts as dead (TopK-family auxiliary loss)


def train(kind: str, fields: dict[str, Any], x: torch.Tensor, sizes: Sizes, seed: int) -> sae_lens.TrainingSAE:
    """sae_lens' training step (its loss, coefficients and, for the TopK family and JumpReLU, its
    auxiliary loss on latents dead for DEAD_WINDOW steps) with Adam on the fixed tensor x: lr 3e-3,
    a linear decay over the last 80% of the steps, batches drawn with replacement."""
    sae_class, config_class = CLASSES[kind]
    config = dict(fields)
    if kind == "matryoshka_batchtopk":
        config["matryoshka_widths"] = [sizes.width // 8, sizes.width // 2, sizes.width]
    if kind == "matching_pursuit":
        config.update(residual_threshold=0.0, decoder_init_norm=1.0)
    torch.manual_seed(seed)
    sae = sae_class(config_class(d_in=x.shape[1], d_sae=sizes.width, metadata=SAEMetadata(hook_name="synthetic"),
                                 **config))
    coefficients = {name: value.value if isinstance(value, TrainCoefficientConfig) else value
                    for name, value in sae.get_coefficients().items()}
    steps = sizes.pursuit_steps if kind == "matching_pursuit" else sizes.steps
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, 5 * (1 - s / steps)))
    generator = torch.Generator().manual_seed(seed)
    since_fired = torch.zeros(sizes.width, dtype=torch.int64)  # as sae_lens' trainer: its dead-feature window
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (sizes.batch,), generator=generator)]
        output = sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients=coefficients, dead_neuron_mask=since_fired >= DEAD_WINDOW,
            n_training_steps=step, is_logging_step=False,
        ))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        schedule.step()
        fired = (output.feature_acts.detach() != 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + 1)
    return sae.eval()


def inference_form(sae: sae_lens.TrainingSAE, keep: Path | None = None) -> sae_lens.SAE:
    """What users load: sae_lens' own saved inference SAE (kept in `keep` when given)."""
    if keep is not None:
        sae.save_inference_model(keep)
        return sae_lens.SAE.load_from_disk(keep).eval()
    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        return sae_lens.SAE.load_from_disk(folder).eval()


@torch.no_grad()
def ground_truth(world: World, sae: sae_lens.SAE, acts: torch.Tensor, x: torch.Tensor,
                 rows: list[tuple[int, int]] = (), candidates: dict[str, torch.Tensor] | None = None,
                 ) -> tuple[dict, dict, PairTable | None]:
    """sae_lens.synthetic's scores on held-out tokens (acts, x), the true absorption rate, the
    map's `rows` judged, and its `candidates` (`PairMap.candidate_numbers`) judged for Q9."""
    vectors = world.feature_dict.feature_vectors.detach()
    z = sae.encode(x)
    recon = sae.decode(z)
    ev = 1 - float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    classes = ClassificationMetricsCalculator(sae.W_dec, vectors)
    classes.add_batch(z, acts)
    truth = {
        "F1": classes.compute().f1_score,
        "MCC": mean_correlation_coefficient(sae.W_dec, vectors),
        "uniqueness": feature_uniqueness(sae.W_dec, vectors),
    }
    absorption, pairs = absorption_truth(world, sae, acts, x, z, rows, candidates)
    return truth | absorption, {"EV": ev, "L0": float((z != 0).sum(1).double().mean())}, pairs


def absorption_truth(world: World, sae: sae_lens.SAE, acts: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                     rows: list[tuple[int, int]] = (), candidates: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[dict[str, float], PairTable | None]:
    """Means over the judgeable direct edges (`opt_hooks.synthetic.judgeable_edges`: both features
    matched, Hungarian on |decoder cosine|, to latents with cosine >= 0.5, the child firing on >= 20
    tokens):

    - absorption rate: the share of the child's firing tokens on which the parent's latent is off
      (the truth the label-free score is held against);
    - gap (SAE-Lens issue #729): P(parent latent fires | parent on, child off) - P(... | parent on,
      child on);
    - probe score: SAEBench's absorption fraction with the true parent atom as the probe
      (`opt_hooks.synthetic.probe_absorption`);
    - the map's `rows` (parent latent, child latent) judged (`opt_hooks.synthetic.judge_rows`):
      precision (the parent latent's feature an ancestor of the child latent's), how many right
      rows name the child's direct parent (`direct`), and recall over
      the absorbed judgeable edges (rate >= 0.5), oriented; the wrong rows by kind, and three counts
      of them (`feature_on`, `ancestor_unlearned`, `nearest_ancestor` below);
    - the map's `candidates` judged the same way, as a `PairTable` (None without them)."""
    atoms = world.atoms.float()
    decoder = sae.W_dec.detach().float()
    decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    latent_of = match_latents(atoms, decoder)
    judged = judgeable_edges(atoms, world.planted, acts, decoder, z, latent_of)
    centred = x - world.feature_dict.bias.detach()
    gaps, probes = [], []
    for edge in judged:
        on, parent_on = acts[:, edge.child] > 0, acts[:, edge.parent] > 0
        fires = z[:, edge.parent_latent] != 0
        if bool((parent_on & ~on).any()):
            gaps.append(float(fires[parent_on & ~on].double().mean()) - float(fires[on & parent_on].double().mean()))
        probe = probe_absorption(acts, centred, z * sae.W_dec.norm(dim=1), decoder, atoms[edge.parent],
                                 edge.parent_latent, edge.parent, edge.child)
        if probe.n_tokens:
            probes.append(probe.fraction)
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    verdict = judge_rows(rows, world.planted, latent_of, judged)
    parent_of, feature_of = {c: p for p, c in world.planted}, {k: f for f, k in latent_of.items()}
    kind = {(p, c): row_kind(p, c, feature_of, parent_of) for p, c in rows}

    # wrong rows whose parent latent's feature is on where the child latent fires (on half of its
    # held-out tokens or more): the child's atom carries a feature that co-occurs with it, not an ancestor
    def feature_on(p: int, c: int) -> bool:
        fires = z[:, c] != 0
        if kind[p, c] == "right" or p not in feature_of or c not in feature_of or not bool(fires.any()):
            return False
        return float((acts[fires, feature_of[p]] > 0).double().mean()) >= 0.5

    # wrong rows between two features of one tree (siblings, cousins) whose nearest common ancestor
    # has no latent of its own (none matched with cosine >= LEARNED_COS): the ancestor is coded only
    # inside its descendants' latents, section S's second twin family
    def ancestor_unlearned(p: int, c: int) -> bool:
        if kind[p, c] not in ("siblings", "same_tree"):
            return False
        fp, fc = feature_of[p], feature_of[c]
        common = (ancestors(fp, parent_of) | {fp}) & (ancestors(fc, parent_of) | {fc})
        nearest = max(common, key=lambda f: len(ancestors(f, parent_of)))
        if nearest not in latent_of:
            return True
        return float(decoder[latent_of[nearest]].double() @ atoms[nearest].double()) < LEARNED_COS

    # wrong rows whose parent latent's nearest feature (largest |cosine|, the matching's measure) is
    # an ancestor of the child latent's matched feature: the row names an ancestor's direction, but
    # the one-to-one matching gave that feature to another latent (a latent of the ancestor that
    # also carries what the truth puts elsewhere, its unlearned children or a sibling)
    def nearest_ancestor(p: int, c: int) -> bool:
        if kind[p, c] == "right" or c not in feature_of:
            return False
        nearest = int((atoms @ decoder[p]).abs().argmax())
        return nearest in ancestors(feature_of[c], parent_of)

    # where any geometric map starts: is the parent's latent the child latent's nearest alive atom?
    alive = (z != 0).any(dim=0)
    nearest = [int(torch.where(alive, decoder @ decoder[e.child_latent], -2.0).index_fill(0, torch.tensor(
        [e.child_latent]), -2.0).argmax()) == e.parent_latent for e in judged if e.absorbed]
    parts = evidence_sums(acts, x - sae.b_dec.detach(), z, decoder, atoms, judged, latent_of, parent_of)
    pairs = None
    if candidates is not None:
        pairs_of = list(zip(candidates["parent"].tolist(), candidates["child"].tolist()))
        right, found = candidates_judged(pairs_of, world.planted, latent_of, judged)
        pairs = pair_table(candidates, right, found, verdict.absorbed, decoder.shape[0])
    return {**parts, "absorption rate": mean([e.rate for e in judged]), "#729 gap": mean(gaps),
            "probe score": mean(probes),
            "judgeable edges": float(len(judged)), "absorbed edges": float(verdict.absorbed),
            "rows precision": verdict.precision, "rows recall": verdict.recall, "rows right": float(verdict.right),
            "rows found": float(verdict.found), "rows direct": float(verdict.direct), "parent nearest": mean(nearest),
            "rows reversed": float(verdict.reversed), "rows siblings": float(verdict.siblings),
            "rows same tree": float(verdict.same_tree), "rows other": float(verdict.other),
            WRONG_FEATURE_ON: float(sum(feature_on(p, c) for p, c in rows)),
            WRONG_ANCESTOR_UNLEARNED: float(sum(ancestor_unlearned(p, c) for p, c in rows)),
            WRONG_NEAREST_ANCESTOR: float(sum(nearest_ancestor(p, c) for p, c in rows))}, pairs


def evidence_sums(acts: torch.Tensor, centred: torch.Tensor, z: torch.Tensor, decoder: torch.Tensor,
                  atoms: torch.Tensor, judged: list, latent_of: dict[int, int],
                  parent_of: dict[int, int]) -> dict[str, float]:
    """Where the map's evidence comes from (`opt_hooks.synthetic.evidence_parts`), on these
    tokens with the SAE's own codes: each part's mean summed over the absorbed judgeable edges,
    and over the ordered pairs of learned siblings (two children of one parent, each matched to a
    latent that fires, with cosine >= LEARNED_COS: `learned_features`; the first one's latent
    plays the parent), with their counts; a pair counts where its child latent fires without the
    other on >= MIN_CHILD_TOKENS tokens. Sums, so the SAEs of a world pool by adding them."""
    learned = learned_features(atoms, decoder, z, latent_of)  # a latent that never fires has no pair here
    fires = z != 0
    children: dict[int, list[int]] = {}
    for child, parent in parent_of.items():
        if child in learned:
            children.setdefault(parent, []).append(child)
    pairs = {"edges": [(e.parent, e.child) for e in judged if e.absorbed],
             "siblings": [(a, b) for kids in children.values() for a in kids for b in kids if a != b]}
    out = {}
    for kind, features in pairs.items():
        out[f"parts {kind}"] = 0.0
        for where in ("P", "T"):
            out.update({f"parts {kind} {where} {part}": 0.0 for part in EVIDENCE_PARTS})
        for parent, child in features:
            lp, lc = latent_of[parent], latent_of[child]
            if int((fires[:, lc] & ~fires[:, lp]).sum()) < MIN_CHILD_TOKENS or not bool(fires[:, lp].any()):
                continue
            split = evidence_parts(acts, centred, atoms, decoder[lp], fires[:, lp], fires[:, lc], parent, child,
                                   parent_of)
            out[f"parts {kind}"] += 1
            for where, values in (("P", split.on_parent), ("T", split.on_child)):
                for part, value in values.items():
                    out[f"parts {kind} {where} {part}"] += value
    return out


def audit_numbers(sae: sae_lens.SAE, x: torch.Tensor
                  ) -> tuple[dict[str, float], list[tuple[int, int]], dict[str, torch.Tensor]]:
    """The layer's numbers from the run behind `oh.audit_activations` (a quarter of the tokens
    held out), its absorption rows (parent latent, child latent) and the map's candidate pairs
    with their numbers (`PairMap.candidate_numbers`, from which the rows were chosen)."""
    run = audit_rows(make_views(sae, rows_hook_names(sae, None, x)), x, held_out=0.25, lam=None, nonfinite="raise",
                     options=None, progress=False)
    layer = run.result.layers["sae"]
    plan = run.router.plans["sae"]
    candidates = plan.pair_map.candidate_numbers(plan.state, plan.policy)
    k = layer.d_sae

    def gap(name: str) -> float:
        entry = layer.gaps.get(name)
        return float(entry["share"]) if entry and entry.get("share") is not None else math.nan

    certified = {f.id for f in layer.features if f.tier == "certified"}
    duplicated = {i for row in layer.duplicates for i in (row.i, row.j)}
    absorbed = {i for row in layer.absorption for i in (row.parent, row.child)}
    dead = set(layer.dead_features)
    m = layer.pair_map
    return {
        "absorption score": m["absorption_score"], "absorption score se": m["absorption_score_se"],
        "absorption rows": float(len(layer.absorption)),
        "absorption rows per 1000": 1000 * len(layer.absorption) / k,
        "code gap": gap("codes"), "decoder gap": gap("decoder"), "bias gap": gap("bias"),
        "certified share": len(certified) / k,
        "flagged share": layer.flagged_share(),  # certified, duplicated, absorbed or dead
        "duplicates share": len(duplicated) / k, "absorption share": len(absorbed) / k,
        "dead share": len(dead) / k,
    }, [(row.parent, row.child) for row in layer.absorption], candidates


def draw(world: World, n: int, rows: int | None, inputs_only: bool = False) -> torch.Tensor:
    """The true activations of n tokens drawn from the world (or only their inputs x), drawn
    `rows` tokens at a time (None: at once)."""
    rows = rows or n
    pieces = (world.generator.sample(min(rows, n - start)) for start in range(0, n, rows))
    return torch.cat([world.feature_dict(acts) if inputs_only else acts for acts in pieces])


def study_world(seed: int, sizes: Sizes, specs: list[tuple[str, str, dict[str, Any]]],
                keep: Path | None = None, hierarchy: bool = True, reuse: Path | None = None) -> list[SAEScore]:
    world = synthsaebench_world(seed, n_features=sizes.n_features, d=sizes.d, hierarchy=hierarchy)
    label = f"world {seed}" if hierarchy else f"control {seed}"
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        x_train = draw(world, sizes.n_train, sizes.sample_rows, inputs_only=True)
        acts_eval = draw(world, sizes.n_eval, sizes.sample_rows)
        x_eval = world.feature_dict(acts_eval)
        x_audit = draw(world, sizes.n_audit, sizes.sample_rows, inputs_only=True)
    true_l0 = float((acts_eval > 0).sum(1).double().mean())
    print(f"{label}: {world.name}, true L0 {true_l0:.1f}", flush=True)
    scores = []
    for position, (name, kind, fields) in enumerate(specs):
        started = time.perf_counter()
        where = Path(label.replace(" ", "")) / re.sub(r"[^a-z0-9]+", "_", name)
        reused = reuse is not None and (reuse / where).is_dir()
        if reused:  # an earlier run's SAE (--keep), not trained again
            sae = sae_lens.SAE.load_from_disk(reuse / where).eval()
        else:
            sae = inference_form(train(kind, fields, x_train, sizes, seed=1000 * seed + position),
                                 None if keep is None else keep / where)
        audit, rows, candidates = audit_numbers(sae, x_audit)
        truth, baselines, pairs = ground_truth(world, sae, acts_eval, x_eval, rows, candidates)
        truth["true L0"] = true_l0
        score = SAEScore(world=label, name=name, architecture=sae.cfg.architecture(), truth=truth,
                         baselines=baselines, audit=audit, reused=reused,
                         seconds=time.perf_counter() - started, pairs=pairs)
        scores.append(score)
        print(f"  {name:18s} EV {baselines['EV']:.3f} L0 {baselines['L0']:5.1f} F1 {truth['F1']:.3f} "
              f"MCC {truth['MCC']:.3f} rows {len(rows)} precision {truth['rows precision']:.2f} "
              f"recall {truth['rows recall']:.2f}  " + " ".join(f"{k} {v:.3g}" for k, v in score.audit.items())
              + f"  ({score.seconds:.0f} s)", flush=True)
    return scores


# -- statistics ------------------------------------------------------------------------------


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho over the pairs where both are finite (NaN with < 3 pairs or a constant side)."""
    pairs = [(u, v) for u, v in zip(a, b) if math.isfinite(u) and math.isfinite(v)]
    if len(pairs) < 3:
        return math.nan
    ra, rb = rankdata([u for u, _ in pairs]).tolist(), rankdata([v for _, v in pairs]).tolist()  # ties share
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((u - ma) * (v - mb) for u, v in zip(ra, rb))
    va, vb = sum((u - ma) ** 2 for u in ra), sum((v - mb) ** 2 for v in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def bootstrap(a: list[float], b: list[float], reps: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman's rho, resampling the SAEs with replacement."""
    rng = random.Random(seed)
    n, values = len(a), []
    for _ in range(reps):
        picks = [rng.randrange(n) for _ in range(n)]
        rho = spearman([a[i] for i in picks], [b[i] for i in picks])
        if math.isfinite(rho):
            values.append(rho)
    if not values:
        return math.nan, math.nan
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def value_of(score: SAEScore, name: str) -> float:
    return {**score.truth, **score.baselines, **score.audit}[name]


def correlations(scores: list[SAEScore], reps: int) -> dict[str, dict[str, tuple[float, float, float]]]:
    """number -> truth -> (rho, low, high)."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for number in (*BASELINES, *AUDIT_NUMBERS):
        a = [value_of(s, number) for s in scores]
        out[number] = {}
        for truth in TRUTHS:
            b = [value_of(s, truth) for s in scores]
            out[number][truth] = (spearman(a, b), *bootstrap(a, b, reps))
    return out


ABSORPTION_NUMBERS = ("absorption score", "absorption share", "probe score", "#729 gap")


def absorption_correlations(scores: list[SAEScore], reps: int) -> dict[str, tuple[float, float, float]]:
    """number -> (rho, low, high) with the true absorption rate."""
    truth = [s.truth["absorption rate"] for s in scores]
    out = {}
    for number in ABSORPTION_NUMBERS:
        a = [value_of(s, number) for s in scores]
        out[number] = (spearman(a, truth), *bootstrap(a, truth, reps))
    return out


def chosen_number(table: dict[str, dict[str, tuple[float, float, float]]], scores: list[SAEScore]) -> str:
    """The audit number that ranks the selection world's SAEs best by quality: the largest mean over
    F1 and MCC of -rho (an audit number reads "larger: worse"), among those measured on every SAE
    of the world (a number the audit skips for some architectures cannot rank them)."""
    measured = [n for n in AUDIT_NUMBERS if all(math.isfinite(s.audit[n]) for s in scores)
                and all(math.isfinite(table[n][t][0]) for t in QUALITY)]
    return max(measured, key=lambda n: -sum(table[n][t][0] for t in QUALITY) / len(QUALITY))


def verdict(tables: dict[str, dict], chosen: str, worlds: list[str]) -> str:
    """One sentence per reported world: the chosen number's oriented rho against EV's as users read
    it (larger EV: better)."""
    out = []
    for w in worlds:
        parts = []
        for t in QUALITY:
            ours, ev = -tables[w][chosen][t][0], tables[w]["EV"][t][0]
            parts.append(f"{t}: {fmt(ours, 2)} against EV's {fmt(ev, 2)}")
        out.append(f"{w}: " + "; ".join(parts))
    return "; ".join(out) or "none (one world only)"


# -- the tables ------------------------------------------------------------------------------


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def command() -> str:
    """This run's command line, as the table's caption names it."""
    shown, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg in ("--json", "--keep", "--reuse"):  # where the outputs went is not how they were made
            skip = not skip
            continue
        shown.append(arg)
    return " ".join(["python scripts/study_quality.py", *shown])


def markdown(scores: dict[str, list[SAEScore]], tables: dict[str, dict], absorption: dict[str, dict], chosen: str,
             seconds: float, sizes: Sizes, control: list[SAEScore] = ()) -> str:
    worlds = list(scores)
    every = [s for rows in scores.values() for s in rows] + list(control)
    reused = sum(s.reused for s in every)
    took = f"{seconds / 60:.0f} min on 2 CPU cores"
    if reused:
        took += (f"; {reused} of its {len(every)} SAEs loaded from an earlier run's `--keep` folder (`--reuse`), "
                 "their training not counted")
    lines = [
        f"Regenerated by `{command()}` ({took}). "
        f"Worlds: `synthsaebench_world(seed)` with {sizes.n_features:,} features in d = {sizes.d}; "
        f"{training_caption(sizes, pursuit=True)} Selection world: {worlds[0]}; reported: "
        f"{', '.join(worlds[1:]) or 'none'}.",
        "",
        "**Q1. Every SAE: ground truth and the audit's numbers.**",
        "",
        *QUALITY_HEAD,
    ]
    lines += [quality_line(s) for rows in scores.values() for s in rows]
    lines += ["", "**Q2. Spearman's rho with ground-truth quality across the SAEs of a world**, with its 95% "
              "bootstrap interval over the SAEs (audit numbers read \"larger: worse\", so a useful one is negative "
              "against F1 and MCC):", "",
              "| number | " + " | ".join(f"{w}: {t}" for w in worlds for t in TRUTHS) + " |",
              "|---|" + "---|" * (len(worlds) * len(TRUTHS))]
    for number in (*BASELINES, *AUDIT_NUMBERS):
        cells = []
        for w in worlds:
            for t in TRUTHS:
                rho, low, high = tables[w][number][t]
                cells.append(f"{fmt(rho, 2)} [{fmt(low, 2)}, {fmt(high, 2)}]")
        mark = " (chosen on " + worlds[0] + ")" if number == chosen else ""
        lines.append(f"| {number}{mark} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen on {worlds[0]}: **{chosen}**. Its -rho (larger: ranks better SAEs higher) beside "
              f"EV's rho as users read EV (larger: better), on the reported worlds: "
              f"{verdict(tables, chosen, worlds[1:])}."]
    lines += ["", "**Q3. Absorption, per SAE: the truth (judgeable direct edges), the label-free score, the probe "
              "score and #729's gap.**", "",
              *ABSORPTION_HEAD]
    lines += [absorption_line(s) for rows in scores.values() for s in rows]
    lines += ["", "The map's rows pooled over each world's SAEs (precision: rows whose parent latent's matched "
              "feature is an ancestor of the child latent's; recall: judgeable absorbed direct edges found as a "
              "row, oriented; targets 0.8 and 0.8; *parent nearest*: the share of absorbed edges whose parent's "
              "latent is the child latent's nearest alive atom, where a geometric map starts; wrong rows by "
              "what the truth makes of their two features: reversed, siblings, same tree (one tree, neither "
              "relation), other (two trees, or a feature in none)): "
              + "; ".join(pooled_rows(w, rows) for w, rows in scores.items()) + "."]
    lines += evidence_table(scores)
    lines += ["", "**Q4. Spearman's rho with the true absorption rate across the SAEs of a world** (the probe score "
              "and the gap use the labels; the score and the share do not):", "",
              "| number | " + " | ".join(worlds) + " |", "|---|" + "---|" * len(worlds)]
    for number in ABSORPTION_NUMBERS:
        cells = [f"{fmt(absorption[w][number][0], 2)} [{fmt(absorption[w][number][1], 2)}, "
                 f"{fmt(absorption[w][number][2], 2)}]" for w in worlds]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evidence_table(scores: dict[str, list[SAEScore]]) -> list[str]:
    """The map's evidence taken apart by the truth (`evidence_sums`), pooled over each world's
    SAEs (none for numbers saved before it)."""
    every = [s for rows in scores.values() for s in rows]
    if not every or not all(f"parts {kind}" in s.truth for s in every for kind in PAIR_KINDS):
        return []
    lines = ["", "The map's evidence taken apart by the truth (the same held-out tokens, each SAE's own codes): the "
             "mean component of the input less b_dec along the parent latent's atom on the tokens where that "
             "latent fires (P) and where the child latent fires without it (T), split by feature: the parent, its "
             "ancestors, its other descendants (other than the child and the child's own), the child and its "
             "descendants, every other feature, and what no feature carries (offset); evidence = the mean total on "
             "T over the mean total on P (the map asks for >= 0.5, significantly). Averaged over each world's "
             "absorbed judgeable edges, and over its ordered pairs of learned siblings (two children of one "
             "parent, both matched with cosine >= 0.5; the first one's latent plays the parent, so their shared "
             "parent counts among its ancestors):", "",
             "| world | pairs | n | tokens | " + " | ".join(EVIDENCE_PARTS) + " | total | evidence |",
             "|---|---|---|---|" + "---|" * (len(EVIDENCE_PARTS) + 2)]
    for world, rows in scores.items():
        for kind in PAIR_KINDS:
            n = sum(s.truth[f"parts {kind}"] for s in rows)
            if not n:
                continue
            means = {where: [sum(s.truth[f"parts {kind} {where} {part}"] for s in rows) / n for part in EVIDENCE_PARTS]
                     for where in ("P", "T")}
            for where, values in means.items():
                evidence = f"{sum(means['T']) / sum(means['P']):.2f}" if where == "T" else ""
                lines.append(f"| {world} | {'absorbed edges' if kind == 'edges' else kind} | {n:,.0f} | {where} | "
                             + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values):.2f} | {evidence} |")
    return lines


def training_caption(sizes: Sizes, pursuit: bool) -> str:
    """The captions' account of the SAEs' training and the tokens each measurement used."""
    steps = f"{sizes.steps} steps of {sizes.batch} tokens" + (
        f" ({sizes.pursuit_steps} for matching pursuit)" if pursuit else "")
    return (f"SAEs of width {sizes.width}, trained {steps} on {sizes.n_train:,} fixed tokens; truth on "
            f"{sizes.n_eval:,} held-out tokens, the audit on {sizes.n_audit:,} others.")


QUALITY_HEAD = ("| world | SAE | inference arch | EV | L0 | F1 | MCC | uniq. | "
                + " | ".join(a for a in AUDIT_NUMBERS if a != "absorption score") + " |",
                "|" + "---|" * (8 + len(AUDIT_NUMBERS) - 1))
ABSORPTION_HEAD = ("| world | SAE | judgeable edges (absorbed) | true absorption rate | absorption score ± SE | "
                   "absorption share | probe score | #729 gap | map rows | rows precision | rows recall | "
                   "parent nearest |", "|---|---|---|---|---|---|---|---|---|---|---|---|")


def quality_line(s: SAEScore) -> str:
    """One SAE's row of Q1: ground truth and the audit's numbers."""
    return (f"| {s.world} | {s.name} | {s.architecture} | {fmt(s.baselines['EV'])} | {fmt(s.baselines['L0'])} | "
            f"{fmt(s.truth['F1'])} | {fmt(s.truth['MCC'])} | {fmt(s.truth['uniqueness'])} | "
            + " | ".join(fmt(s.audit[n]) for n in AUDIT_NUMBERS if n != "absorption score") + " |")


def absorption_line(s: SAEScore) -> str:
    """One SAE's row of Q3: the absorption truth beside the label-free score and the map's rows."""
    return (f"| {s.world} | {s.name} | {s.truth['judgeable edges']:.0f} ({s.truth['absorbed edges']:.0f}) | "
            f"{fmt(s.truth['absorption rate'])} | "
            f"{fmt(s.audit['absorption score'])} ± {fmt(s.audit['absorption score se'], 2)} | "
            f"{fmt(s.audit['absorption share'])} | {fmt(s.truth['probe score'])} | {fmt(s.truth['#729 gap'])} | "
            f"{s.audit['absorption rows']:.0f} | {fmt(s.truth['rows precision'], 2)} | "
            f"{fmt(s.truth['rows recall'], 2)} | {fmt(s.truth['parent nearest'], 2)} |")


def full_markdown(scores: list[SAEScore], seconds: float, sizes: Sizes) -> str:
    """The full-size worlds (`--full`): their SAEs' rows of Q1 and Q3, no correlations (too few SAEs)."""
    took = ", ".join(f"{s.world}, {s.name}: {s.seconds / 60:.0f} min trained, audited and scored" for s in scores)
    worlds = {s.world: s.truth["true L0"] for s in scores}
    hierarchy = [s for s in scores if not s.world.startswith("control")]
    return "\n".join([
        f"Regenerated by `{command()}` ({seconds / 60:.0f} min on 2 CPU cores, the worlds' construction "
        f"included; {took}). Worlds: `synthsaebench_world(seed)` with {sizes.n_features:,} features in "
        f"d = {sizes.d} (true L0: " + ", ".join(f"{w} {l0:.1f}" for w, l0 in worlds.items()) + "; a control has no "
        f"hierarchy); {training_caption(sizes, pursuit=False)}", "",
        *QUALITY_HEAD, *(quality_line(s) for s in scores), "", *ABSORPTION_HEAD,
        *(absorption_line(s) for s in scores), "",
        "Absorption rows per 1,000 latents: " + ", ".join(
            f"{s.world} {s.name} {fmt(s.audit['absorption rows per 1000'])}" for s in scores) + ".",
        *(["Rows pooled: " + pooled_rows(hierarchy[0].world, hierarchy) + "."] if hierarchy else []),
    ]) + "\n"


def pooled_rows(world: str, scores: list[SAEScore]) -> str:
    pooled = RowsJudged(rows=round(sum(s.audit["absorption rows"] for s in scores)),
                        right=round(sum(s.truth["rows right"] for s in scores)),
                        absorbed=round(sum(s.truth["absorbed edges"] for s in scores)),
                        found=round(sum(s.truth["rows found"] for s in scores)))
    text = (f"{world}: precision {fmt(pooled.precision, 2)} ({pooled.right} of {pooled.rows} rows), "
            f"recall {fmt(pooled.recall, 2)} ({pooled.found} of {pooled.absorbed} edges)")
    if all("rows direct" in s.truth for s in scores):  # numbers saved before this count have none
        direct = round(sum(s.truth["rows direct"] for s in scores))
        text += (f"; {direct} of the {pooled.right} right rows name the child's direct parent, the others a "
                 "further ancestor")
    kinds = ("reversed", "siblings", "same tree", "other")
    keys = (*(f"rows {kind}" for kind in kinds), WRONG_FEATURE_ON, WRONG_ANCESTOR_UNLEARNED)
    if not all(key in s.truth for s in scores for key in keys):  # numbers saved before the breakdown
        return text
    wrong = {kind: round(sum(s.truth[f"rows {kind}"] for s in scores)) for kind in kinds}
    feature_on = round(sum(s.truth[WRONG_FEATURE_ON] for s in scores))
    unlearned = round(sum(s.truth[WRONG_ANCESTOR_UNLEARNED] for s in scores))
    text += ("; wrong rows: " + ", ".join(f"{n} {kind}" for kind, n in wrong.items())
             + f" ({unlearned} of the siblings and same-tree rows with their nearest common ancestor "
             f"without a latent of its own); {feature_on} wrong rows with the parent latent's feature on where "
             "the child latent fires")
    if all(WRONG_NEAREST_ANCESTOR in s.truth for s in scores):  # numbers saved before this count have none
        nearest = round(sum(s.truth[WRONG_NEAREST_ANCESTOR] for s in scores))
        text += (f"; {nearest} wrong rows whose parent latent's nearest feature is an ancestor of the child "
                 "latent's (the matching gave that feature to another latent)")
    return text


def control_table(control: list[SAEScore]) -> str:
    """The score and the map's rows where no hierarchy was planted."""
    if not control:
        return ""
    lines = ["", f"**Q5. {control[0].world}: the same recipe with the hierarchy switched off** (every feature "
             "independent; one SAE per architecture): what the absorption score and the map's rows read where "
             "there is nothing to absorb.", "",
             "| SAE | EV | L0 | absorption score ± SE | absorption rows per 1,000 latents |", "|---|---|---|---|---|"]
    for s in control:
        lines.append(f"| {s.name} | {fmt(s.baselines['EV'])} | {fmt(s.baselines['L0'])} | "
                     f"{fmt(s.audit['absorption score'])} ± {fmt(s.audit['absorption score se'], 2)} | "
                     f"{fmt(s.audit['absorption rows per 1000'])} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, marker: str = MARKER) -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    doc = VALIDATION.read_text()
    if start not in doc:
        raise SystemExit(f"{VALIDATION} has no {start} marker: add the section's markers first")
    new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}{end}", doc, flags=re.S)
    VALIDATION.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small world, short training: a smoke run")
    parser.add_argument("--full", action="store_true",
                        help=f"SynthSAEBench-16k's own size (16,384 features, d = 768), one BatchTopK SAE of "
                             f"4,096 latents per world (default: world {FULL_SEED}, no control): section Q7 "
                             f"(~50 min a world)")
    parser.add_argument("--mid", action="store_true",
                        help="4,096 features in d = 256, ten SAEs of 1,024 latents per world (default: worlds 1 and "
                             "2, control 3): section Q8")
    parser.add_argument("--worlds", type=int, nargs="*",
                        help="world seeds (default 1 2 4 5; 1 2 with --mid); the first selects the number shown "
                             "to users, the others report it. With --full, none: the control alone")
    parser.add_argument("--control", type=int,
                        help="seed of the control world (no hierarchy; -1: none; default 3, none with --full), "
                             "one SAE per architecture")
    parser.add_argument("--json", type=Path, help="also write every SAE's numbers here")
    parser.add_argument("--width", type=int, help="SAE width (default 512, a quarter of the features)")
    parser.add_argument("--marker",
                        help=f"the docs/VALIDATION.md section to write (its <!-- NAME:start --> markers; default "
                             f"{MARKER}, {MID_MARKER} with --mid, {FULL_MARKER} with --full)")
    parser.add_argument("--keep", type=Path, help="save every trained inference SAE under this folder")
    parser.add_argument("--reuse", type=Path,
                        help="load the SAEs an earlier run saved with --keep DIR from DIR instead of training them "
                             "(the same seeds and sizes; the worlds' tokens are drawn again, identically)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/VALIDATION.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.mid and (args.full or args.quick):
        parser.error("--mid is a size of its own: leave out --full and --quick")
    sizes = QUICK if args.quick else FULL if args.full else MID if args.mid else Sizes()
    specs = MID_SPECS if args.mid else SPECS
    if args.width:
        sizes = replace(sizes, width=args.width)
    seeds = (args.worlds if args.worlds is not None else [FULL_SEED] if args.full else [1, 2] if args.mid
             else [1, 2, 4, 5])
    seeds = seeds[:1] if args.quick else seeds
    control_seed = args.control if args.control is not None else -1 if args.full else 3
    marker = args.marker or (FULL_MARKER if args.full else MID_MARKER if args.mid else MARKER)
    if not seeds and not (args.full and control_seed >= 0):
        parser.error("--full needs a world (--worlds SEED) or a control (--control SEED)" if args.full else
                     "--worlds needs at least one seed: the first world selects the number shown to users")
    started = time.perf_counter()
    if args.full:
        scores = [s for seed in seeds for s in study_world(seed, sizes, FULL_SPECS, args.keep, reuse=args.reuse)]
        if control_seed >= 0:
            scores += study_world(control_seed, sizes, FULL_SPECS, args.keep, hierarchy=False, reuse=args.reuse)
        text = full_markdown(scores, time.perf_counter() - started, sizes)
        numbers = {"sizes": asdict(sizes), "scores": [saved(s) for s in scores]}
    else:
        worlds = {f"world {seed}": study_world(seed, sizes, specs, args.keep, reuse=args.reuse) for seed in seeds}
        control = ([] if args.quick or control_seed < 0
                   else study_world(control_seed, sizes, control_specs(specs), args.keep, hierarchy=False,
                                    reuse=args.reuse))
        tables = {w: correlations(rows, sizes.bootstrap) for w, rows in worlds.items()}
        first = next(iter(tables))
        chosen = chosen_number(tables[first], worlds[first])
        absorption = {w: absorption_correlations(rows, sizes.bootstrap) for w, rows in worlds.items()}
        text = (markdown(worlds, tables, absorption, chosen, time.perf_counter() - started, sizes, control)
                + control_table(control)
                + "\n".join(ceiling_lines({w: [s.pairs for s in rows] for w, rows in worlds.items()},
                                           [s.pairs for s in control])) + "\n")
        numbers = {"sizes": asdict(sizes), "chosen": chosen,
                   "scores": [saved(s) for rows in [*worlds.values(), control] for s in rows]}
    print(text)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))
    if not (args.quick or args.no_write):
        write_section(text, marker)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
