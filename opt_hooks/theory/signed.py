"""Signed codes (THEORY.md section 9): an SAE whose codes take either sign (sae_lens' AbsTopK) is the
nonnegative problem of section 1 on the doubled dictionary.

A code z_in < 0 on atom d_i is the nonnegative code -z_in on the atom -d_i. With K latents the
doubled dictionary holds 2K atoms in a fixed layout,

    atoms  [d_1, ..., d_K, -d_1, ..., -d_K]           (2K, d)
    codes  [relu(z_1), ..., relu(z_K), relu(-z_1), ..., relu(-z_K)]     (n, 2K)

so atom a < K is latent a's positive sign and atom K + a its negative sign (its *partner*). A token
uses at most one atom of a pair, and the reconstruction, the residual and sum |z| are the SAE's own.

The two atoms of a pair are one decoder row: a change that moves d_i moves -d_i with it (a *tied*
change), and its gain counts the tokens of both signs. For the atom gradients this means the tied
gradient of latent i is the positive atom's sum minus the negative atom's (`tied(..., -1)`), which is
(1/N) sum_n z_in w_n (r_n - <d_i, r_n> d_i) with the signed code z_in; code sums of both signs add
(`tied(..., +1)`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def doubled_atoms(atoms: Tensor) -> Tensor:
    """(2K, d) [d; -d] from (K, d): the doubled dictionary, or a tied change of every row ([g; -g])."""
    return torch.cat([atoms, -atoms])


def doubled_codes(z: Tensor) -> Tensor:
    """(n, 2K) [relu(z), relu(-z)] from signed codes (n, K); exact zeros (never -0.0) where a sign is off."""
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.cat([torch.where(z > 0, z, zero), torch.where(z < 0, -z, zero)], dim=-1)


def partners(n_atoms: int, device: torch.device | str | None = None) -> Tensor:
    """(2K,) each doubled atom's partner: a + K for a < K, a - K above (partners[partners] = identity)."""
    half = n_atoms // 2
    return (torch.arange(n_atoms, device=device) + half) % n_atoms


def tied(per_atom: Tensor, sign: int) -> Tensor:
    """(K, ...) per latent from (2K, ...) per doubled atom: the positive atom's value plus `sign` times
    the negative atom's (sign -1 for sums that carry the atom's direction, +1 for code sums)."""
    half = per_atom.shape[0] // 2
    return per_atom[:half] + sign * per_atom[half:]


def latent_and_sign(atom: int, n_latents: int) -> tuple[int, str]:
    """(latent index, "+" or "-") of doubled atom `atom`."""
    return (atom, "+") if atom < n_latents else (atom - n_latents, "-")
