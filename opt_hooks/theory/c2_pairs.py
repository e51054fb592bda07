"""C2, the pair / hierarchy condition (THEORY.md section 2): first order, lam-free, residual-free.

For every ordered pair (i, j), (1 - rho_ij) mu_j must lie in [min, max] of z_j over the tokens
where i is off. The exact pair engine that finds the violations is `pairs.py`; the certificate
family of the violated pairs is here.

A signed SAE's doubled dictionary (THEORY.md section 9) pairs each atom with its opposite, one decoder
row: the pairs (i, -d_i) are skipped (rho = -1), and so are the pairs whose j has its other sign active
on an audit token, since the certificate turns d_j and, tied, -d_j with it, which moves the
reconstruction of those tokens too: the condition is that of the tied problem only where j's other
sign never fires (`tied_pairs`). The certificates' held-out changes count the tokens of j's other
sign (`PairCertificates.partner`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from opt_hooks.theory.changes import Perturbed, TokenChanges
from opt_hooks.theory.codes import SparseBatch
from opt_hooks.theory.pairs import PairViolations, pair_violations
from opt_hooks.theory.signed import partners
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


def c2_pairs(stats: LayerStatistics, atoms: Tensor, *, rel_tol: float = 1e-6) -> PairViolations:
    """C2: for every ordered pair, (1 - rho_ij) mu_j must lie in [min, max] of z_j over A_i."""
    if stats.codes is None:
        raise ValueError("C2 needs the sparse codes: build LayerStats with keep_codes=True")
    return pair_violations(stats.codes, atoms, stats.mu, rel_tol=rel_tol)


def tied_pairs(violations: PairViolations, active_count: Tensor) -> tuple[PairViolations, int]:
    """(the violations of the tied problem, how many others were dropped) for a signed SAE's doubled
    dictionary: no pair of an atom with its own opposite, and no pair whose j's other sign fires on
    an audit token (`active_count` (2K,) of the audit tokens)."""
    partner = partners(len(active_count), violations.j.device)
    keep = (violations.i != partner[violations.j]) & (active_count.to(partner.device)[partner[violations.j]] == 0)
    fields = {name: getattr(violations, name)[keep] for name in violations.__dataclass_fields__}
    return PairViolations(**fields), int((~keep & (violations.i != partner[violations.j])).sum())


# C2's line search: the finite-step change is evaluated exactly at each of these steps
PAIR_STEPS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3)


@dataclass
class PairCertificates:
    """C2, one certificate per flagged ordered pair (i, j), at step eps (per pair).

    kind +1 (hierarchy, T = M) absorbs the parent i into the child j; kind -1
    (complementary, T = m) is the mirror image. With s = kind, nu = sqrt(1 + eps^2 (1 - rho^2))
    and c = (1 + s eps rho) / nu:
        d_j <- normalise(d_j + s eps (d_i - rho d_j)),  z_j <- z_j (1 + s eps rho),
        z_i <- max(z_i + s eps (T_eps - c z_j), 0),      b <- b - s eps T_eps d_i,
    with T_eps = T max(1, c) for a hierarchy and T min(1, c) for a complementary pair. To first
    order this is THEORY.md's z_i <- z_i - s eps (z_j - T); the factor c keeps the
    reconstruction along d_i exactly unchanged wherever z_i is not clipped, and T_eps makes
    sure no clip happens on an audit token where i is off (there z_j <= M, resp. >= m). So a
    token's exact change needs <d_i, r_n> only where i is active and <d_j, r_n> only where j
    is: the audit tokens' change comes from the sparse codes and their stored projections.
    The rule is fixed (new atom d_j, bias, and a code rule in z_i, z_j) and is applied as it
    is to the held-out tokens, where it may clip.

    For a hierarchy, a token where j is off changes by exactly lam eps T_eps (z_i grows by
    eps T_eps, the bias shift cancels it), so only the tokens where j fires are gathered.
    Complementary pairs (rare: j is on wherever i is off) also gather the tokens where i fires.

    `partner` (P,): for a signed SAE's doubled dictionary, the atom -d_j of j's other sign, which the
    certificate turns with d_j (one decoder row): -d_j <- -normalise(...), its codes unchanged. On a
    token where it fires (z_j = 0 there) the reconstruction along the pair moves by
    z_p (d_j - d_j'), so with the signed code zeta = z_j - z_p the change is the formula above with
    zeta in the reconstruction terms. The audit tokens have no such token (`tied_pairs`); held-out
    tokens may.
    """

    i: Tensor  # (P,)
    j: Tensor  # (P,)
    kind: Tensor  # (P,) +1 / -1
    bound: Tensor  # (P,) T
    rho: Tensor  # (P,)
    partner: Tensor | None = None  # (P,) the atom -d_j of a signed SAE's pair, None for an unsigned SAE
    condition = "C2"
    chunk_elements: int = 1 << 22  # bound on gathered (pair, token) elements at once

    def __post_init__(self) -> None:
        self.step = torch.full((len(self.i),), PAIR_STEPS[-1], dtype=torch.float64, device=self.i.device)

    def __len__(self) -> int:
        return len(self.i)

    def shifted_bound(self, step: Tensor, pairs: Tensor | slice = slice(None)) -> Tensor:
        """T_eps of the pairs (float64); `step` holds each of those pairs' eps."""
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        c = (1 + s * step * rho) / torch.sqrt(1 + step**2 * (1 - rho**2))
        return torch.where(s > 0, t * torch.clamp(c, min=1), t * torch.clamp(c, max=1))

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        if len(self) == 0:
            return self.step.clone()
        grid = torch.tensor(PAIR_STEPS, dtype=torch.float64, device=self.i.device)
        changes, _ = self.audit_change(stats, lam, grid[:, None].expand(-1, len(self)))  # one pass, every step
        best = changes.argmin(0)
        # no step descends: keep the smallest (the change is then reported as a rise)
        best = torch.where(changes.min(0).values < 0, best, len(grid) - 1)
        return grid[best]

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        """`step` (P,), or (E, P) for E steps of every pair evaluated in one pass over the codes."""
        codes = stats.codes
        if codes is None or codes.aux is None:
            raise ValueError("C2 certificates need the sparse codes with their projections")
        device = self.i.device
        totals = _Totals(step.shape, device)
        codes = codes.to(device)
        order, start, count = codes.by_feature()
        row_of, keys = codes.row_ids(), codes.keys()
        all_pairs = torch.arange(len(self.i), device=device)
        hierarchy = self.kind > 0
        j_off = stats.n_tokens - count[self.j].double()
        per_off, first_off = self._j_off_change(step, lam)
        totals.add_constant(torch.where(hierarchy, per_off, 0.0), torch.where(hierarchy, first_off, 0.0), j_off)

        def lookup(rows: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            entry = codes.entry_of(rows, features, keys)
            on = entry >= 0
            safe = entry.clamp(min=0)
            return on, torch.where(on, codes.val[safe].double(), 0.0), torch.where(on, codes.aux[safe].double(), 0.0)

        # tokens where j fires, every pair: i looked up
        for pairs, entries in _entries_of(self.j, all_pairs, order, start, count, self.chunk_elements):
            rows = row_of[entries]
            _, zi, qi = lookup(rows, self.i[pairs])
            zj, qj = codes.val[entries].double(), codes.aux[entries].double()
            totals.add(pairs, *self._element_changes(zi, zj, qi, qj, codes.row_weight(rows), pairs, lam, step))
        # complementary pairs: tokens where i fires and j is off
        complementary = torch.nonzero(~hierarchy).flatten()
        for pairs, entries in _entries_of(self.i, complementary, order, start, count, self.chunk_elements):
            j_on, _, _ = lookup(row_of[entries], self.j[pairs])
            pairs, entries = pairs[~j_on], entries[~j_on]
            zi, qi = codes.val[entries].double(), codes.aux[entries].double()
            zero = torch.zeros_like(zi)
            w = codes.row_weight(row_of[entries])
            totals.add(pairs, *self._element_changes(zi, zero, qi, zero, w, pairs, lam, step))
        return totals.change, totals.first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        # Only the pairs' features are read: their codes and <d_i, r_n> columns, renumbered.
        read = [self.i, self.j] if self.partner is None else [self.i, self.j, self.partner]
        used, inverse = torch.unique(torch.cat(read), return_inverse=True)
        n = len(self.i)
        local = PairCertificates(inverse[:n], inverse[n:2 * n], self.kind, self.bound, self.rho,
                                 None if self.partner is None else inverse[2 * n:])
        local.chunk_elements, local.step = self.chunk_elements, self.step
        return local.dense_changes(tokens.z[:, used], tokens.q(used), lam, tokens.weight)

    def dense_changes(self, z: Tensor, q: Tensor, lam: float, weight: Tensor | None = None) -> TokenChanges:
        """The per-token changes on tokens given as dense codes z, projections q = w_n r D^T and
        weights w_n (None: 1)."""
        totals = _Totals(self.step.shape, z.device, held_out=True)
        hierarchy = self.kind > 0
        codes = SparseBatch(z)  # nonnegative codes: the nonzeros are the active entries
        order, start, count = codes.by_feature
        per_off, first_off = self._j_off_change(self.step, lam)
        j_off = z.shape[0] - count[self.j].double()
        if self.partner is not None:  # tokens of j's other sign: gathered below
            j_off = j_off - count[self.partner].double()
        totals.add_constant(torch.where(hierarchy, per_off, 0.0), torch.where(hierarchy, first_off, 0.0), j_off)
        pairs_h = torch.nonzero(hierarchy).flatten()
        for moved in (self.j, self.partner):
            if moved is None:
                continue
            for pairs, entries in _entries_of(moved, pairs_h, order, start, count, self.chunk_elements):
                totals.add(pairs, *self._dense_element_changes(z, q, weight, codes.rows[entries], pairs, lam))
        complementary = torch.nonzero(~hierarchy).flatten()
        for sl in _chunks(len(complementary), max(1, self.chunk_elements // max(z.shape[0], 1))):
            pairs = complementary[sl][None, :].expand(z.shape[0], -1).flatten()
            rows = torch.arange(z.shape[0], device=z.device)[:, None].expand(-1, len(complementary[sl])).flatten()
            totals.add(pairs, *self._dense_element_changes(z, q, weight, rows, pairs, lam))
        return TokenChanges(totals.change, totals.change_sq, totals.touched)

    def _j_off_change(self, step: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """Hierarchy pairs: the exact and first-order change of a token where j is off."""
        return lam * step * self.shifted_bound(step), lam * step * self.bound.double()

    def _dense_element_changes(self, z: Tensor, q: Tensor, weight: Tensor | None, rows: Tensor, pairs: Tensor,
                               lam: float) -> tuple[Tensor, Tensor]:
        i, j = self.i[pairs], self.j[pairs]
        zi, zj, qi, qj = (m[rows, f].double() for m, f in ((z, i), (z, j), (q, i), (q, j)))
        w = 1.0 if weight is None else weight[rows].double()
        zp = 0.0 if self.partner is None else z[rows, self.partner[pairs]].double()
        return self._element_changes(zi, zj, qi, qj, w, pairs, lam, self.step, zp)

    def _element_changes(self, zi: Tensor, zj: Tensor, qi: Tensor, qj: Tensor, w: Tensor | float, pairs: Tensor,
                         lam: float, step: Tensor, zp: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """Exact and first-order change of loss_n for each (token, pair) element (and each step
        when `step` is (E, P)); qi, qj are w_n <d, r_n> and w the elements' token weights; zp the
        code of j's other sign (`partner`, 0 for an unsigned SAE), whose atom -d_j turns with d_j."""
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        eps = step[..., pairs]
        nu = torch.sqrt(1 + eps**2 * (1 - rho**2))
        grow = 1 + s * eps * rho
        t_eps = self.shifted_bound(eps, pairs)
        dzi = (zi + s * eps * (t_eps - grow / nu * zj)).clamp(min=0) - zi
        zj_new = zj * grow
        # the signed code on the pair (d_j, -d_j) before and after: zj - zp (one of them is 0)
        zeta, zeta_new = zj - zp, zj_new - zp
        alpha = -s * eps * t_eps + dzi + zeta_new * s * eps / nu  # new recon - old, along d_i
        beta = zeta_new * (1 - s * eps * rho) / nu - zeta  # and along d_j
        change = -2 * (alpha * qi + beta * qj) + w * (alpha**2 + beta**2 + 2 * alpha * beta * rho)
        return change + lam * (dzi + zj_new - zj), lam * s * eps * (t - (1 - rho) * zj)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        i, j, s = int(self.i[k]), int(self.j[k]), float(self.kind[k])
        rho, eps = float(self.rho[k]), float(self.step[k])
        t_eps = float(self.shifted_bound(self.step[k:k + 1], slice(k, k + 1)))
        nu = math.sqrt(1 + eps**2 * (1 - rho**2))
        atoms2, z2 = atoms.clone(), z.clone()
        direction = (1 - s * eps * rho) * atoms[j] + s * eps * atoms[i]
        atoms2[j] = direction / direction.norm()
        if self.partner is not None:
            atoms2[int(self.partner[k])] = -atoms2[j]
        z2[:, i] = (z[:, i] + s * eps * (t_eps - (1 + s * eps * rho) / nu * z[:, j])).clamp(min=0)
        z2[:, j] = z[:, j] * (1 + s * eps * rho)
        return atoms2, z2, bias - s * eps * t_eps * atoms[i]


class _Totals:
    """Per-pair sums of element changes, of shape (P,) or (E, P) (pairs on the last axis): on the
    audit tokens with their first-order parts, on held-out tokens with their squares and counts."""

    def __init__(self, shape: torch.Size, device: torch.device, held_out: bool = False) -> None:
        zeros = lambda dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.change, self.held_out = zeros(), held_out
        if held_out:
            self.change_sq, self.touched = zeros(), zeros(torch.int64)
        else:
            self.first = zeros()

    def add_constant(self, change: Tensor, first: Tensor, count: Tensor) -> None:
        """`count` tokens of each pair that all change by `change`."""
        self.change += change * count
        if self.held_out:
            self.change_sq += change**2 * count
            self.touched += torch.where(change != 0, count, 0.0).long()
        else:
            self.first += first * count

    def add(self, pairs: Tensor, change: Tensor, first: Tensor) -> None:
        axis = self.change.dim() - 1
        self.change.index_add_(axis, pairs, change)
        if self.held_out:
            self.change_sq.index_add_(axis, pairs, change**2)
            self.touched.index_add_(axis, pairs, (change != 0).long())
        else:
            self.first.index_add_(axis, pairs, first)


def _entries_of(
    features: Tensor, pairs: Tensor, order: Tensor, start: Tensor, count: Tensor, budget: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each pair p, the entries of feature features[p] (order[start : start + count]), in
    chunks of about `budget` (pair, entry) elements: yields (pair of each element, entry)."""
    if len(pairs) == 0:
        return
    lengths = count[features[pairs]]
    for sl in _chunks_by_total(lengths, budget):
        chunk_pairs, chunk_lengths = pairs[sl], lengths[sl]
        owner = torch.repeat_interleave(torch.arange(len(chunk_pairs), device=pairs.device), chunk_lengths)
        offset = torch.arange(int(chunk_lengths.sum()), device=pairs.device) - (torch.cumsum(chunk_lengths, 0) - chunk_lengths)[owner]
        yield chunk_pairs[owner], order[start[features[chunk_pairs]][owner] + offset]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _chunks_by_total(lengths: Tensor, budget: int) -> list[slice]:
    """Consecutive slices of `lengths` whose sums stay near `budget` (one item may exceed it)."""
    ends = torch.cumsum(lengths, 0)
    total = int(ends[-1]) if len(ends) else 0
    marks = torch.arange(budget, max(total, budget), budget, device=lengths.device)
    cuts = torch.unique(torch.searchsorted(ends, marks, right=True)).tolist()
    bounds = [0, *[c for c in cuts if 0 < c < len(ends)], len(ends)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
