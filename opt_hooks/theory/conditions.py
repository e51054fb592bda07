"""The optimality conditions C1-C6 of THEORY.md section 2, one function each.

Inputs are computed statistics (float64); outputs are margins, sizes and verdict masks.
Certificates for the violations live in `certificates.py`; the pair engine behind C2 in
`pairs.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.pairs import PairViolations, pair_violations
from opt_hooks.theory.stats import LayerStatistics


@dataclass
class FloorCheck:
    floor: Tensor  # (K,) m_i = min_n z_in (0 for a feature that is off somewhere)
    violated: Tensor  # (K,) bool, exact: m_i > 0


def c1_floor(stats: LayerStatistics) -> FloorCheck:
    """C1: every feature must be off somewhere. Exact zero test, no tolerance."""
    seen = stats.n_tokens > 0
    floor = torch.where(torch.isfinite(stats.min_z), stats.min_z, torch.zeros_like(stats.min_z))
    return FloorCheck(floor=floor, violated=(floor > 0) & seen)


def c2_pairs(stats: LayerStatistics, atoms: Tensor, *, rel_tol: float = 1e-6) -> PairViolations:
    """C2: for every ordered pair, (1 - rho_ij) mu_j must lie in [min, max] of z_j over A_i."""
    if stats.codes is None:
        raise ValueError("C2 needs the sparse codes: build LayerStats with keep_codes=True")
    return pair_violations(stats.codes, atoms, stats.mu, rel_tol=rel_tol)


@dataclass
class DecoderCheck:
    gradient: Tensor  # (K, d) g_i, the tangent gradient of atom i (codes fixed)
    norm: Tensor  # (K,) ||g_i||
    size: Tensor  # (K,) ||g_i|| / ((1/N) sum_n z_in ||r_n||), in [0, 1]


def c3_decoder(stats: LayerStatistics, atoms: Tensor) -> DecoderCheck:
    """C3: g_i = (1/N) sum_n z_in (r_n - <d_i, r_n> d_i) must vanish."""
    n = max(stats.n_tokens, 1)
    atoms = atoms.double().to(stats.sum_z_r.device)
    mean_zr = stats.sum_z_r / n
    gradient = mean_zr - (mean_zr * atoms).sum(-1, keepdim=True) * atoms
    norm = gradient.norm(dim=-1)
    scale = stats.sum_z_rnorm / n
    size = torch.where(scale > 0, norm / torch.where(scale > 0, scale, 1.0), torch.zeros_like(norm))
    return DecoderCheck(gradient=gradient, norm=norm, size=size)


@dataclass
class CodeCheck:
    gain: Tensor  # (K,) G4_i
    size: Tensor  # (K,) G4_i / (lam * active share): mean |2<d_i, r_n>/lam - 1| per active token


def c4_codes(gain_active: Tensor, gain_inactive: Tensor, active_count: Tensor, n_tokens: int, lam: float) -> CodeCheck:
    """C4: active atoms must see exactly lam/2 of residual, inactive ones at most lam/2.

    G4_i = (1/N)[sum_{z_in>0} |2<d_i,r_n> - lam| + sum_{z_in=0} max(0, 2<d_i,r_n> - lam)].
    """
    check_lam(lam)
    n = max(n_tokens, 1)
    gain = (gain_active + gain_inactive) / n
    share = active_count.clamp(min=1).double() / n
    return CodeCheck(gain=gain, size=gain / (lam * share))


def check_lam(lam: float) -> None:
    """The conditions are statements about the L1 objective with lam > 0: at lam = 0 the
    reconstruction-preserving directions of C1 and C2 change nothing and C4 / C6 have no scale."""
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")


def estimate_lam(active_projections: Tensor) -> float:
    """lam_hat = 2 * median of <d_i, r_n> over active (n, i) (THEORY.md C4)."""
    if active_projections.numel() == 0:
        raise ValueError("cannot estimate lam: no feature was active on any audit token; pass lam=")
    estimate = 2 * float(active_projections.double().median())
    if not estimate > 0:
        # Active atoms of an L1 optimum see +lam/2 of residual; a median at or below 0 means the
        # codes are not shrunk L1 codes at all, and no lam describes them.
        raise ValueError(
            f"cannot estimate lam: 2 * median <d_i, r_n> over active codes is {estimate:.3g}, not "
            "positive (the SAE does not look L1-trained on these tokens); pass lam="
        )
    return estimate


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
class SpareCheck:
    dead: Tensor  # (K,) bool: off on every audit token
    max_rnorm: float
    threshold: float  # lam / 2
    margin: float  # max ||r_n|| - lam / 2
    violated: bool  # a dead feature exists and some residual is longer than lam / 2


def c6_spare(stats: LayerStatistics, lam: float, *, rel_tol: float = 1e-6) -> SpareCheck:
    """C6: while any feature is dead, every residual norm must be at most lam / 2."""
    check_lam(lam)
    dead = stats.dead
    max_rnorm = float(stats.worst_rnorm[0]) if stats.worst_rnorm.numel() else 0.0
    threshold = lam / 2
    margin = max_rnorm - threshold
    violated = bool(dead.any()) and margin > rel_tol * max(threshold, 1e-30)
    return SpareCheck(dead=dead, max_rnorm=max_rnorm, threshold=threshold, margin=margin, violated=violated)
