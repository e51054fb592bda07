"""Certificates: the descent directions of THEORY.md section 2, one family per condition.

A family holds F certificates of one condition. For a batch of tokens it returns, for every
step eps in its ladder and every certificate, the exact change of sum_n loss_n (codes
clipped at zero) and its first-order part, both float64. The exact change is computed in
closed form from the few quantities the perturbation touches (codes of one or two features,
<r_n, d_i>), which is algebraically identical to recomputing L and far more accurate than
subtracting two large losses. `apply` performs the same perturbation on full tensors so the
tests can check the closed form against `objective.objective` directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

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

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        zi, qi = z[:, self.features].double(), q[:, self.features].double()
        m = self.floor.double()
        dz = -torch.minimum(zi, m)
        uncovered = (m - zi).clamp(min=0)  # where z_i < m the bias shift is not compensated
        change = -2 * uncovered * qi + uncovered**2 + lam * dz
        first = torch.broadcast_to(-lam * m, zi.shape)
        return change.sum(0)[None], first.sum(0)[None]

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i, m = int(self.features[k]), float(self.floor[k])
        z2 = z.clone()
        z2[:, i] = (z[:, i] - m).clamp(min=0)
        return atoms, z2, bias + m * atoms[i]


@dataclass
class PairCertificates:
    """C2, one certificate per flagged ordered pair (i, j).

    kind +1 (hierarchy, T = M) absorbs the parent i into the child j; kind -1
    (complementary, T = m) is the mirror image. With s = kind:
        d_j <- normalise(d_j + s eps (d_i - rho d_j)),  z_i <- max(z_i - s eps (z_j - T), 0),
        z_j <- z_j (1 + s eps rho),                    b <- b - s eps T d_i.

    For a hierarchy, a token where j is off changes by exactly lam eps T (z_i grows by eps T,
    the bias shift cancels it in the reconstruction), so only the tokens where j fires are
    gathered: the work per batch is the number of (pair, token where j fires), not pairs x
    tokens. Complementary pairs (rare: j is on wherever i is off) are evaluated densely.
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

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        shape = (len(self.eps), len(self.i))
        change = torch.zeros(shape, dtype=torch.float64, device=z.device)
        first = torch.zeros(shape, dtype=torch.float64, device=z.device)
        hierarchy = torch.nonzero(self.kind > 0).flatten()
        complementary = torch.nonzero(self.kind < 0).flatten()
        if len(hierarchy):
            self._hierarchy_change(z, q, lam, hierarchy, change, first)
        for sl in _chunks(len(complementary), max(1, self.chunk_elements // max(z.shape[0], 1))):
            pairs = complementary[sl]
            rows = torch.arange(z.shape[0], device=z.device)[:, None].expand(-1, len(pairs))
            ch, fi = self._token_changes(z, q, lam, rows, pairs[None, :].expand_as(rows))
            change[:, pairs] += ch.sum(1)
            first[:, pairs] += fi.sum(1)
        return change, first

    def _hierarchy_change(self, z: Tensor, q: Tensor, lam: float, pairs: Tensor, change: Tensor, first: Tensor) -> None:
        n_tokens, n_features = z.shape
        token, feature = torch.nonzero(z > 0, as_tuple=True)
        by_feature = torch.argsort(feature, stable=True)
        token = token[by_feature]
        count = torch.bincount(feature, minlength=n_features)
        start = torch.cumsum(count, 0) - count
        eps = torch.tensor(self.eps, dtype=torch.float64, device=z.device)[:, None]
        t = self.bound[pairs].double()
        j_off = (n_tokens - count[self.j[pairs]]).double()
        change[:, pairs] += lam * eps * t * j_off  # tokens where j is off, in closed form
        first[:, pairs] += lam * eps * t * j_off
        per_pair = count[self.j[pairs]]
        for sl in _chunks_by_total(per_pair, self.chunk_elements):
            chunk_pairs, lengths = pairs[sl], per_pair[sl]
            owner = torch.repeat_interleave(torch.arange(len(chunk_pairs), device=z.device), lengths)
            offset = torch.arange(int(lengths.sum()), device=z.device) - (torch.cumsum(lengths, 0) - lengths)[owner]
            rows = token[start[self.j[chunk_pairs]][owner] + offset]
            ch, fi = self._token_changes(z, q, lam, rows, chunk_pairs[owner])
            change.index_add_(1, chunk_pairs, torch.zeros_like(change[:, :len(chunk_pairs)]).index_add_(1, owner, ch))
            first.index_add_(1, chunk_pairs, torch.zeros_like(first[:, :len(chunk_pairs)]).index_add_(1, owner, fi))

    def _token_changes(self, z: Tensor, q: Tensor, lam: float, rows: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """Exact and first-order change of loss_n for each (token row, pair), every eps: (E, ...)."""
        i, j = self.i[pairs], self.j[pairs]
        zi, zj, qi, qj = z[rows, i].double(), z[rows, j].double(), q[rows, i].double(), q[rows, j].double()
        s, t, rho = self.kind[pairs].double(), self.bound[pairs].double(), self.rho[pairs].double()
        changes, firsts = [], []
        for eps in self.eps:
            nu = torch.sqrt(1 + eps**2 * (1 - rho**2))
            dzi = (zi - s * eps * (zj - t)).clamp(min=0) - zi
            zj_new = zj * (1 + s * eps * rho)
            alpha = -s * eps * t + dzi + zj_new * s * eps / nu  # new recon - old, along d_i
            beta = zj_new * (1 - s * eps * rho) / nu - zj  # and along d_j
            change = -2 * (alpha * qi + beta * qj) + alpha**2 + beta**2 + 2 * alpha * beta * rho
            changes.append(change + lam * (dzi + zj_new - zj))
            firsts.append(lam * s * eps * (t - (1 - rho) * zj))
        return torch.stack(changes), torch.stack(firsts)

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        i, j, s = int(self.i[k]), int(self.j[k]), float(self.kind[k])
        t, rho = float(self.bound[k]), float(self.rho[k])
        atoms2, z2 = atoms.clone(), z.clone()
        direction = (1 - s * eps * rho) * atoms[j] + s * eps * atoms[i]
        atoms2[j] = direction / direction.norm()
        z2[:, i] = (z[:, i] - s * eps * (z[:, j] - t)).clamp(min=0)
        z2[:, j] = z[:, j] * (1 + s * eps * rho)
        return atoms2, z2, bias - s * eps * t * atoms[i]


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

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        zr = (z.T @ r)[self.features].double()  # (F, d) sum_n z_in r_n
        z2 = (z.double() ** 2).sum(0)[self.features]
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

    def __len__(self) -> int:
        return len(self.features)

    def gain_parts(self, z: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """(sum over active of |2q - lam|, sum over inactive of (2q - lam)_+), per feature."""
        excess = 2 * q - lam
        active = z > 0
        on = torch.where(active, excess.abs(), 0).sum(0, dtype=torch.float64)
        off = torch.where(active, 0, excess.clamp(min=0)).sum(0, dtype=torch.float64)
        return on[self.features], off[self.features]

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        # Whole (n, K) matrices, then the certificates' columns: a column gather would copy
        # nearly all of them anyway (every live feature has a certificate).
        excess = 2 * q - lam
        active = z > 0
        direction = torch.where(active, torch.sign(excess), (excess > 0).to(z.dtype))
        slope = torch.where(active, excess.abs(), excess.clamp(min=0)).sum(0, dtype=torch.float64)
        scale = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
        scale[self.features] = self.scale.to(z.dtype)
        changes, firsts = [], []
        for eps in self.eps:
            step = eps * scale
            dz = (z + step * direction).clamp(min=0) - z
            change = (dz * (lam - 2 * q + dz)).sum(0, dtype=torch.float64)
            changes.append(change[self.features])
            firsts.append(-(eps * scale.double() * slope)[self.features])
        return torch.stack(changes), torch.stack(firsts)

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

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        ru = (r @ self.direction.to(r.dtype)).double()
        n = r.shape[0]
        steps = torch.tensor(self.eps, dtype=torch.float64, device=r.device) * self.scale
        change = -2 * steps * ru.sum() + n * steps**2
        return change[:, None], (-2 * steps * ru.sum())[:, None]

    def apply(self, k: int, eps: float, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float) -> Perturbed:
        return atoms, z, bias + eps * self.scale * self.direction.to(bias.dtype)


@dataclass
class SpareCertificates:
    """C6: give dead feature k the atom a = r_m / ||r_m|| of a worst-residual token m, and the
    code eps ||r_m|| on every token where 2 <a, r_n> > lam."""

    features: Tensor  # (F,) dead features
    atom: Tensor  # (F, d) unit
    scale: Tensor  # (F,) ||r_m||
    condition = "C6"
    eps = EPS_LADDER

    def __len__(self) -> int:
        return len(self.features)

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
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
