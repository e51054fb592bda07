"""Certificates: fixed changes of the SAE that lower L, one family per condition (THEORY.md 3.1).

A certificate is a concrete change of the SAE's parameters chosen from the audit tokens alone
(new atoms, a new bias, or a per-feature code rule an encoder can implement) and applied,
unchanged, to the held-out tokens. A family holds F certificates of one condition and gives,
in float64:

- `line_search(stats, lam)`: the step of each certificate, by exact line search of its change
  on the audit tokens over a bounded range (closed forms where the change is a quadratic or a
  trigonometric polynomial of the step, a grid for C2). The family keeps it as `step`.
- `audit_change(stats, lam, step)`: the exact change of sum_n loss_n on the audit tokens at
  `step`, and its first-order part, from pass-1 statistics alone (sums, the sparse codes with
  each active <d_i, r_n>, the kept worst residuals).
- `held_out(tokens, lam)`: on a `TokenBatch` (held-out tokens), the per-token changes at
  `step`, summed: `TokenChanges(sum, sum of squares, tokens touched)`, mergeable sums from
  which the held-out change gets its standard error.
- `apply(k, atoms, z, bias, r, lam, weight)`: the same change on full tensors, so the tests can
  check every closed form against a float64 recompute of L.

With token weights w_n (THEORY.md section 1) every squared-error term carries w_n: the pass-1
sums are weighted where a squared error enters (stats.LayerStatistics), a TokenBatch's `wr`
and projections are w_n r_n and w_n <d_i, r_n>, and each per-token quadratic term is
multiplied by the token's w_n. The L1 terms are unweighted.

The closed forms are algebraically identical to recomputing L and far more accurate than
subtracting two large losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from opt_hooks.theory.codes import CSR, SparseBatch
from opt_hooks.theory.stats import LayerStatistics, TokenBatch

# C2's line search: the finite-step change is evaluated exactly at each of these steps
PAIR_STEPS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3)

Perturbed = tuple[Tensor, Tensor, Tensor]  # (atoms, z, bias) after the change


@dataclass
class TokenChanges:
    """Per-certificate sums over tokens of the per-token change of the loss: the sum, the sum of
    squares and the number of tokens whose loss the certificate changes (all mergeable)."""

    sum: Tensor  # (F,) float64
    sum_sq: Tensor  # (F,) float64
    touched: Tensor  # (F,) int64

    @classmethod
    def per_feature(cls, entries: SparseBatch, slots: Tensor, n_slots: int, values: Tensor) -> "TokenChanges":
        """From one value per code entry, certificate `slots[entry]` (-1: none): certificates whose
        change lives on their feature's active tokens only."""
        keep = slots >= 0
        slot, values = slots[keep], values[keep].double()
        zeros = torch.zeros(n_slots, dtype=torch.float64, device=values.device)
        count = torch.zeros(n_slots, dtype=torch.int64, device=values.device)
        return cls(
            zeros.index_add(0, slot, values), zeros.index_add(0, slot, values**2),
            count.index_add(0, slot, (values != 0).long()),
        )

    @classmethod
    def per_token(cls, changes: Tensor) -> "TokenChanges":
        """From dense per-token changes (n, F)."""
        changes = changes.double()
        return cls(changes.sum(0), (changes**2).sum(0), (changes != 0).sum(0))


def _per_entry(values: Tensor, slots: Tensor) -> Tensor:
    """values[slot] at every entry, 0 where the entry has no certificate (slot -1)."""
    return torch.cat([values.to(slots.device), values.new_zeros(1).to(slots.device)])[slots]


def _slots_of(features: Tensor, cols: Tensor, n_features: int) -> Tensor:
    """Each entry's certificate, by its feature (-1: that feature has none)."""
    slot_of = torch.full((n_features,), -1, dtype=torch.int64, device=cols.device)
    slot_of[features.to(cols.device)] = torch.arange(len(features), device=cols.device)
    return slot_of[cols]


