"""The ceiling of the absorption map's own numbers (docs/VALIDATION.md, section Q9).

The map writes its rows from its measured candidate pairs (each alive latent's nearest atoms) with
label-free tests (`PairMap.candidate_numbers`), then names the candidate with the largest rho. How
far could any rule over those same numbers go? Here one is fitted *with the labels* on the
selection world (gradient-boosted trees: scikit-learn's `HistGradientBoostingClassifier`, which
comes with the test extras) and held against the truth on the other worlds and on the control
world: an estimate of what other thresholds, or other combinations of the map's numbers, can buy
(one family of rules, fitted once). It is not a map anyone gets: it needs the truth to be fitted.

`study_quality.py` builds one `PairTable` per audited SAE and prints `ceiling_lines` as Q9.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from opt_hooks.theory.absorption import choose_parents

# the map's numbers per candidate pair that the fitted rule reads (`pair_table`)
FEATURES = ("rho", "rho below the child's best", "evidence", "evidence z", "reverse evidence", "orientation z",
            "child's off share", "parent's off share", "log count ratio", "parent's own-size CV",
            "log held-out tokens", "log pairs naming the parent")
THRESHOLDS = (0.3, 0.5, 0.7)
LABELS = {"found": "a judgeable absorbed direct edge", "right": "a right row (parent an ancestor)"}


@dataclass
class PairTable:
    """One SAE's measured candidate pairs: the map's numbers (`features`, one column per FEATURES
    entry; NaN where undefined), its own tests (`passes`), and the truth (`right`, `found`:
    `opt_hooks.synthetic.candidates_judged`); `absorbed` judgeable absorbed edges in all, of
    which the measured pairs hold `found.sum()`."""

    features: np.ndarray  # (P, len(FEATURES)) float64
    child: np.ndarray  # (P,) int64
    rho: np.ndarray  # (P,)
    passes: np.ndarray  # (P,) bool
    right: np.ndarray  # (P,) bool
    found: np.ndarray  # (P,) bool
    absorbed: int
    latents: int


def pair_table(numbers: dict[str, torch.Tensor], right: list[bool], found: list[bool], absorbed: int,
               latents: int) -> PairTable:
    """`numbers`: `PairMap.candidate_numbers` of one audit."""
    n = {k: v.detach().cpu().double() for k, v in numbers.items()}
    parent, child = n["parent"].long(), n["child"].long()
    rho = n["rho"]
    best = torch.full((latents,), -math.inf, dtype=torch.float64).scatter_reduce(0, child, rho, "amax")
    naming = torch.bincount(parent, minlength=latents).double()
    columns = [rho, best[child] - rho, n["evidence"], n["evidence_z"], n["reverse_evidence"], n["orientation_z"],
               (n["count_child"] - n["co"]) / n["count_child"], (n["count_parent"] - n["co"]) / n["count_parent"],
               torch.log(n["count_parent"] / n["count_child"]), n["parent_cv"], torch.log1p(n["n_evidence"]),
               torch.log1p(naming[parent])]
    features = torch.stack(columns, 1) if len(rho) else torch.zeros(0, len(FEATURES), dtype=torch.float64)
    features = torch.where(torch.isfinite(features), features, math.nan)  # the trees read NaN as missing
    return PairTable(features.numpy(), child.numpy(), rho.numpy(), numbers["passes"].cpu().numpy(),
                     np.asarray(right, dtype=bool), np.asarray(found, dtype=bool), absorbed, latents)


def chosen(child: np.ndarray, key: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """One pair per child among those `ok`: the largest `key` (ties to the lower index), by the
    map's own parent choice (`choose_parents`, which reads `key` where it reads rho)."""
    return choose_parents(torch.from_numpy(child), torch.from_numpy(np.asarray(key, dtype=np.float64)),
                          torch.from_numpy(np.asarray(ok, dtype=bool))).numpy()


