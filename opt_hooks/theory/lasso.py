"""Exact nonnegative-lasso codes for a fixed dictionary: the code gap of THEORY.md section 5.

    z*_n = argmin_{z >= 0} w_n ||x_n - b - z D||^2 + lam sum_i z_i

(w_n = 1 unless the tokens are weighted, THEORY.md section 1). Token n's problem is the
unweighted one with lam_n = lam / w_n, which is what the solver runs on.

Each token's problem is solved on its own working set, an active-set method that never forms
an (n, K) iterate: the working set W_n holds the features coded on the token and the `extra`
most violating others (largest 2 <d_i, r_n> - lam > 0). FISTA runs on the small Gram matrices
D_W D_W^T of all tokens at once; then one full product D r checks the optimality conditions of
every feature (2 <d_i, r*_n> <= lam where z*_in = 0), and tokens with violators outside their
working set are solved again with those added, for at most `rounds` rounds. Losses are compared
in float64, and each token keeps the better of the SAE's codes and the solver's, so the gap
measured is never more than the true one: an unconverged solve understates it.

Cost per round: one (n, K) x (K, d) product for the check, n m^2 d for the Gram matrices (m the
working-set size) and m^2 per token and FISTA step, all in the inputs' precision (float32 for
float32 SAEs); every loss that is reported is computed in float64.
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
    loss_before: Tensor  # (n,) float64: each token's loss with the start codes
    loss_after: Tensor  # (n,) float64: and with `z`
    iterations: int  # FISTA steps, summed over the rounds
    converged: bool  # every token met the optimality conditions (to `tol`) in the last round
    working_set: int  # its size per token, in the last round


def exact_codes(x: Tensor, atoms: Tensor, bias: Tensor, lam: float, start: Tensor, *, max_iter: int = 300,
                tol: float = 1e-7, rounds: int = 2, extra: int = 32, chunk: int = 4096,
                weight: Tensor | None = None) -> LassoSolve:
    """The nonnegative-lasso codes of every row of x (n, d) for unit atoms (K, d), from `start`;
    `weight` (n,) the tokens' weights w_n (None: 1)."""
    # the screen (one (n, K) product per round) and the solve run in the inputs' precision
    screen = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, atoms, bias, start = x.double(), atoms.double(), bias.double(), start.double().clamp(min=0)
    target = x - bias
    screen_atoms, screen_tol = atoms.to(screen), max(tol, 1e-5 if screen == torch.float32 else 0.0)
    # (n, 1) each token's own lam_n = lam / w_n
    token_lam = torch.full((len(x), 1), float(lam), dtype=torch.float64, device=x.device)
    if weight is not None:
        token_lam = token_lam / weight.double()[:, None]
    must = start > 0
    # working sets of one fixed width: the SAE's largest L0 (at most twice its mean) plus `extra`,
    # so time and memory stay bounded; a token whose lasso support would need more is solved on its
    # best `width` features, which understates its gap and leaves `converged` False
    l0 = must.sum(1).double()
    width = min(atoms.shape[0], extra + (min(int(l0.max()), 2 * math.ceil(float(l0.mean()))) if len(x) else 0))
    z = start.clone()
    iterations, converged = 0, False
    for _ in range(rounds):
        excess = _excess(target, atoms, screen_atoms, z, token_lam, chunk)  # 2 <d_i, r_n> - lam_n for every (n, i)
        violated = (excess > screen_tol * token_lam.clamp(min=1e-30).to(screen)) & (z == 0)
        if not bool(violated.any()) and iterations:
            converged = True
            break
        # the current support first, then the most violating others, then the SAE's own support
        score = torch.where(z > 0, math.inf, torch.where(violated, excess, torch.where(must, -1e30, -math.inf)))
        working = torch.topk(score, width, dim=1).indices  # (n, m)
        solved, steps = _fista_on_working_sets(target, screen_atoms, token_lam, z, working, max_iter, tol)
        z = torch.zeros_like(z).scatter_(1, working, solved)
        iterations += steps
    else:
        excess = _excess(target, atoms, screen_atoms, z, token_lam, chunk)
        converged = not bool(((excess > screen_tol * token_lam.clamp(min=1e-30).to(screen)) & (z == 0)).any())
    before = token_losses(x, atoms, start, bias, lam, weight)
    after = token_losses(x, atoms, z, bias, lam, weight)
    better = after < before
    return LassoSolve(torch.where(better[:, None], z, start), before, torch.where(better, after, before),
                      iterations, converged, width)