@dataclass
class FloorCertificates:
    """C1: b <- b + s d_i, z_i <- max(z_i - s, 0), with s the floor m_i = min_n z_in > 0.

    A finite step, not a first-order one: on the audit tokens z_i >= m_i everywhere, so the bias
    shift is compensated on every token and each changes by exactly -lam s."""

    features: Tensor  # (F,)
    floor: Tensor  # (F,) m_i
    condition = "C1"

    def __post_init__(self) -> None:
        self.step = self.floor.double()

    def __len__(self) -> int:
        return len(self.features)

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        # the audit change -lam N s is linear in s, and s may not pass the floor
        return self.floor.double()

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        change = -lam * stats.n_tokens * step.double()
        return change, change.clone()

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        zi, qi = tokens.z[:, self.features].double(), tokens.q(self.features).double()
        s = self.step.to(zi.device)
        dz = -torch.minimum(zi, s)
        uncovered = (s - zi).clamp(min=0)  # where z_i < s the bias shift is not compensated
        return TokenChanges.per_token(-2 * uncovered * qi + _column(tokens.w()) * uncovered**2 + lam * dz)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        i, s = int(self.features[k]), float(self.step[k])
        z2 = z.clone()
        z2[:, i] = (z[:, i] - s).clamp(min=0)
        return atoms, z2, bias + s * atoms[i]


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
    """

    i: Tensor  # (P,)
    j: Tensor  # (P,)
    kind: Tensor  # (P,) +1 / -1
    bound: Tensor  # (P,) T
    rho: Tensor  # (P,)
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
        used, inverse = torch.unique(torch.cat([self.i, self.j]), return_inverse=True)
        local = PairCertificates(inverse[: len(self.i)], inverse[len(self.i):], self.kind, self.bound, self.rho)
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
        totals.add_constant(torch.where(hierarchy, per_off, 0.0), torch.where(hierarchy, first_off, 0.0),
                            z.shape[0] - count[self.j].double())
        pairs_h = torch.nonzero(hierarchy).flatten()
        for pairs, entries in _entries_of(self.j, pairs_h, order, start, count, self.chunk_elements):
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
        return self._element_changes(zi, zj, qi, qj, w, pairs, lam, self.step)

    def _element_changes(self, zi: Tensor, zj: Tensor, qi: Tensor, qj: Tensor, w: Tensor | float, pairs: Tensor,
                         lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        """Exact and first-order change of loss_n for each (token, pair) element (and each step
        when `step` is (E, P)); qi, qj are w_n <d, r_n> and w the elements' token weights."""
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        eps = step[..., pairs]
        nu = torch.sqrt(1 + eps**2 * (1 - rho**2))
        grow = 1 + s * eps * rho
        t_eps = self.shifted_bound(eps, pairs)
        dzi = (zi + s * eps * (t_eps - grow / nu * zj)).clamp(min=0) - zi
        zj_new = zj * grow
        alpha = -s * eps * t_eps + dzi + zj_new * s * eps / nu  # new recon - old, along d_i
        beta = zj_new * (1 - s * eps * rho) / nu - zj  # and along d_j
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


@dataclass
class DecoderCertificates:
    """C3: rotate d_i by the angle theta_i towards its tangent gradient u_i = g_i / ||g_i||,
    codes fixed: d_i <- cos(theta) d_i + sin(theta) u_i.

    With codes fixed the change is a function of sums: with A = sum_n z_in w_n <r_n, d_i>,
    B = sum_n z_in w_n <r_n, u_i> and S = sum_n w_n z_in^2 it is 2 (A + S)(1 - cos theta) - 2 B sin theta,
    whose exact minimiser is theta = atan2(B, A + S) (bounded to [0, pi/2])."""

    features: Tensor  # (F,)
    atom: Tensor  # (F, d) d_i
    direction: Tensor  # (F, d) unit, orthogonal to d_i
    condition = "C3"

    def __post_init__(self) -> None:
        self.step = torch.zeros(len(self.features), dtype=torch.float64, device=self.features.device)

    def __len__(self) -> int:
        return len(self.features)

    def _sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        return _once(self, stats, lambda: self._compute_sums(stats))

    def _compute_sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features.to(stats.sum_z_r.device)
        zr = stats.sum_z_r[features].to(self.atom.device)
        return (zr * self.atom.double()).sum(-1), (zr * self.direction.double()).sum(-1), stats.sum_z2[features].to(zr.device)

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        along_atom, along_direction, z2 = self._sums(stats)
        curvature = along_atom + z2
        theta = torch.where(curvature > 0, torch.atan2(along_direction, curvature), math.pi / 2)
        return theta.clamp(0, math.pi / 2)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        along_atom, along_direction, z2 = self._sums(stats)
        theta = step.double()
        change = 2 * (along_atom + z2) * (1 - torch.cos(theta)) - 2 * along_direction * torch.sin(theta)
        return change, -2 * along_direction * theta

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        entries = tokens.entries
        n_features = tokens.atoms.shape[0]
        slots = _slots_of(self.features, entries.cols, n_features)
        directions = torch.zeros_like(tokens.atoms)
        directions[self.features] = self.direction.to(directions.dtype)
        along_direction = entries.projections(tokens.wr, directions).double()
        theta = _per_entry(self.step, slots)
        z, along_atom = entries.values.double(), tokens.projections.double()
        change = -2 * z * ((torch.cos(theta) - 1) * along_atom + torch.sin(theta) * along_direction)
        change = change + tokens.w(entries.rows) * z**2 * (2 - 2 * torch.cos(theta))
        return TokenChanges.per_feature(entries, slots, len(self), change)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        i, theta = int(self.features[k]), float(self.step[k])
        atoms2 = atoms.clone()
        atoms2[i] = math.cos(theta) * atoms[i] + math.sin(theta) * self.direction[k].to(atoms.dtype)
        return atoms2, z, bias


