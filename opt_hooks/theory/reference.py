"""A reference joint optimiser of L(D, Z, b): the ground truth of "a local optimum" in tests.

Codes: nonnegative lasso per token (FISTA, then an exact solve on each token's active set).
Bias: the exact minimiser mean(x - Z D). Dictionary: tangent-gradient steps on the unit
spheres. Meant for small problems in float64, not for real SAEs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from opt_hooks.theory.objective import residuals


def nonneg_lasso(
    x: Tensor, atoms: Tensor, bias: Tensor, lam: float, *, iters: int = 2000, polish: bool = True, start: Tensor | None = None
) -> Tensor:
    """argmin_{z >= 0} ||x - b - z D||^2 + lam sum z, for every row of x.

    `polish=False` skips the exact support solve (inner loops of `fit_dictionary`);
    `start` warm-starts FISTA."""
    target = x - bias
    gram = atoms @ atoms.T
    correlation = target @ atoms.T  # the gradient is then a K x K product per step, not K x d
    lipschitz = 2 * float(torch.linalg.matrix_norm(gram, 2)) + 1e-12
    z = torch.zeros(x.shape[0], atoms.shape[0], dtype=x.dtype, device=x.device) if start is None else start.clone()
    y, t = z.clone(), 1.0
    for _ in range(iters):
        grad = -2 * (correlation - y @ gram) + lam
        z_next = (y - grad / lipschitz).clamp(min=0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = z_next + (t - 1) / t_next * (z_next - z)
        z, t = z_next, t_next
    return _polish_on_support(target, atoms, z, lam) if polish else z


def _polish_on_support(target: Tensor, atoms: Tensor, z: Tensor, lam: float) -> Tensor:
    """Solve the stationarity equations D_S D_S^T z_S = D_S (x - b) - lam/2 exactly on each
    token's active set S, keeping FISTA's answer wherever the exact solution leaves z >= 0."""
    active = z > 0
    weights = 2 ** torch.arange(active.shape[1], device=z.device, dtype=torch.int64)
    patterns, group = torch.unique((active.long() * weights).sum(1), return_inverse=True)
    out = z.clone()
    for g in range(len(patterns)):  # one linear solve per distinct support, not per token
        rows = group == g
        support = active[rows][0]
        if not bool(support.any()):
            continue
        d_s = atoms[support]
        rhs = target[rows] @ d_s.T - lam / 2
        solved = torch.linalg.solve(d_s @ d_s.T, rhs.T).T
        ok = (solved > 0).all(1)
        block = out[rows]
        block[:, support] = torch.where(ok[:, None], solved, block[:, support])
        out[rows] = block
    return out


def fit_dictionary(
    x: Tensor,
    n_features: int,
    lam: float,
    *,
    init: Tensor | None = None,
    seed: int = 0,
    outer: int = 300,
    lasso_iters: int = 30,
    step: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Alternate exact codes, exact bias and a sphere-projected dictionary step; return
    (atoms, codes, bias) after a final exact code and bias solve."""
    gen = torch.Generator().manual_seed(seed)
    atoms = init.clone() if init is not None else torch.randn(n_features, x.shape[1], generator=gen, dtype=x.dtype)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    bias = x.mean(0)
    n = x.shape[0]
    z = None
    for _ in range(outer):
        z = nonneg_lasso(x, atoms, bias, lam, iters=lasso_iters, polish=False, start=z)
        bias = (x - z @ atoms).mean(0)
        grad = -2 * z.T @ residuals(x, atoms, z, bias) / n
        grad = grad - (grad * atoms).sum(1, keepdim=True) * atoms
        atoms = atoms - step * grad
        atoms = atoms / atoms.norm(dim=1, keepdim=True)
    z, bias = codes_and_bias(x, atoms, lam, bias=bias, start=z)
    return atoms, z, bias


def codes_and_bias(
    x: Tensor, atoms: Tensor, lam: float, *, bias: Tensor | None = None, start: Tensor | None = None, rounds: int = 30
) -> tuple[Tensor, Tensor]:
    """Optimal codes and the optimal bias for a fixed dictionary. They are coupled; warm-started
    alternations settle both to machine precision."""
    bias = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if bias is None else bias
    z = start
    for _ in range(rounds):
        z = nonneg_lasso(x, atoms, bias, lam, iters=200, polish=False, start=z)
        bias = (x - z @ atoms).mean(0)
    return nonneg_lasso(x, atoms, bias, lam, iters=1000, start=z), bias
