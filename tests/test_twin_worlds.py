"""Twin worlds (opt_hooks/twin_worlds.py; docs/VALIDATION.md section S): one activation tensor,
several truths. Each truth must generate the same x exactly and be a world of its kind; the one
audit of x is then judged against every truth with the study's own judge, and the judgements must
disagree the way the construction says: what no label-free map can get right in all of them."""
from __future__ import annotations

import math

import pytest
import torch

from opt_hooks.synthetic import (
    EVIDENCE_PARTS,
    JudgedEdge,
    audit_codes,
    candidates_judged,
    evidence_parts,
    judge_rows,
    judgeable_edges,
    match_latents,
)
from opt_hooks.twin_worlds import absorbed_or_exclusive, parent_mirror_or_siblings

N = 8000


def audit_rows(twins) -> list[tuple[int, int]]:
    """The map's rows of the exact SAE on the twins' x, a third of the tokens held out."""
    held = torch.arange(N) % 3 == 2
    bias = torch.zeros(twins.x.shape[1], dtype=torch.float64)
    layer = audit_codes(twins.sae_atoms, bias, twins.x, twins.codes, held, lam=None)
    return [(row.parent, row.child) for row in layer.absorption]


def judged(twins, truth, rows):
    latent_of = match_latents(truth.atoms, twins.sae_atoms)
    edges = judgeable_edges(truth.atoms, truth.edges, truth.acts, twins.sae_atoms, twins.codes, latent_of)
    return edges, judge_rows(rows, truth.edges, latent_of, edges)


@pytest.mark.parametrize("family", [absorbed_or_exclusive, parent_mirror_or_siblings])
def test_every_truth_generates_the_same_activations_and_the_sae_codes_them_exactly(family):
    twins = family(N)
    assert torch.allclose(twins.codes @ twins.sae_atoms, twins.x, atol=1e-12, rtol=0)
    for truth in twins.truths:
        assert torch.allclose(truth.x(), twins.x, atol=1e-12, rtol=0), truth.name
        assert (truth.acts >= 0).all()
        assert torch.allclose(truth.atoms.norm(dim=1), torch.ones(len(truth.atoms), dtype=torch.float64))
        for parent, child in truth.edges:  # a strict hierarchy: the child never fires without its parent
            assert not ((truth.acts[:, child] > 0) & (truth.acts[:, parent] == 0)).any(), truth.name
        on = truth.acts > 0
        if not truth.edges:  # the world without a hierarchy: its two structure features never fire together
            assert not (on[:, 0] & on[:, 1]).any() and on[:, 0].any() and on[:, 1].any()
        if len(truth.edges) == 2:  # the siblings: mutually exclusive, their root never alone
            assert not (on[:, 1] & on[:, 2]).any() and (on[:, 0] == (on[:, 1] | on[:, 2])).all()


def test_absorbed_hierarchy_and_exclusive_features_get_one_map():
    twins = absorbed_or_exclusive(N)
    hierarchy, exclusive = twins.truths
    rows = audit_rows(twins)
    # on this clean world the map finds the absorbed edge, parent latent 0 over child latent 1 ...
    assert rows == [(0, 1)]
    edges, verdict = judged(twins, hierarchy, rows)
    assert [(e.parent_latent, e.child_latent, e.rate) for e in edges] == [(0, 1, 1.0)]  # absorbed on every token
    assert (verdict.precision, verdict.recall) == (1.0, 1.0)
    # ... and the same row sits in the world with no hierarchy, where the SAE is the truth itself
    edges, verdict = judged(twins, exclusive, rows)
    assert edges == [] and exclusive.edges == []
    assert torch.allclose(exclusive.atoms, twins.sae_atoms) and torch.allclose(exclusive.acts, twins.codes)
    assert verdict.rows == 1 and verdict.right == 0


def test_no_orientation_of_the_row_is_right_in_every_world():
    twins = parent_mirror_or_siblings(N)
    siblings, parent_first, parent_second = twins.truths
    right = {}
    for truth in twins.truths:
        edges, _ = judged(twins, truth, [])
        absorbed = [(e.parent_latent, e.child_latent) for e in edges if e.absorbed]
        right[truth.name] = {row for row in ((0, 1), (1, 0)) if judged(twins, truth, [row])[1].right}
        if truth is siblings:
            assert absorbed == []  # the root has no latent: nothing judgeable, and no row is right
        else:
            assert len(absorbed) == 1 and right[truth.name] == set(absorbed)
    assert right[siblings.name] == set()
    assert right[parent_first.name] == {(0, 1)} and right[parent_second.name] == {(1, 0)}
    # any row about the pair is wrong in at least two of the three worlds; the map abstains: on
    # either latent's tokens the input carries the other's atom at rho = 0.2 of its own size, in
    # both orientations alike, below min_evidence -- recall 0 in both parent worlds
    assert audit_rows(twins) == []


def test_the_judge_counts_ancestors_right_and_needs_the_orientation():
    edges = [(0, 1), (1, 2)]  # features: 0 -> 1 -> 2, and 3 apart
    latent_of = {0: 10, 1: 11, 2: 12, 3: 13}
    judged = [JudgedEdge(0, 1, 10, 11, rate=0.9), JudgedEdge(1, 2, 11, 12, rate=0.2)]  # only the first absorbed
    verdict = judge_rows([(10, 12), (11, 10), (13, 11), (10, 11)], edges, latent_of, judged)
    # a grandparent row is right, a reversed or unrelated one is not; the absorbed edge is found oriented
    assert (verdict.rows, verdict.right, verdict.absorbed, verdict.found) == (4, 2, 1, 1)
    assert verdict.direct == 1  # (10, 11) names the direct parent, (10, 12) the grandparent
    assert judge_rows([(11, 12), (10, 12)], edges, latent_of, judged).direct == 1  # unabsorbed direct edge counts
    assert verdict.precision == 0.5 and verdict.recall == 1.0
    assert judge_rows([(11, 10)], edges, latent_of, judged).recall == 0.0
    empty = judge_rows([], edges, latent_of, [])
    assert math.isnan(empty.precision) and math.isnan(empty.recall)


