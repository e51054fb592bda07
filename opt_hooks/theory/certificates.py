"""Certificates: the descent directions of THEORY.md section 2, one family per condition.

A family holds F certificates of one condition. For every step eps in its ladder and every
certificate it gives the exact change of sum_n loss_n (codes clipped at zero) and its
first-order part, both float64, two ways:

- `audit_change(stats, totals, lam)`: on the audit tokens, from pass-1 statistics alone (sums,
  the sparse codes with each active <d_i, r_n>, the kept worst residuals, the lam totals).
  Every perturbation below is chosen so that this is exact without a second look at the data.
- `token_change(tokens, lam)`: on a `TokenBatch` (the held-out tokens), token by token where
  the perturbation needs it, from its sparse entries and lam terms where that is exact.

Both are closed forms in the few quantities the perturbation touches, algebraically identical
to recomputing L and far more accurate than subtracting two large losses. `apply` performs the
same perturbation on full tensors so the tests can check both against `objective.objective`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from opt_hooks.theory.codes import SparseBatch
from opt_hooks.theory.stats import LamTotals, LayerStatistics, TokenBatch

EPS_LADDER = (1e-2, 1e-3, 1e-4)

Perturbed = tuple[Tensor, Tensor, Tensor]  # (atoms, z, bias) after the step


@dataclass
class FloorCertificates:
    """C1: b <- b + m_i d_i, z_i <- max(z_i - m_i, 0). A finite step, exact on the audit tokens."""

    features: Tensor  # (F,)
    floor: Tensor  # (F,) m_i = min_n z_in > 0
    condition = "C1"
    eps = (1.0,)  # the step is the whole floor m_i

    def __len__(self) -> int:
        return len(self.features)

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        zi, qi = tokens.z[:, self.features].double(), tokens.q(self.features).double()
        m = self.floor.double()
        dz = -torch.minimum(zi, m)
        uncovered = (m - zi).clamp(min=0)  # where z_i < m the bias shift is not compensated
        change = -2 * uncovered * qi + uncovered**2 + lam * dz
        first = torch.broadcast_to(-lam * m, zi.shape)
        return change.sum(0)[None], first.sum(0)[None]

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        # m_i is the minimum over the audit tokens, so z_i >= m_i on each: the bias shift is
        # compensated everywhere and every token changes by exactly -lam m_i.
        change = (-lam * stats.n_tokens * self.floor.double())[None]
        return change, change.clone()

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i, m = int(self.features[k]), float(self.floor[k])
        z2 = z.clone()
        z2[:, i] = (z[:, i] - m).clamp(min=0)
        return atoms, z2, bias + m * atoms[i]


@dataclass
class PairCertificates:
    """C2, one certificate per flagged ordered pair (i, j).

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
    eps = EPS_LADDER
    chunk_elements: int = 1 << 22  # bound on gathered (pair, token) elements per step

    def __len__(self) -> int:
        return len(self.i)

    def shifted_bound(self, eps: float, pairs: Tensor | slice = slice(None)) -> Tensor:
        """T_eps of the pairs (float64)."""
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        c = (1 + s * eps * rho) / torch.sqrt(1 + eps**2 * (1 - rho**2))
        return torch.where(s > 0, t * torch.clamp(c, min=1), t * torch.clamp(c, max=1))

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        codes = stats.codes
        if codes is None or codes.aux is None:
            raise ValueError("C2 certificates need the sparse codes with their projections")
        shape = (len(self.eps), len(self.i))
        change = torch.zeros(shape, dtype=torch.float64, device=self.i.device)
        first = torch.zeros(shape, dtype=torch.float64, device=self.i.device)
        codes = codes.to(self.i.device)
        order, start, count = codes.by_feature()
        row_of, keys = codes.row_ids(), codes.keys()
        all_pairs = torch.arange(len(self.i), device=self.i.device)
        hierarchy = self.kind > 0
        self._closed_form_j_off(hierarchy, stats.n_tokens - count[self.j].double(), lam, change, first)

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
            self._add(change, first, pairs, *self._token_changes(zi, zj, qi, qj, pairs, lam))
        # complementary pairs: tokens where i fires and j is off
        complementary = torch.nonzero(~hierarchy).flatten()
        for pairs, entries in _entries_of(self.i, complementary, order, start, count, self.chunk_elements):
            rows = row_of[entries]
            j_on, _, _ = lookup(rows, self.j[pairs])
            keep = ~j_on
            pairs, entries = pairs[keep], entries[keep]
            zi, qi = codes.val[entries].double(), codes.aux[entries].double()
            zero = torch.zeros_like(zi)
            self._add(change, first, pairs, *self._token_changes(zi, zero, qi, zero, pairs, lam))
        return change, first

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        # Only the pairs' features are read: their codes and <d_i, r_n> columns, renumbered.
        used, inverse = torch.unique(torch.cat([self.i, self.j]), return_inverse=True)
        local = PairCertificates(inverse[: len(self.i)], inverse[len(self.i):], self.kind, self.bound, self.rho)
        local.eps, local.chunk_elements = self.eps, self.chunk_elements
        return local.dense_change(tokens.z[:, used], tokens.q(used), lam)

    def dense_change(self, z: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """The change on tokens given as dense codes z and projections q = r D^T."""
        shape = (len(self.eps), len(self.i))
        change = torch.zeros(shape, dtype=torch.float64, device=z.device)
        first = torch.zeros(shape, dtype=torch.float64, device=z.device)
        hierarchy = self.kind > 0
        codes = SparseBatch(z)  # nonnegative codes: the nonzeros are the active entries
        order, start, count = codes.by_feature
        self._closed_form_j_off(hierarchy, z.shape[0] - count[self.j].double(), lam, change, first)
        # hierarchy pairs: the tokens where j fires; complementary pairs: every token
        pairs_h = torch.nonzero(hierarchy).flatten()
        for pairs, entries in _entries_of(self.j, pairs_h, order, start, count, self.chunk_elements):
            rows = codes.rows[entries]
            self._add(change, first, pairs, *self._dense_token_changes(z, q, rows, pairs, lam))
        complementary = torch.nonzero(~hierarchy).flatten()
        for sl in _chunks(len(complementary), max(1, self.chunk_elements // max(z.shape[0], 1))):
            pairs = complementary[sl][None, :].expand(z.shape[0], -1).flatten()
            rows = torch.arange(z.shape[0], device=z.device)[:, None].expand(-1, len(complementary[sl])).flatten()
            self._add(change, first, pairs, *self._dense_token_changes(z, q, rows, pairs, lam))
        return change, first

    def _closed_form_j_off(self, hierarchy: Tensor, j_off: Tensor, lam: float, change: Tensor, first: Tensor) -> None:
        """Hierarchy pairs: every token where j is off changes by lam eps T_eps."""
        for e, eps in enumerate(self.eps):
            change[e] += torch.where(hierarchy, lam * eps * self.shifted_bound(eps) * j_off, 0.0)
            first[e] += torch.where(hierarchy, lam * eps * self.bound.double() * j_off, 0.0)

    def _dense_token_changes(self, z: Tensor, q: Tensor, rows: Tensor, pairs: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        i, j = self.i[pairs], self.j[pairs]
        zi, zj, qi, qj = (m[rows, f].double() for m, f in ((z, i), (z, j), (q, i), (q, j)))
        return self._token_changes(zi, zj, qi, qj, pairs, lam)

    @staticmethod
    def _add(change: Tensor, first: Tensor, pairs: Tensor, ch: Tensor, fi: Tensor) -> None:
        change.index_add_(1, pairs, ch)
        first.index_add_(1, pairs, fi)

    def _token_changes(self, zi: Tensor, zj: Tensor, qi: Tensor, qj: Tensor, pairs: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """Exact and first-order change of loss_n for each (token, pair) element, every eps: (E, n)."""
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        changes, firsts = [], []
        for eps in self.eps:
            nu = torch.sqrt(1 + eps**2 * (1 - rho**2))
            grow = 1 + s * eps * rho
            t_eps = self.shifted_bound(eps, pairs)
            dzi = (zi + s * eps * (t_eps - grow / nu * zj)).clamp(min=0) - zi
            zj_new = zj * grow
            alpha = -s * eps * t_eps + dzi + zj_new * s * eps / nu  # new recon - old, along d_i
            beta = zj_new * (1 - s * eps * rho) / nu - zj  # and along d_j
            change = -2 * (alpha * qi + beta * qj) + alpha**2 + beta**2 + 2 * alpha * beta * rho
            changes.append(change + lam * (dzi + zj_new - zj))
            firsts.append(lam * s * eps * (t - (1 - rho) * zj))
        return torch.stack(changes), torch.stack(firsts)

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i, j, s = int(self.i[k]), int(self.j[k]), float(self.kind[k])
        rho = float(self.rho[k])
        t_eps = float(self.shifted_bound(eps, slice(k, k + 1)))
        nu = math.sqrt(1 + eps**2 * (1 - rho**2))
        atoms2, z2 = atoms.clone(), z.clone()
        direction = (1 - s * eps * rho) * atoms[j] + s * eps * atoms[i]
        atoms2[j] = direction / direction.norm()
        z2[:, i] = (z[:, i] + s * eps * (t_eps - (1 + s * eps * rho) / nu * z[:, j])).clamp(min=0)
        z2[:, j] = z[:, j] * (1 + s * eps * rho)
        return atoms2, z2, bias - s * eps * t_eps * atoms[i]


@dataclass
class DecoderCertificates:
    """C3: rotate d_i towards its tangent gradient u_i = g_i / ||g_i||, codes fixed.

    With codes fixed the change is a function of sums: sum_n [-2 z_in <r_n, D_i> + z_in^2 ||D_i||^2]
    = -2 <sum_n z_in r_n, D_i> + ||D_i||^2 sum_n z_in^2, with D_i = d_i' - d_i.
    """

    features: Tensor  # (F,)
    atom: Tensor  # (F, d) d_i
    direction: Tensor  # (F, d) unit, orthogonal to d_i
    condition = "C3"
    eps = EPS_LADDER

    def __len__(self) -> int:
        return len(self.features)

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        features = self.features.to(stats.sum_z_r.device)
        return self._change(stats.sum_z_r[features].to(self.atom.device), stats.sum_z2[features].to(self.atom.device))

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        entries = tokens.entries
        zr = (entries.transposed(tokens.r.dtype) @ tokens.r).double()[self.features]  # (F, d) sum_n z_in r_n
        return self._change(zr, entries.per_feature(entries.values.double() ** 2)[self.features])

    def _change(self, zr: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        """From sum_n z_in r_n (F, d) and sum_n z_in^2 (F,)."""
        along_atom = (zr * self.atom.double()).sum(-1)
        along_direction = (zr * self.direction.double()).sum(-1)
        changes, firsts = [], []
        for eps in self.eps:
            nu = math.sqrt(1 + eps**2)
            zr_dot_step = along_atom * (1 / nu - 1) + eps * along_direction / nu
            changes.append(-2 * zr_dot_step + (2 - 2 / nu) * z2)
            firsts.append(-2 * eps * along_direction)
        return torch.stack(changes), torch.stack(firsts)

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i = int(self.features[k])
        atoms2 = atoms.clone()
        atoms2[i] = (atoms[i] + eps * self.direction[k].to(atoms.dtype)) / math.sqrt(1 + eps**2)
        return atoms2, z, bias


@dataclass
class CodeCertificates:
    """C4: move feature i's codes by eps * scale_i along the sign of 2<d_i, r_n> - lam.

    On active tokens z <- max(z + eps s sign(2q - lam), 0); on inactive tokens z <- eps s where
    2q > lam. Its first-order change is -eps * scale_i * G4_i, so the first-order sums are
    exactly the G4 sums of THEORY.md (split by active / inactive tokens).
    """

    features: Tensor  # (F,)
    scale: Tensor  # (F,) typical active code of the feature
    condition = "C4"
    eps = EPS_LADDER
    chunk_elements: int = 1 << 22  # active entries handled at once

    def __len__(self) -> int:
        return len(self.features)

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        codes = stats.codes.to(self.features.device)
        return self._change(codes.col.long(), codes.val, codes.aux, totals, lam)

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        entries = tokens.entries
        return self._change(entries.cols, entries.values, tokens.projections, tokens.totals, lam)

    def audit_gain(self, stats: LayerStatistics, totals: LamTotals, lam: float) -> tuple[Tensor, Tensor]:
        """(sum over active tokens of |2 <d_i, r_n> - lam|, sum over inactive ones of
        max(0, 2 <d_i, r_n> - lam)) per certificate's feature: G4's parts, on the audit tokens."""
        codes = stats.codes.to(self.features.device)
        return self._gain(codes.col.long(), codes.aux, totals, lam)

    def _slots(self, cols: Tensor) -> Tensor:
        """Each entry's certificate (-1: its feature has none)."""
        size = 1 + max(int(cols.max()) if len(cols) else 0, int(self.features.max()) if len(self) else 0)
        slot_of = torch.full((size,), -1, dtype=torch.int64, device=cols.device)
        slot_of[self.features.to(cols.device)] = torch.arange(len(self), device=cols.device)
        return slot_of[cols]

    def _per_certificate(self, slots: Tensor, values: Tensor) -> Tensor:
        out = torch.zeros(len(self), dtype=torch.float64, device=values.device)
        return out.index_add_(0, slots.clamp(min=0), torch.where(slots >= 0, values, 0.0))

    def _gain(self, cols: Tensor, q: Tensor, totals: LamTotals, lam: float) -> tuple[Tensor, Tensor]:
        active = torch.zeros(len(self), dtype=torch.float64, device=q.device)
        for sl in _chunks(len(cols), self.chunk_elements) if len(self) else []:
            active += self._per_certificate(self._slots(cols[sl]), (2 * q[sl].double() - lam).abs())
        return active, totals.inactive_gain.to(active.device)[self.features]

    def _change(self, cols: Tensor, z: Tensor, q: Tensor, totals: LamTotals, lam: float) -> tuple[Tensor, Tensor]:
        """From the active entries (feature, z, <d_i, r_n>) and the inactive tokens' lam terms."""
        if len(self) == 0:  # no live feature on the audit tokens (the held-out ones may have codes)
            empty = torch.zeros(len(self.eps), 0, dtype=torch.float64, device=z.device)
            return empty, empty.clone()
        scale = self.scale.double().to(z.device)
        active = torch.zeros(len(self.eps), len(self), dtype=torch.float64, device=z.device)
        for sl in _chunks(len(cols), self.chunk_elements):  # bounded memory at any number of codes
            slots, zc, qc = self._slots(cols[sl]), z[sl].double(), q[sl].double()
            entry_scale = torch.where(slots >= 0, scale[slots.clamp(min=0)], 0.0)
            direction = torch.sign(2 * qc - lam)
            for e, eps in enumerate(self.eps):
                dz = (zc + eps * entry_scale * direction).clamp(min=0) - zc
                active[e] += self._per_certificate(slots, dz * (lam - 2 * qc + dz))
        active_gain, inactive_gain = self._gain(cols, q, totals, lam)
        over_count = totals.over_count.to(z.device)[self.features].double()
        over_excess = totals.over_excess.to(z.device)[self.features]
        steps = torch.tensor(self.eps, dtype=torch.float64, device=z.device)[:, None] * scale
        # inactive tokens with q > lam/2: dz = step, so the change is step^2 - 2 step (q - lam/2)
        change = active + steps**2 * over_count - 2 * steps * over_excess
        return change, -steps * (active_gain + inactive_gain)

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i = int(self.features[k])
        excess = 2 * (r @ atoms[i]) - lam
        active = z[:, i] > 0
        direction = torch.where(active, torch.sign(excess), (excess > 0).to(z.dtype))
        z2 = z.clone()
        z2[:, i] = (z[:, i] + eps * float(self.scale[k]) * direction).clamp(min=0)
        return atoms, z2, bias


@dataclass
class BiasCertificate:
    """C5: b <- b + eps ||mean r|| u with u = mean(r) / ||mean(r)||."""

    direction: Tensor  # (d,) unit
    scale: float  # ||mean r|| on the audit tokens
    condition = "C5"
    eps = EPS_LADDER

    def __len__(self) -> int:
        return 1

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        return self._change((stats.sum_r.to(self.direction.device) * self.direction.double()).sum(), stats.n_tokens)

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        return self._change((tokens.r.sum(0, dtype=torch.float64) * self.direction.double()).sum(), tokens.n_tokens)

    def _change(self, ru: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """From sum_n <r_n, u> and the token count."""
        steps = torch.tensor(self.eps, dtype=torch.float64, device=ru.device) * self.scale
        change = -2 * steps * ru + n * steps**2
        return change[:, None], (-2 * steps * ru)[:, None]

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        return atoms, z, bias + eps * self.scale * self.direction.to(bias.dtype)


@dataclass
class SpareCertificates:
    """C6: give dead feature k the atom a = r_m / ||r_m|| of a worst-residual token m, and the
    code eps ||r_m|| on every token where 2 <a, r_n> > lam.

    On the audit tokens the code goes only to the kept worst-residual tokens (THEORY.md's
    single-token certificate, over the k tokens whose residuals pass 1 kept): exact from those
    residuals. Held-out tokens get the rule itself, on every token."""

    features: Tensor  # (F,) dead features
    atom: Tensor  # (F, d) unit
    scale: Tensor  # (F,) ||r_m||
    condition = "C6"
    eps = EPS_LADDER

    def __len__(self) -> int:
        return len(self.features)

    def audit_change(self, stats: LayerStatistics, totals: LamTotals | None, lam: float) -> tuple[Tensor, Tensor]:
        return self._change(stats.worst_residual.to(self.atom.device), lam)

    def token_change(self, tokens: TokenBatch, lam: float) -> tuple[Tensor, Tensor]:
        return self._change(tokens.r, lam)

    def _change(self, r: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """Coding every token of r where 2 <a, r_n> > lam."""
        p = (r @ self.atom.to(r.dtype).T).double()
        seen = (2 * p > lam).double()
        changes, firsts = [], []
        for eps in self.eps:
            dz = eps * self.scale.double() * seen
            changes.append((-2 * dz * p + dz**2 + lam * dz).sum(0))
            firsts.append((dz * (lam - 2 * p)).sum(0))
        return torch.stack(changes), torch.stack(firsts)

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i = int(self.features[k])
        a = self.atom[k].to(atoms.dtype)
        atoms2, z2 = atoms.clone(), z.clone()
        atoms2[i] = a
        z2[:, i] = eps * float(self.scale[k]) * (2 * (r @ a) > lam).to(z.dtype)
        return atoms2, z2, bias


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