@dataclass
class CodeCertificates:
    """C4: scale feature i's codes, z_in <- (1 + t_i) z_in on every token (a change of the
    encoder's row i and bias i that any ReLU encoder can make), t_i in [-1, 1].

    The change is exactly t (lam S_z - 2 S_zq) + t^2 S_zz with S_z = sum_n z_in,
    S_zq = sum_n z_in w_n <d_i, r_n> and S_zz = sum_n w_n z_in^2: sums pass 1 has
    (S_zq = <sum z w r, d_i>).
    Its minimiser t = (2 S_zq - lam S_z) / (2 S_zz) is the exact line search. At t = -1 the
    feature is removed: its change is then v_i, the feature's value (THEORY.md 3.4)."""

    features: Tensor  # (F,)
    atom: Tensor  # (F, d)
    condition = "C4"

    def __post_init__(self) -> None:
        self.step = torch.zeros(len(self.features), dtype=torch.float64, device=self.features.device)

    def __len__(self) -> int:
        return len(self.features)

    def _sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        return _once(self, stats, lambda: self._compute_sums(stats))

    def _compute_sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features.to(stats.sum_z.device)
        z_q = (stats.sum_z_r[features].to(self.atom.device) * self.atom.double()).sum(-1)
        return stats.sum_z[features].to(z_q.device), z_q, stats.sum_z2[features].to(z_q.device)

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        z, z_q, z2 = self._sums(stats)
        return ((2 * z_q - lam * z) / (2 * z2).clamp(min=1e-300)).clamp(-1, 1)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        z, z_q, z2 = self._sums(stats)
        first = step * (lam * z - 2 * z_q)
        return first + step**2 * z2, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        entries = tokens.entries
        slots = _slots_of(self.features, entries.cols, tokens.atoms.shape[0])
        t = _per_entry(self.step, slots)
        z, q = entries.values.double(), tokens.projections.double()
        change = t * (lam * z - 2 * z * q) + t**2 * tokens.w(entries.rows) * z**2
        return TokenChanges.per_feature(entries, slots, len(self), change)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        z2 = z.clone()
        z2[:, int(self.features[k])] *= 1 + float(self.step[k])
        return atoms, z2, bias


@dataclass
class BiasCertificate:
    """C5: b <- b + s u with u the direction of sum_n w_n r_n; the change is
    -2 s <sum w r, u> + s^2 sum w, so the exact minimiser is s = <sum w r, u> / sum w (||mean r||
    for unweighted tokens)."""

    direction: Tensor  # (d,) unit
    condition = "C5"

    def __post_init__(self) -> None:
        self.step = torch.zeros(1, dtype=torch.float64, device=self.direction.device)

    def __len__(self) -> int:
        return 1

    def _along(self, stats: LayerStatistics) -> Tensor:
        return (stats.sum_r.to(self.direction.device) * self.direction.double()).sum()[None]

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        return (self._along(stats) / max(stats.sum_w, 1e-300)).clamp(min=0)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        first = -2 * step * self._along(stats)
        return first + stats.sum_w * step**2, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        s = float(self.step[0])
        along = (tokens.wr @ self.direction.to(tokens.r.dtype)).double()
        return TokenChanges.per_token((-2 * s * along + tokens.w() * s * s)[:, None])

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        return atoms, z, bias + float(self.step[0]) * self.direction.to(bias.dtype)


