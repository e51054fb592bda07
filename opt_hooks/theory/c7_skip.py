"""C7, skip stationarity (THEORY.md section 8): a skip transcoder's residual must be
uncorrelated with its input; its certificate moves W_skip along that correlation.

A skip transcoder predicts y_n from x_n as W_skip x_n + b + sum_i z_in d_i. W_skip enters the
objective only through the squared error, so with codes, atoms and bias fixed its gradient is
-2 (1/N) sum_n w_n r_n x_n^T, and stationarity asks

    G = (1/N) sum_n w_n r_n x_n^T = 0        (d_out x d_in).

The condition is lam-free and first order. Certificate: W_skip <- W_skip + s U, U = G / ||G||_F.
Token n's residual becomes r_n - s U x_n, so the change of sum_n loss_n is

    -2 s <sum_n w_n r_n x_n^T, U> + s^2 sum_n w_n ||U x_n||^2
  = -2 s N ||G||_F + s^2 tr(U S U^T),          S = sum_n w_n x_n x_n^T,

a quadratic in s: the exact line search is s = N ||G||_F / tr(U S U^T). Both sums are pass-1
statistics (`LayerStatistics.sum_rx`, `sum_xx`), so the audit change is exact without a second
look at the audit tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import TokenChanges
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class SkipCheck:
    gradient: Tensor  # (d_out, d_in) G = (1/N) sum_n w_n r_n x_n^T
    norm: float  # ||G||_F
    size: float  # ||sum_n w_n r_n x_n^T||_F / sum_n w_n ||r_n|| ||x_n||, in [0, 1]


def c7_skip(stats: LayerStatistics) -> SkipCheck:
    """C7: the residual-input correlation of a skip transcoder must vanish."""
    if stats.sum_rx is None:
        raise ValueError("C7 needs the skip statistics: give the LayerAudit skip=W_skip and the inputs x_n")
    n = max(stats.n_tokens, 1)
    gradient = stats.sum_rx / n
    norm = float(torch.linalg.matrix_norm(gradient))
    scale = stats.sum_rnorm_xnorm / n
    return SkipCheck(gradient=gradient, norm=norm, size=norm / scale if scale > 0 else 0.0)


@dataclass
class SkipCertificate:
    """C7: W_skip <- W_skip + s U with U the unit (Frobenius) direction of sum_n w_n r_n x_n^T."""

    direction: Tensor  # (d_out, d_in), ||U||_F = 1
    condition = "C7"

    def __post_init__(self) -> None:
        self.step = torch.zeros(1, dtype=torch.float64, device=self.direction.device)

    def __len__(self) -> int:
        return 1

    def _sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor]:
        """(<sum w r x^T, U>, tr(U S U^T)), each as a (1,) float64 tensor."""
        u = self.direction.double()
        along = (stats.sum_rx.to(u.device) * u).sum()[None]
        curvature = ((u @ stats.sum_xx.to(u.device)) * u).sum()[None]
        return along, curvature

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        along, curvature = self._sums(stats)
        return (along / curvature.clamp(min=1e-300)).clamp(min=0)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        along, curvature = self._sums(stats)
        first = -2 * step * along
        return first + curvature * step**2, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        if tokens.inputs is None:
            raise ValueError("the C7 certificate needs each token's transcoder input x_n (TokenBatch inputs=)")
        s = float(self.step[0])
        moved = tokens.inputs.to(tokens.r.dtype) @ self.direction.to(tokens.r.dtype).T  # (n, d_out) U x_n
        along = (tokens.wr * moved).sum(-1).double()
        curvature = tokens.w() * (moved.double() ** 2).sum(-1)
        return TokenChanges.per_token((-2 * s * along + s * s * curvature)[:, None])

    def skip_change(self) -> Tensor:
        """(d_out, d_in) the change s U of W_skip that this certificate makes."""
        return float(self.step[0]) * self.direction.double()
