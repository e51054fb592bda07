"""scripts/map_ceiling.py (docs/VALIDATION.md, Q9): the map's candidate pairs as a table, the
per-child choice, and the table of what rules over the map's numbers reach against a truth."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from map_ceiling import FEATURES, PairTable, ceiling_lines, chosen, pair_table  # noqa: E402


def test_the_choice_per_child_is_the_passing_pair_of_largest_key():
    gen = torch.Generator().manual_seed(0)
    child = torch.randint(0, 40, (500,), generator=gen).numpy()
    key = (torch.randint(0, 6, (500,), generator=gen).double() / 10).numpy()  # many ties: the lower index wins
    ok = (torch.rand(500, generator=gen) < 0.6).numpy()
    expected = []  # by brute force, child by child
    for c in sorted(set(child[ok].tolist())):
        mine = [k for k in range(500) if ok[k] and child[k] == c]
        expected.append(min(mine, key=lambda k: (-key[k], k)))
    assert sorted(chosen(child, key, ok).tolist()) == sorted(expected)
    assert len(chosen(child, key, np.zeros(500, dtype=bool))) == 0


def test_pair_table_reads_the_maps_numbers():
    numbers = {
        "parent": torch.tensor([0, 0, 2]), "child": torch.tensor([1, 2, 1]),
        "rho": torch.tensor([0.4, 0.3, 0.5], dtype=torch.float64), "co": torch.tensor([1, 0, 2]),
        "count_parent": torch.tensor([10, 10, 4]), "count_child": torch.tensor([5, 4, 5]),
        "evidence": torch.tensor([0.9, math.nan, 0.6], dtype=torch.float64),
        "evidence_se": torch.tensor([0.1, math.nan, 0.1], dtype=torch.float64),
        "evidence_z": torch.tensor([4.0, math.nan, 1.0], dtype=torch.float64),
        "reverse_evidence": torch.tensor([math.nan, 0.2, math.nan], dtype=torch.float64),
        "orientation_z": torch.tensor([-math.inf, 3.0, -math.inf], dtype=torch.float64),
        "parent_cv": torch.tensor([0.3, 0.3, 0.2], dtype=torch.float64),
        "n_evidence": torch.tensor([3, 4, 2]), "passes": torch.tensor([True, False, False]),
    }
    table = pair_table(numbers, [True, False, False], [True, False, False], absorbed=2, latents=3)
    f = {name: table.features[:, k] for k, name in enumerate(FEATURES)}
    np.testing.assert_allclose(f["rho below the child's best"], [0.1, 0.0, 0.0])  # child 1's best: 0.5
    np.testing.assert_allclose(f["child's off share"], [4 / 5, 1.0, 3 / 5])
    np.testing.assert_allclose(f["parent's off share"], [9 / 10, 1.0, 2 / 4])
    np.testing.assert_allclose(f["log count ratio"], np.log([2.0, 2.5, 0.8]))
    np.testing.assert_allclose(f["log pairs naming the parent"], np.log1p([2, 2, 1]))
    assert np.isnan(f["orientation z"][0]) and f["orientation z"][1] == 3.0  # -inf (no reverse): missing
    assert np.isnan(f["evidence"][1])
    assert table.passes.tolist() == [True, False, False] and table.absorbed == 2


def world_of(seed: int, n_sae: int = 3, latents: int = 50, signal: bool = True) -> list[PairTable]:
    """Candidate tables where one number (evidence) marks the truth exactly; every other number is
    the same for every pair, and rho is noise."""
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(n_sae):
        child = np.repeat(np.arange(latents), 3)
        found = np.zeros(len(child), dtype=bool)
        found[::3][: latents // 2] = signal  # half the children have their absorbed edge among the pairs
        features = np.zeros((len(child), len(FEATURES)))
        # from one finite set in every world: trees split at the fitted world's values, and a
        # value beyond them could fall on either side
        features[:, FEATURES.index("evidence")] = np.where(found, 1.5, 0.0) + rng.choice([0.0, 0.25, 0.5], len(child))
        rho = rng.uniform(0.3, 0.6, size=len(child))
        tables.append(PairTable(features, child, rho, np.zeros(len(child), dtype=bool), found.copy(), found,
                                absorbed=latents if signal else 0, latents=latents))
    return tables


def test_the_ceiling_finds_what_the_numbers_carry_and_stays_silent_without_it():
    lines = ceiling_lines({"world 1": world_of(0), "world 2": world_of(1)}, world_of(2, signal=False))
    rows = {(cells[0], cells[1]): cells[2:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))}
    # the map's own tests pass nothing here; half of each world's absorbed edges are among the pairs
    assert rows[("the map (its tests; the largest rho)", "")] == ["n/a / 0.000 (0)", "n/a / 0.000 (0)", "0.0"]
    assert rows[("any candidate", "")][:2] == ["0.500", "0.500"]
    # a rule fitted on world 1 with the labels finds every edge the pairs hold on world 2, with no
    # wrong row, and writes nothing on the control
    assert rows[("fitted with labels: a judgeable absorbed direct edge", "0.5")] == [
        "1.00 / 0.500 (75)", "1.00 / 0.500 (75)", "0.0"]
