"""The dictionary-learning objective of THEORY.md section 1, in float64 where it is compared.

    L(D, Z, b) = (1/N) sum_n [ w_n ||x_n - b - sum_i z_in d_i||^2 + lam * sum_i z_in ]

w_n is a token's weight: 1, except for SAEs that normalise each token at run time (sae_lens
"layer_norm", "constant_norm_rescale"), whose training error is the de-normalised one.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def normalise_atoms(decoder: Tensor) -> tuple[Tensor, Tensor]:
    """Split decoder rows into unit atoms and their norms; zero rows stay zero atoms."""
    norms = decoder.norm(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return decoder / safe[:, None], norms


# Largest input magnitude whose squares, summed over millions of terms, stay far from overflow
# in float32 (max 3.4e38) and float64 (max 1.8e308).
FLOAT32_SAFE_MAGNITUDE = 1e12
FLOAT64_SAFE_MAGNITUDE = 1e100


def compute_dtype(x: Tensor, z: Tensor, bias: Tensor) -> torch.dtype:
    """dtype of a batch's products: float32, or float64 when the input is float64 or so large
    that squared norms would overflow float32. Inputs too large even for float64 are refused."""
    magnitude = max((float(t.abs().amax()) for t in (x, z, bias) if t.numel()), default=0.0)
    if magnitude > FLOAT64_SAFE_MAGNITUDE:
        raise ValueError(
            f"activations, codes or bias of magnitude {magnitude:.3g} overflow the statistics even in "
            "float64; rescale them"
        )
    if x.dtype == torch.float64 or magnitude > FLOAT32_SAFE_MAGNITUDE:
        return torch.float64
    return torch.float32


def residuals(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor) -> Tensor:
    """r_n = x_n - b - sum_i z_in d_i, in the dtype of the inputs."""
    return x - bias - z @ atoms


def token_losses(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor, lam: float, weight: Tensor | None = None) -> Tensor:
    """Per-token objective w_n ||r_n||^2 + lam * sum_i z_in, in float64 (w_n = 1 without `weight`)."""
    x, atoms, z, bias = (t.double() for t in (x, atoms, z, bias))
    r = x - bias - torch.sparse.mm(z.to_sparse(), atoms)  # codes are sparse: nnz x d, not n x K x d
    squared = (r * r).sum(-1)
    return (squared if weight is None else weight.double() * squared) + lam * z.sum(-1)


def objective(x: Tensor, atoms: Tensor, z: Tensor, bias: Tensor, lam: float, weight: Tensor | None = None) -> float:
    """L(D, Z, b): the mean of `token_losses` over tokens, as a Python float."""
    return token_losses(x, atoms, z, bias, lam, weight).mean().item()


def check_lam(lam: float) -> None:
    """The conditions are statements about the L1 objective with lam > 0: at lam = 0 the
    reconstruction-preserving directions of C1 and C2 change nothing and C4 / C6 have no scale."""
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
