"""Exact nonnegative-lasso codes for a fixed dictionary: the code gap of THEORY.md section 5.

    z*_n = argmin_{z >= 0} ||x_n - b - z D||^2 + lam sum_i z_i

solved by FISTA warm-started from the SAE's own codes. Iterations run in float32 (float64 for
float64 inputs), costing two (n, K) x (K, d) products each; losses are compared in float64, and
each token keeps the better of the SAE's codes and the solver's, so the measured gap is never
more than the true one: an under-converged solve understates the gap, never inflates it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.objective import token_losses


@dataclass
class LassoSolve:
    z: Tensor  # (n, K) float64: the better of the start and the solver's codes, per token
    iterations: int
    converged: bool  # the objective moved less than `tol` (relative) over the last check


def exact_codes(x: Tensor, atoms: Tensor, bias: Tensor, lam: float, start: Tensor, *,
                max_iter: int = 300, tol: float = 1e-7, check_every: int = 10) -> LassoSolve:
    """FISTA on every row of x (n, d) with unit atoms (K, d), from `start` (n, K) >= 0."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    d_atoms, target = atoms.to(dtype), (x - bias).to(dtype)
    lipschitz = 2 * float(torch.linalg.eigvalsh((d_atoms.T @ d_atoms).double()).max()) * (1 + 1e-6) + 1e-12
    z = start.to(dtype).clamp(min=0)
    y, t = z.clone(), 1.0
    previous = _objective(x, atoms, z, bias, lam)
    iterations, converged = 0, False
    for iterations in range(1, max_iter + 1):
        grad = -2 * (target - y @ d_atoms) @ d_atoms.T + lam
        z_next = (y - grad / lipschitz).clamp_(min=0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = z_next + ((t - 1) / t_next) * (z_next - z)
        z, t = z_next, t_next
        if iterations % check_every == 0:
            current = _objective(x, atoms, z, bias, lam)
            if abs(previous - current) <= tol * max(abs(current), 1e-30):
                converged = True
                break
            previous = current
    before = token_losses(x, atoms, start, bias, lam)
    after = token_losses(x, atoms, z, bias, lam)
    better = (after < before)[:, None]
    return LassoSolve(torch.where(better, z.double(), start.double()), iterations, converged)


def _objective(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor, lam: float) -> float:
    return float(token_losses(x, atoms, z, bias, lam).sum())
