"""C5, bias stationarity (THEORY.md section 2): the (weighted) mean residual must vanish; its
certificate moves the bias along it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import Perturbed, TokenChanges
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class BiasCheck:
    mean_residual: Tensor  # (d,)
    norm: float  # ||mean r||
    size: float  # ||mean r|| / mean ||r||


def c5_bias(stats: LayerStatistics) -> BiasCheck:
    """C5: the mean residual must vanish."""
    n = max(stats.n_tokens, 1)
    mean_residual = stats.sum_r / n
    norm = float(mean_residual.norm())
    scale = stats.sum_rnorm / n
    return BiasCheck(mean_residual=mean_residual, norm=norm, size=norm / scale if scale > 0 else 0.0)


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