@dataclass
class SpareCertificate:
    """C6: resample one dead feature k towards the worst residuals.

    The new atom a is the direction of one kept worst-residual token; the code rule is
    z_kn <- c on every token with w_n ||r_n|| > radius and 2 w_n <a, r_n> > lam (else 0), where
    radius is the smallest kept w_n ||r_n||. Every audit token with w_n ||r_n|| > radius is among
    the kept ones, so the same rule is evaluated exactly on the audit tokens from them, and
    applied unchanged to the held-out tokens (where feature k may have had codes: they are
    replaced). On the audit tokens the change is c^2 sum_S w_n - c sum_S (2 w_n p_n - lam),
    p_n = <a, r_n>, with the exact minimiser c = sum_S (2 w_n p_n - lam) / (2 sum_S w_n)."""

    feature: int
    atom: Tensor  # (d,) unit
    old_atom: Tensor  # (d,) d_k (zero for a zero-norm decoder row)
    radius: float
    condition = "C6"

    def __post_init__(self) -> None:
        self.step = torch.zeros(1, dtype=torch.float64, device=self.atom.device)

    def __len__(self) -> int:
        return 1

    @classmethod
    def best_of(cls, stats: LayerStatistics, feature: int, old_atom: Tensor, lam: float) -> "SpareCertificate | None":
        """The kept worst residual whose direction, as a new atom, lowers L on the audit tokens most."""
        norms, vectors, w = stats.worst_rnorm, stats.worst_residual, stats.worst_weight
        usable = norms > 0
        if not bool(usable.any()):
            return None
        radius = float(norms[-1]) if stats.n_tokens > len(norms) else -1.0
        candidates = vectors[usable] / vectors[usable].norm(dim=-1, keepdim=True)
        wp = w[:, None] * (vectors @ candidates.T)  # (kept, candidates)
        coded = (norms[:, None] > radius) & (2 * wp > lam)
        excess = torch.where(coded, 2 * wp - lam, 0.0).sum(0)
        gain = excess**2 / (4 * torch.where(coded, w[:, None], 0.0).sum(0).clamp(min=1e-300))
        best = int(gain.argmax())
        if float(gain[best]) <= 0:
            return None
        return cls(feature, candidates[best], old_atom.double(), radius)

    def _coded(self, r: Tensor, w: Tensor | float, lam: float) -> tuple[Tensor, Tensor]:
        """(p = <a, r_n>, the rule's mask) on tokens with residuals r and weights w."""
        p = (r @ self.atom.to(r.dtype)).double()
        return p, (w * r.norm(dim=-1).double() > self.radius) & (2 * w * p > lam)

    def _audit_sums(self, stats: LayerStatistics, lam: float) -> tuple[Tensor, Tensor]:
        """(sum_S (2 w_n p_n - lam), sum_S w_n) over the kept audit tokens the rule codes."""
        w = stats.worst_weight.to(self.atom.device)
        p, coded = self._coded(stats.worst_residual.to(self.atom.device), w, lam)
        return torch.where(coded, 2 * w * p - lam, 0.0).sum(), torch.where(coded, w, 0.0).sum()

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        excess, weight = self._audit_sums(stats, lam)
        return (excess / (2 * weight.clamp(min=1e-300)))[None]

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        excess, weight = self._audit_sums(stats, lam)
        first = -step * excess
        return first + step**2 * weight, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        w = tokens.w()
        p, coded = self._coded(tokens.r, w, lam)
        c = float(self.step[0])
        old = tokens.z[:, self.feature].double()
        q_old = (tokens.r @ self.old_atom.to(tokens.r.dtype)).double()
        new = c * coded.double()
        cross = float(self.atom @ self.old_atom.to(self.atom.dtype))
        old_norm2 = float(self.old_atom.norm() ** 2)
        # r' = r - (new a - old d_k): w (||r'||^2 - ||r||^2) + lam (new - old)
        squared = -2 * (new * p - old * q_old) + new**2 + old**2 * old_norm2 - 2 * new * old * cross
        return TokenChanges.per_token((w * squared + lam * (new - old))[:, None])

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        _, coded = self._coded(r, 1.0 if weight is None else weight.double(), lam)
        atoms2, z2 = atoms.clone(), z.clone()
        atoms2[self.feature] = self.atom.to(atoms.dtype)
        z2[:, self.feature] = float(self.step[0]) * coded.to(z.dtype)
        return atoms2, z2, bias