def _excess(target: Tensor, atoms: Tensor, screen_atoms: Tensor, z: Tensor, lam: Tensor, chunk: int) -> Tensor:
    """(n, K) 2 <d_i, r_n> - lam_n (lam (n, 1)) in the screen's precision, the residual in float64
    (`atoms`), a block of tokens at a time."""
    out = torch.empty(z.shape, dtype=screen_atoms.dtype, device=z.device)
    for start in range(0, len(z), chunk):
        rows = slice(start, start + chunk)
        residual = (target[rows] - torch.sparse.mm(z[rows].to_sparse(), atoms)).to(screen_atoms.dtype)
        out[rows] = 2 * residual @ screen_atoms.T - lam[rows].to(screen_atoms.dtype)
    return out


def _fista_on_working_sets(target: Tensor, atoms: Tensor, lam: Tensor, z: Tensor, working: Tensor, max_iter: int,
                           tol: float) -> tuple[Tensor, int]:
    """FISTA on every token's working set at once: min over z_W >= 0 of ||t - z_W D_W||^2 + lam_n sum z_W
    (lam (n, 1), each token's own)."""
    n, m = working.shape
    dtype = atoms.dtype
    lam = lam.to(dtype)
    gram = torch.empty(n, m, m, dtype=dtype, device=target.device)
    correlation = torch.empty(n, m, dtype=dtype, device=target.device)  # <d_i, t_n> on the working set
    for start in range(0, n, 64):  # (64, m, d) gathered atoms at a time
        rows = slice(start, start + 64)
        d_w = atoms[working[rows]]
        gram[rows] = d_w @ d_w.transpose(1, 2)
        correlation[rows] = (d_w @ target[rows, :, None].to(dtype)).squeeze(-1)
    lipschitz = 2 * _largest_eigenvalue(gram)[:, None]  # (n, 1), an estimate: guarded below
    tol = max(tol, 10 * torch.finfo(dtype).eps)  # a relative change below rounding is no signal
    current = z.gather(1, working).to(dtype)
    momentum, t = current.clone(), 1.0

    def objective(codes: Tensor) -> Tensor:  # per token, up to the constant ||t_n||^2
        quadratic = ((codes[:, None, :] @ gram).squeeze(1) * codes).sum(1)
        return -2 * (codes * correlation).sum(1) + quadratic + lam[:, 0] * codes.sum(1)

    previous, best = objective(current), current.clone()
    steps = 0
    for steps in range(1, max_iter + 1):
        grad = -2 * correlation + 2 * (momentum[:, None, :] @ gram).squeeze(1) + lam
        following = (momentum - grad / lipschitz).clamp_(min=0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum = following + ((t - 1) / t_next) * (following - current)
        current, t = following, t_next
        if steps % 10 == 0:
            value = objective(current)
            # A token whose objective rose had too short a step (the power estimate of its largest
            # eigenvalue fell short): double its Lipschitz constant and restart its momentum.
            rose = value > previous
            if bool(rose.any()):
                lipschitz = torch.where(rose[:, None], 2 * lipschitz, lipschitz)
                current = torch.where(rose[:, None], best, current)
                momentum = torch.where(rose[:, None], best, momentum)
                value = torch.where(rose, previous, value)
            elif abs(float((previous - value).sum())) <= tol * max(abs(float(value.sum())), 1e-30):
                break  # the sample's objective, summed over its tokens, has stopped moving
            best, previous = current.clone(), value
    return current.double(), steps


def _largest_eigenvalue(gram: Tensor, steps: int = 10) -> Tensor:
    """(n,) the largest eigenvalue of each symmetric PSD matrix, by power iteration from the all-ones
    vector (a Gram matrix of unit atoms has its largest eigenvector far from orthogonal to it), with
    a 10% margin; batched matrix-vector products, no eigendecomposition."""
    vector = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)
    for _ in range(steps):
        vector = (gram @ vector[:, :, None]).squeeze(-1)
        vector = vector / vector.norm(dim=1, keepdim=True).clamp(min=1e-30)
    rayleigh = ((gram @ vector[:, :, None]).squeeze(-1) * vector).sum(1)
    return 1.1 * rayleigh.clamp(min=1.0) + 1e-12
