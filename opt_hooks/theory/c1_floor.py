"""C1, the floor (THEORY.md section 2): every feature must be off somewhere. Exact and lam-free.

If m_i = min_n z_in > 0, moving m_i d_i into the bias keeps every reconstruction and lowers L by
exactly lam m_i: a finite step, not a first-order one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import Perturbed, TokenChanges, column
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class FloorCheck:
    floor: Tensor  # (K,) m_i = min_n z_in (0 for a feature that is off somewhere)
    violated: Tensor  # (K,) bool, exact: m_i > 0


def c1_floor(stats: LayerStatistics) -> FloorCheck:
    """C1: every feature must be off somewhere. Exact zero test, no tolerance."""
    seen = stats.n_tokens > 0
    floor = torch.where(torch.isfinite(stats.min_z), stats.min_z, torch.zeros_like(stats.min_z))
    return FloorCheck(floor=floor, violated=(floor > 0) & seen)


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
        return TokenChanges.per_token(-2 * uncovered * qi + column(tokens.w()) * uncovered**2 + lam * dz)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        i, s = int(self.features[k]), float(self.step[k])
        z2 = z.clone()
        z2[:, i] = (z[:, i] - s).clamp(min=0)
        return atoms, z2, bias + s * atoms[i]
