"""The label-free pair map of one layer (THEORY.md section 6), alongside the audit's two passes.

    pair_map = PairMap(codes, counts, n, atoms, opts)   # after pass 1: candidates, exact counts,
                                                        #   duplicates and antipodal pairs
    pair_map.held_out(x, tokens, bias, state)           # pass 2: held-out evidence sums
    rows = pair_map.absorption_rows(state, ...)         # the absorption rows, oriented, one parent
                                                        #   per child, ordered by L1 price

The held-out sums live in pass 2's mergeable state (`add_states`), so batch splits, resumed runs
and distributed ranks give the same map. Maths in theory/absorption.py; nothing here knows about
TransformerLens or SAE-Lens.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from opt_hooks.policy import VerdictPolicy
from opt_hooks.records import AbsorptionRow, AntipodalRow, DuplicateRow, json_safe
from opt_hooks.theory import absorption as ab
from opt_hooks.theory.codes import CSR
from opt_hooks.theory.pairs import co_counts, pair_rho
from opt_hooks.theory.signed import partners
from opt_hooks.theory.stats import TokenBatch

SUMS = ("pair_count", "pair_sum", "pair_sum_sq", "own_count", "own_sum", "own_sum_sq")


class PairMap:
    """Candidates from each alive atom's nearest atoms; counts exact on the audit tokens."""

    def __init__(self, codes: CSR, active_count: Tensor, n_tokens: int, atoms: Tensor,
                 options: ab.MapOptions | None, chunk_elements: int = ab.DEFAULT_CHUNK_ELEMENTS,
                 signed: bool = False) -> None:
        """`codes`: pass 1's kept codes of the audit tokens; `active_count` (K,) and `n_tokens`
        their counts. `options` None (switched off): an empty map that says why. `signed`: the atoms
        are a signed SAE's doubled dictionary (THEORY.md section 9), whose pairs (d_i, -d_i), one
        decoder row, are no antipodal pair."""
        self.options, self.atoms, self.chunk = options, atoms, chunk_elements
        self.n_tokens = n_tokens
        count = active_count.to(atoms.device)
        self.count = count
        empty = torch.zeros(0, dtype=torch.int64, device=atoms.device)
        self.parent, self.child, self.rho, self.co = empty, empty, empty.double(), empty
        self.duplicates: list[DuplicateRow] = []
        self.antipodal: list[AntipodalRow] = []
        self.unavailable = "switched off (AuditOptions(pair_map=None))" if options is None else None
        if options is None:
            return
        alive = count > 0
        # the spread of unrelated pairs: the SAE's own (robust), at most that of random directions
        # in d dimensions, 1/sqrt(d): a clumpy dictionary's duplicate clusters must not hide its absorption
        self.spread = min(ab.rho_spread(atoms, alive), 1 / math.sqrt(atoms.shape[1]))
        self.rho_min = max(options.min_rho, options.spread_z * self.spread)
        codes = codes.to(atoms.device)
        # the neighbours read: absorption (rho_min <= rho < duplicate_rho), duplicates, antipodal pairs
        near = ab.nearest_atoms(atoms, alive, options.neighbours, above=min(self.rho_min, options.duplicate_rho),
                                below=-options.antipodal_rho, chunk_elements=chunk_elements)
        n_features = atoms.shape[0]
        absorbing = (near.rho >= self.rho_min) & (near.rho < options.duplicate_rho)
        parent, child = _both_orientations(near.i[absorbing], near.j[absorbing], n_features)
        dup_i, dup_j = _unordered(near.i[near.rho >= options.duplicate_rho], near.j[near.rho >= options.duplicate_rho],
                                  n_features)
        anti_i, anti_j = _unordered(near.i[near.rho <= -options.antipodal_rho],
                                    near.j[near.rho <= -options.antipodal_rho], n_features)
        dense = options.antipodal_min_share * n_tokens
        anti = (count[anti_i] >= dense) & (count[anti_j] >= dense)
        if signed:
            anti &= anti_j != partners(n_features, anti_i.device)[anti_i]
        anti_i, anti_j = anti_i[anti], anti_j[anti]
        # one exact co-activation scan (one index of the codes) for the three kinds of pairs
        co = co_counts(codes, torch.cat([parent, dup_i, anti_i]), torch.cat([child, dup_j, anti_j]),
                       chunk_elements=chunk_elements)
        co, dup_co, anti_co = co.split([len(parent), len(dup_i), len(anti_i)])
        keep = co < count[child]  # the parent is off on at least one of the child's audit tokens
        order = torch.argsort(child[keep], stable=True)  # sorted by child, as held_out_evidence expects
        self.parent, self.child, self.co = parent[keep][order], child[keep][order], co[keep][order]
        self.rho = pair_rho(atoms, self.parent, self.child, chunk_elements)
        leaning = torch.zeros(n_features, dtype=torch.bool, device=count.device)
        leaning[child] = True  # before dropping the pairs whose parent fires on all of the child's tokens
        self.score = ab.absorption_score(self.parent, self.child, self.rho, self.co, count, leaning)
        self.duplicates = self._duplicates(dup_i, dup_j, dup_co)
        self.antipodal = self._antipodal(anti_i, anti_j, anti_co)

    def __len__(self) -> int:
        return len(self.parent)

    # -- pass 2 ---------------------------------------------------------------------------
    def add_states(self, state: Any) -> None:
        """Register the held-out sums on pass 2's mergeable state."""
        n_pairs, n_features, device = len(self), self.atoms.shape[0], self.atoms.device
        for name in SUMS:
            size = n_pairs if name.startswith("pair") else n_features
            dtype = torch.int64 if name.endswith("count") else torch.float64
            state.add_state(f"map_{name}", torch.zeros(size, dtype=dtype, device=device), "sum")

    def held_out(self, x: Tensor, tokens: TokenBatch, bias: Tensor, state: Any) -> None:
        if not len(self):
            return
        entries = tokens.entries
        centred = x.to(self.atoms.device) - bias
        sums = ab.held_out_evidence(centred, entries.rows, entries.cols, tokens.z, self.atoms, self.parent,
                                    self.child, chunk_elements=self.chunk)
        for name in SUMS:
            getattr(state, f"map_{name}").add_(getattr(sums, name))

    # -- rows -----------------------------------------------------------------------------
    def candidate_numbers(self, state: Any, policy: VerdictPolicy) -> dict[str, Tensor]:
        """Per measured ordered pair (parent candidate, child candidate), the numbers the map's rules
        read from pass 2's sums, and `passes`: every test of THEORY.md section 6 but the parent choice.
        The rows are chosen from these; a study can also hold them against a truth."""
        options = self.options or ab.MapOptions()  # switched off: no pair, so no threshold is ever read
        sums = {name: getattr(state, f"map_{name}") for name in SUMS}
        p, c = self.parent, self.child
        ratio = ab.evidence_ratio(sums["pair_count"], sums["pair_sum"], sums["pair_sum_sq"], sums["own_count"][p],
                                  sums["own_sum"][p], sums["own_sum_sq"][p], options.min_evidence)
        z_crit = policy.critical_z(len(self))
        n_evidence = sums["pair_count"]
        reverse = ab.reverse_of(p, c, self.atoms.shape[0])
        orientation = ab.orientation_z(ratio, reverse)
        passes = ((n_evidence >= policy.min_touched) & (ratio.z >= z_crit) & torch.isfinite(ratio.value)
                  & (orientation >= z_crit))
        parent_cv = ab.own_size_cv(sums["own_count"], sums["own_sum"], sums["own_sum_sq"])[p]
        passes &= parent_cv <= options.max_parent_cv  # NaN (no own size) fails
        passes &= ab.parent_covers_child(p, c, self.co, self.count, passes)
        reverse_evidence = torch.where(reverse >= 0, ratio.value[reverse.clamp(min=0)], math.nan)
        return {"parent": p, "child": c, "rho": self.rho, "co": self.co, "count_parent": self.count[p],
                "count_child": self.count[c], "evidence": ratio.value, "evidence_se": ratio.se, "evidence_z": ratio.z,
                "reverse_evidence": reverse_evidence, "orientation_z": orientation, "parent_cv": parent_cv,
                "n_evidence": n_evidence, "passes": passes}

    def absorption_rows(self, state: Any, policy: VerdictPolicy, mu: Tensor, lam: float | None) -> list[AbsorptionRow]:
        if not len(self):
            return []
        numbers = self.candidate_numbers(state, policy)
        p, c = self.parent, self.child
        chosen = ab.choose_parents(c, self.rho, numbers["passes"])
        if not len(chosen):
            return []
        mu = mu.to(p.device)
        price = ab.l1_price(self.rho[chosen], mu[c[chosen]], 1.0 if lam is None else lam)
        columns = {  # Python lists: no per-row tensor access
            "parent": p[chosen], "child": c[chosen], "rho": self.rho[chosen], "co": self.co[chosen],
            "count_parent": self.count[p[chosen]], "count_child": self.count[c[chosen]], "price": price,
            "evidence": numbers["evidence"][chosen], "se": numbers["evidence_se"][chosen],
            "p": torch.special.ndtr(-numbers["evidence_z"][chosen]), "n": numbers["n_evidence"][chosen],
            "reverse": numbers["reverse_evidence"][chosen],
        }
        col = {name: t.tolist() for name, t in columns.items()}
        rows = []
        for k in range(len(chosen)):
            rho, count_child, co, rev = col["rho"][k], col["count_child"][k], col["co"][k], col["reverse"][k]
            rows.append(AbsorptionRow(
                parent=col["parent"][k], child=col["child"][k], rho=rho, own_part=math.sqrt(max(1 - rho**2, 0.0)),
                count_parent=col["count_parent"][k], count_child=count_child, co_count=co,
                fraction=(count_child - co) / count_child, l1_price=None if lam is None else col["price"][k],
                evidence=col["evidence"][k], evidence_se=col["se"][k], evidence_p=col["p"][k],
                n_evidence=col["n"][k], reverse_evidence=rev if math.isfinite(rev) else None,
            ))
        # trees by their total price, then each tree's children by price (lam-free order without lam)
        total: dict[int, float] = {}
        for r, v in zip(rows, col["price"]):
            total[r.parent] = total.get(r.parent, 0.0) + v
        order = sorted(range(len(rows)), key=lambda k: (-total[rows[k].parent], rows[k].parent, -col["price"][k],
                                                        rows[k].child))
        return [rows[k] for k in order]

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def settings(self) -> dict[str, Any]:
        o = self.options
        if not self.available:
            return {"available": False}
        return {"available": True, "rho_spread": self.spread, "rho_min": self.rho_min,
                "min_evidence": o.min_evidence, "max_parent_cv": o.max_parent_cv, "duplicate_rho": o.duplicate_rho,
                "antipodal_rho": o.antipodal_rho,
                "neighbours": o.neighbours, "measured_pairs": len(self),
                # None, not NaN, where no latent is alive (the score) or one is (its SE)
                "absorption_score": json_safe(self.score.value), "absorption_score_se": json_safe(self.score.se),
                "scored_latents": self.score.n_latents, "absorbing_latents": self.score.n_absorbing}

    # -- duplicates and antipodal pairs (atoms and audit counts only) ---------------------
    def _duplicates(self, i: Tensor, j: Tensor, co: Tensor) -> list[DuplicateRow]:
        rho = pair_rho(self.atoms, i, j, self.chunk).tolist()
        rows = []
        for a, b, r, both, ca, cb in zip(i.tolist(), j.tolist(), rho, co.tolist(), self.count[i].tolist(),
                                         self.count[j].tolist()):
            rows.append(DuplicateRow(a, b, r, ca, cb, both, both / (ca + cb - both)))
        rows.sort(key=lambda r: (-r.rho, r.i, r.j))
        return rows

    def _antipodal(self, i: Tensor, j: Tensor, co: Tensor) -> list[AntipodalRow]:
        apart = co <= self.options.antipodal_max_overlap * torch.minimum(self.count[i], self.count[j])
        i, j, co = i[apart], j[apart], co[apart]
        rho = pair_rho(self.atoms, i, j, self.chunk).tolist()
        direction = torch.nn.functional.normalize(self.atoms[i].double() - self.atoms[j].double(), dim=1)
        rows = []
        for a, b, r, both, ca, cb, u in zip(i.tolist(), j.tolist(), rho, co.tolist(), self.count[i].tolist(),
                                            self.count[j].tolist(), direction.tolist()):
            rows.append(AntipodalRow(a, b, r, ca, cb, both, (ca + cb - both) / self.n_tokens, u))
        rows.sort(key=lambda r: (-r.share, r.i, r.j))
        return rows


def _both_orientations(i: Tensor, j: Tensor, n_features: int) -> tuple[Tensor, Tensor]:
    key = torch.unique(torch.cat([i * n_features + j, j * n_features + i]))
    return key // n_features, key % n_features


def _unordered(i: Tensor, j: Tensor, n_features: int) -> tuple[Tensor, Tensor]:
    key = torch.unique(torch.minimum(i, j) * n_features + torch.maximum(i, j))
    return key // n_features, key % n_features