@dataclass
class DecoderStep:
    """The decoder gap (THEORY.md section 5): every atom at once along its tangent gradient,
    codes fixed. W_dec row i <- ||W_dec[i]|| (d_i + t g_i): in theory units the unit atom turns
    and the code grows by ||d_i + t g_i|| = sqrt(1 + t^2 ||g_i||^2), so the exact change is
        -2 t <sum_n z_n w_n r_n, G> + t^2 sum_n w_n ||G^T z_n||^2 + lam sum_i S_z,i (sqrt(1 + t^2 ||g_i||^2) - 1),
    convex in t; its minimiser, in [0, <ZR, G> / sum ||G^T z||^2], is found by bisection."""

    gradient: Tensor  # (K, d) g_i (tangent, per token)
    condition = "decoder"
    chunk_rows: int = 1 << 14  # audit CSR rows multiplied at once

    def __post_init__(self) -> None:
        self.step = torch.zeros(1, dtype=torch.float64, device=self.gradient.device)

    def __len__(self) -> int:
        return 1

    def _sums(self, stats: LayerStatistics) -> tuple[float, float, Tensor, Tensor]:
        return _once(self, stats, lambda: self._compute_sums(stats))

    def _compute_sums(self, stats: LayerStatistics) -> tuple[float, float, Tensor, Tensor]:
        along = float((stats.sum_z_r.to(self.gradient.device) * self.gradient).sum())
        curvature = _csr_product_norm2(stats.codes, self.gradient, self.chunk_rows) if stats.codes is not None else 0.0
        return along, curvature, stats.sum_z.to(self.gradient.device), (self.gradient**2).sum(-1)

    def _change(self, t: float, along: float, curvature: float, sum_z: Tensor, g2: Tensor, lam: float) -> float:
        return -2 * t * along + t * t * curvature + lam * float((sum_z * (torch.sqrt(1 + t * t * g2) - 1)).sum())

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        along, curvature, sum_z, g2 = self._sums(stats)
        if along <= 0 or curvature <= 0:
            return torch.zeros(1, dtype=torch.float64, device=self.gradient.device)
        low, high = 0.0, along / curvature  # the L1 term only pulls the minimiser towards 0
        for _ in range(80):
            mid = (low + high) / 2
            slope = -2 * along + 2 * mid * curvature + lam * float((sum_z * mid * g2 / torch.sqrt(1 + mid * mid * g2)).sum())
            low, high = (mid, high) if slope < 0 else (low, mid)
        return torch.tensor([low], dtype=torch.float64, device=self.gradient.device)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        along, curvature, sum_z, g2 = self._sums(stats)
        t = float(step[0])
        change = self._change(t, along, curvature, sum_z, g2, lam)
        return torch.tensor([change], dtype=torch.float64), torch.tensor([-2 * t * along], dtype=torch.float64)

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        t = float(self.step[0])
        entries = tokens.entries
        moved = entries.matrix(tokens.r.dtype) @ self.gradient.to(tokens.r.dtype)  # (n, d) G^T z_n
        growth = torch.sqrt(1 + t * t * (self.gradient**2).sum(-1)) - 1
        l1 = torch.zeros(tokens.n_tokens, dtype=torch.float64, device=tokens.r.device)
        l1.index_add_(0, entries.rows, entries.values.double() * growth.to(l1.device)[entries.cols])
        change = -2 * t * (tokens.wr * moved).sum(-1).double() + t * t * tokens.w() * (moved.double() ** 2).sum(-1)
        change = change + lam * l1
        return TokenChanges.per_token(change[:, None])

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        t = float(self.step[0])
        moved = atoms + t * self.gradient.to(atoms.dtype)
        norms = moved.norm(dim=-1)
        return moved / norms.clamp(min=1e-300)[:, None], z * norms, bias


def _column(w: Tensor | float) -> Tensor | float:
    """Per-token weights as a column, to scale (n, F) changes (a scalar stays one)."""
    return w[:, None] if isinstance(w, Tensor) else w


def _once(family: object, stats: LayerStatistics, compute):
    """A family's sums of pass-1 statistics, computed once per statistics object: the line search
    and the audit change read the same (K, d) products."""
    cached = family.__dict__.get("_sums_of")
    if cached is None or cached[0] is not stats:
        cached = (stats, compute())
        family.__dict__["_sums_of"] = cached
    return cached[1]


def _csr_product_norm2(codes: CSR, matrix: Tensor, chunk_rows: int) -> float:
    """sum_n w_n ||matrix^T z_n||^2 over the rows of a CSR (w_n its row weights, else 1), a block
    of rows at a time."""
    import warnings

    codes = codes.to(matrix.device)
    total = 0.0
    for start in range(0, codes.n_tokens, chunk_rows):
        stop = min(start + chunk_rows, codes.n_tokens)
        lo, hi = int(codes.crow[start]), int(codes.crow[stop])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            block = torch.sparse_csr_tensor(
                codes.crow[start:stop + 1] - lo, codes.col[lo:hi].long(), codes.val[lo:hi].to(matrix.dtype),
                (stop - start, codes.n_features), check_invariants=False,
            )
        squared = ((block @ matrix).double() ** 2).sum(-1)
        total += float((squared if codes.weight is None else codes.weight[start:stop] * squared).sum())
    return total


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