def pooled(tables: list[PairTable], rows: list[np.ndarray]) -> tuple[int, int, int, int, int]:
    """(rows, right, found, absorbed edges, latents) over a world's SAEs."""
    return (sum(len(r) for r in rows), sum(int(t.right[r].sum()) for t, r in zip(tables, rows)),
            sum(int(t.found[r].sum()) for t, r in zip(tables, rows)), sum(t.absorbed for t in tables),
            sum(t.latents for t in tables))


def cell(tables: list[PairTable], rows: list[np.ndarray]) -> str:
    n, right, found, absorbed, _ = pooled(tables, rows)
    precision = f"{right / n:.2f}" if n else "n/a"
    recall = f"{found / absorbed:.3f}" if absorbed else "n/a"
    return f"{precision} / {recall} ({n})"


def control_cell(tables: list[PairTable], rows: list[np.ndarray]) -> str:
    if not tables:
        return "n/a"
    n, _, _, _, latents = pooled(tables, rows)
    return f"{1000 * n / latents:.1f}"


def ceiling_lines(worlds: dict[str, list[PairTable]], control: list[PairTable]) -> list[str]:
    """Q9: the map's own operating point, the candidates' ceiling, and rules fitted with the labels
    on the first world, per world (pooled over its SAEs) and on the control."""
    names = list(worlds)
    fit = names[0]
    head = ["", "**Q9. The ceiling of the map's own numbers.** The map writes at most one row per child "
            "latent, from its measured candidate pairs. Per world, pooled over its SAEs: precision / recall "
            "(rows), as in Q3; on the control, rows per 1,000 latents (target: at most 1). *Any candidate*: the "
            "share of the judgeable absorbed direct edges that are among the measured pairs at all, the recall "
            "no choice among them can pass. *Fitted with labels*: gradient-boosted trees (scikit-learn's "
            f"`HistGradientBoostingClassifier`) on {fit}'s candidate pairs, reading the map's own numbers "
            f"({', '.join(FEATURES)}) and told which pairs are the label; each child then gets its "
            "highest-scoring pair if that score reaches the threshold. An estimate of what other thresholds "
            "or combinations of these numbers can buy (one family of rules, fitted once), not a map: it needs "
            "the truth.", "",
            "| rule | threshold | " + " | ".join(f"{w} (fitted)" if w == fit else w for w in names)
            + " | control: rows per 1,000 latents |",
            "|---|---|" + "---|" * len(names) + "---|"]

    def line(rule: str, threshold: str, pick) -> str:
        cells = [cell(worlds[w], [pick(t) for t in worlds[w]]) for w in names]
        return (f"| {rule} | {threshold} | " + " | ".join(cells) + " | "
                + control_cell(control, [pick(t) for t in control]) + " |")

    lines = head + [line("the map (its tests; the largest rho)", "", lambda t: chosen(t.child, t.rho, t.passes))]
    lines.append("| any candidate | | " + " | ".join(
        (f"{sum(int(t.found.sum()) for t in worlds[w]) / a:.3f}" if (a := sum(t.absorbed for t in worlds[w]))
         else "n/a") for w in names) + " | |")
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
    except ImportError:
        return lines + ["", "(The fitted rules need scikit-learn: `pip install scikit-learn`.)"]
    x_fit = np.concatenate([t.features for t in worlds[fit]])
    for label, said in LABELS.items():
        y_fit = np.concatenate([getattr(t, label) for t in worlds[fit]])
        if y_fit.all() or not y_fit.any():
            lines.append(f"| fitted with labels: {said} | | no pair of {fit} is one (or every pair is) |")
            continue
        model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, early_stopping=False,
                                               random_state=0).fit(x_fit, y_fit)

        def score(t: PairTable) -> np.ndarray:
            return model.predict_proba(t.features)[:, 1] if len(t.features) else np.zeros(0)

        scored = {id(t): score(t) for t in [*(t for w in names for t in worlds[w]), *control]}
        for threshold in THRESHOLDS:
            lines.append(line(f"fitted with labels: {said}", f"{threshold:g}",
                              lambda t: chosen(t.child, scored[id(t)], scored[id(t)] >= threshold)))
    return lines
