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
    """

    i: Tensor  # (P,)
    j: Tensor  # (P,)
    kind: Tensor  # (P,) +1 / -1
    bound: Tensor  # (P,) T
    rho: Tensor  # (P,)
    condition = "C2"
    eps = EPS_LADDER
    chunk: int = 4096

    def __len__(self) -> int:
        return len(self.i)

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        parts = [self._chunk_change(z, q, lam, sl) for sl in _chunks(len(self.i), self.chunk)]
        if not parts:
            empty = torch.zeros(len(self.eps), 0, dtype=torch.float64, device=z.device)
            return empty, empty
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def _chunk_change(self, z: Tensor, q: Tensor, lam: float, sl: slice) -> tuple[Tensor, Tensor]:
        i, j = self.i[sl], self.j[sl]
        zi, zj, qi, qj = z[:, i].double(), z[:, j].double(), q[:, i].double(), q[:, j].double()
        s, t, rho = self.kind[sl].double(), self.bound[sl].double(), self.rho[sl].double()
        changes, firsts = [], []
        for eps in self.eps:
            nu = torch.sqrt(1 + eps**2 * (1 - rho**2))
            dzi = (zi - s * eps * (zj - t)).clamp(min=0) - zi
            zj_new = zj * (1 + s * eps * rho)
            alpha = -s * eps * t + dzi + zj_new * s * eps / nu  # new recon - old, along d_i
            beta = zj_new * (1 - s * eps * rho) / nu - zj  # and along d_j
            change = -2 * (alpha * qi + beta * qj) + alpha**2 + beta**2 + 2 * alpha * beta * rho
            change = change + lam * (dzi + zj_new - zj)
            changes.append(change.sum(0))
            firsts.append((lam * s * eps * (t - (1 - rho) * zj)).sum(0))
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
    """C3: rotate d_i towards its tangent gradient u_i = g_i / ||g_i||, codes fixed."""

    features: Tensor  # (F,)
    direction: Tensor  # (F, d) unit, orthogonal to d_i
    condition = "C3"
    eps = EPS_LADDER

    def __len__(self) -> int:
        return len(self.features)

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        zi, qi = z[:, self.features].double(), q[:, self.features].double()
        ru = (r @ self.direction.to(r.dtype).T).double()
        changes, firsts = [], []
        for eps in self.eps:
            nu = math.sqrt(1 + eps**2)
            r_dot_step = qi * (1 / nu - 1) + eps * ru / nu  # <r, d_i' - d_i>
            step_sq = 2 - 2 / nu  # ||d_i' - d_i||^2
            changes.append((-2 * zi * r_dot_step + zi**2 * step_sq).sum(0))
            firsts.append((-2 * eps * zi * ru).sum(0))
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
        zi, excess = z[:, self.features], 2 * q[:, self.features] - lam
        active = zi > 0
        on = torch.where(active, excess.abs(), 0).sum(0, dtype=torch.float64)
        off = torch.where(active, 0, excess.clamp(min=0)).sum(0, dtype=torch.float64)
        return on, off

    def batch_change(self, z: Tensor, r: Tensor, q: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        zi, qi = z[:, self.features], q[:, self.features]
        excess = 2 * qi - lam
        active = zi > 0
        direction = torch.where(active, torch.sign(excess), (excess > 0).to(zi.dtype))
        slope = torch.where(active, excess.abs(), excess.clamp(min=0))
        changes, firsts = [], []
        for eps in self.eps:
            step = eps * self.scale.to(zi.dtype)
            dz = (zi + step * direction).clamp(min=0) - zi
            changes.append((-2 * dz * qi + dz**2 + lam * dz).sum(0, dtype=torch.float64))
            firsts.append(-(step * slope).sum(0, dtype=torch.float64))
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
