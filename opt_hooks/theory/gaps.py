"""The decoder gap of THEORY.md section 5: how far the dictionary is from stationary for its own
codes, measured by one step of every atom at once (the code gap is `lasso.py`, the bias gap C5's
certificate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import Perturbed, TokenChanges, held_out_constant, once
from opt_hooks.theory.codes import CSR, csr_matrix
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


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
        return once(self, stats, lambda: self._compute_sums(stats))

    def _compute_sums(self, stats: LayerStatistics) -> tuple[float, float, Tensor, Tensor]:
        along = float(torch.dot(stats.sum_z_r.to(self.gradient.device).flatten(), self.gradient.flatten()))
        curvature = _csr_product_norm2(stats.codes, self.gradient, self.chunk_rows) if stats.codes is not None else 0.0
        return along, curvature, stats.sum_z.to(self.gradient.device), torch.linalg.vecdot(self.gradient, self.gradient)

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
        gradient = held_out_constant(self, "gradient", tokens.r, lambda: self.gradient.to(tokens.r))
        g2 = held_out_constant(self, "g2", self.gradient, lambda: torch.linalg.vecdot(self.gradient, self.gradient))
        moved = entries.matrix(tokens.r.dtype) @ gradient  # (n, d) G^T z_n
        growth = torch.sqrt(1 + t * t * g2) - 1
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


def _csr_product_norm2(codes: CSR, matrix: Tensor, chunk_rows: int) -> float:
    """sum_n w_n ||matrix^T z_n||^2 over the rows of a CSR (w_n its row weights, else 1), a block
    of rows at a time."""
    codes = codes.to(matrix.device)
    total = 0.0
    for start in range(0, codes.n_tokens, chunk_rows):
        stop = min(start + chunk_rows, codes.n_tokens)
        lo, hi = int(codes.crow[start]), int(codes.crow[stop])
        block = csr_matrix(codes.crow[start:stop + 1] - lo, codes.col[lo:hi].long(), codes.val[lo:hi].to(matrix.dtype),
                           (stop - start, codes.n_features))
        squared = ((block @ matrix).double() ** 2).sum(-1)
        total += float((squared if codes.weight is None else codes.weight[start:stop] * squared).sum())
    return total
