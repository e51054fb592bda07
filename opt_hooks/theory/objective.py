"""The dictionary-learning objective of THEORY.md section 1, in float64 where it is compared.

    L(D, Z, b) = (1/N) sum_n [ ||x_n - b - sum_i z_in d_i||^2 + lam * sum_i z_in ]
"""
from __future__ import annotations

import torch
from torch import Tensor


def normalise_atoms(decoder: Tensor) -> tuple[Tensor, Tensor]:
    """Split decoder rows into unit atoms and their norms; zero rows stay zero atoms."""
    norms = decoder.norm(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return decoder / safe[:, None], norms


def residuals(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor) -> Tensor:
    """r_n = x_n - b - sum_i z_in d_i, in the dtype of the inputs."""
    return x - bias - z @ atoms


def token_losses(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor, lam: float) -> Tensor:
    """Per-token objective ||r_n||^2 + lam * sum_i z_in, in float64."""
    x, atoms, z, bias = (t.double() for t in (x, atoms, z, bias))
    r = residuals(x, atoms, z, bias)
    return (r * r).sum(-1) + lam * z.sum(-1)


def objective(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor, lam: float) -> float:
    """L(D, Z, b): the mean of `token_losses` over tokens, as a Python float."""
    return token_losses(x, atoms, z, bias, lam).mean().item()