def test_candidate_pairs_are_judged_as_the_judge_would_judge_them_as_rows():
    edges = [(0, 1), (1, 2)]  # features: 0 -> 1 -> 2, and 3 apart
    latent_of = {0: 10, 1: 11, 2: 12, 3: 13}
    judged = [JudgedEdge(0, 1, 10, 11, rate=0.9), JudgedEdge(1, 2, 11, 12, rate=0.2)]  # only the first absorbed
    pairs = [(10, 12), (11, 10), (13, 11), (10, 11), (11, 12), (19, 11)]
    right, found = candidates_judged(pairs, edges, latent_of, judged)
    # right as the judge counts it (any ancestor, oriented); found: the absorbed direct edge only,
    # not its grandparent row nor the unabsorbed direct edge (11, 12); latent 19 has no feature
    assert right == [True, False, False, True, True, False]
    assert found == [False, False, False, True, False, False]
    for pair, is_right in zip(pairs, right):
        assert judge_rows([pair], edges, latent_of, judged).right == is_right


def test_the_judge_sorts_wrong_rows_by_what_the_truth_makes_of_them():
    # features: 0 -> {1, 2}, 1 -> {3}, 2 -> {4}; 5 in no tree; latent 10 + f, latent 19 without a feature
    edges = [(0, 1), (0, 2), (1, 3), (2, 4)]
    latent_of = {f: 10 + f for f in range(6)}
    rows = [(10, 13), (11, 10), (11, 12), (11, 14), (15, 11), (19, 11), (13, 14)]
    verdict = judge_rows(rows, edges, latent_of, [])
    # right: the grandparent; reversed: 1 named the parent of its own parent; siblings: 1 and 2;
    # same tree: 1 and its nephew 4, 3 and its cousin 4; other: a feature in no tree, a latent without one
    assert (verdict.right, verdict.reversed, verdict.siblings, verdict.same_tree, verdict.other) == (1, 1, 1, 2, 2)
    assert verdict.right + verdict.reversed + verdict.siblings + verdict.same_tree + verdict.other == verdict.rows


def test_evidence_parts_split_the_projection_by_what_the_truth_puts_there():
    # a forest root 0 -> parent 1 -> children 2, 3; 2 -> grandchild 5; feature 4 in no tree;
    # orthonormal atoms, so feature f adds acts[f] * direction[f] to the projection
    parent_of = {1: 0, 2: 1, 3: 1, 5: 2}
    atoms = torch.eye(6, dtype=torch.float64)
    direction = torch.tensor([0.4, 0.5, 0.1, 0.6, 0.3, 0.2], dtype=torch.float64)
    acts = torch.tensor([
        [1, 2, 0, 3, 1, 0],  # the parent latent fires: root, parent, the other child 3, feature 4
        [1, 2, 4, 0, 0, 1],  # the child latent alone: root, parent, child 2, its child 5
        [1, 1, 1, 0, 0, 0],  # both fire: a parent-latent token, not evidence
        [0, 0, 0, 0, 2, 0],  # neither
    ], dtype=torch.float64)
    offset = torch.full((6,), 0.1, dtype=torch.float64)  # the world's bias less b_dec, on every token
    parent_fires = torch.tensor([True, False, True, False])
    child_fires = torch.tensor([False, True, True, False])
    parts = evidence_parts(acts, acts @ atoms + offset, atoms, direction, parent_fires, child_fires,
                           parent=1, child=2, parent_of=parent_of)
    on_parent = {"parent": (1.0 + 0.5) / 2, "ancestors": 0.4, "other descendants": 1.8 / 2, "child": 0.1 / 2,
                 "other features": 0.3 / 2, "offset": 0.21}
    on_child = {"parent": 1.0, "ancestors": 0.4, "other descendants": 0.0, "child": 0.4 + 0.2,
                "other features": 0.0, "offset": 0.21}
    assert tuple(parts.on_parent) == tuple(parts.on_child) == EVIDENCE_PARTS
    for name in EVIDENCE_PARTS:
        assert parts.on_parent[name] == pytest.approx(on_parent[name], abs=1e-12), name
        assert parts.on_child[name] == pytest.approx(on_child[name], abs=1e-12), name
    assert parts.evidence == pytest.approx(2.21 / 2.46, abs=1e-12)
    # two siblings: the other child's latent plays the parent, the shared parent is its ancestor
    sibling = evidence_parts(acts, acts @ atoms + offset, atoms, direction, torch.tensor([True, False, False, False]),
                             child_fires, parent=3, child=2, parent_of=parent_of)
    assert sibling.on_child["ancestors"] == pytest.approx((2 * 0.5 + 0.4 + 1 * 0.5 + 0.4) / 2, abs=1e-12)
    assert sibling.on_parent["parent"] == pytest.approx(1.8, abs=1e-12)
    # no token with the child latent alone: no evidence
    none = evidence_parts(acts, acts @ atoms + offset, atoms, direction, parent_fires, parent_fires,
                          parent=1, child=2, parent_of=parent_of)
    assert all(math.isnan(v) for v in none.on_child.values()) and math.isnan(none.evidence)
