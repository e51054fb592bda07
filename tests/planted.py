"""Planted dictionary-learning problems shared by the theory tests (float64, seeded)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.reference import codes_and_bias


@dataclass
class Planted:
    x: Tensor  # (N, d)
    atoms: Tensor  # (K, d) ground truth, unit rows
    lam: float


def planted_hierarchy(n: int = 4000, d: int = 16, k: int = 6, lam: float = 0.2, seed: int = 0) -> Planted:
    """Feature 0 is a parent ("dog"), feature 1 its child ("labrador"): the child only ever
    fires with the parent. Features 2.. fire independently. An offset makes the bias matter."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    atoms = torch.randn(k, d, generator=gen, dtype=dt)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    amp = torch.zeros(n, k, dtype=dt)
    parent = torch.rand(n, generator=gen) < 0.2
    child = parent & (torch.rand(n, generator=gen) < 0.5)
    amp[parent, 0] = 1 + 0.2 * torch.rand(int(parent.sum()), generator=gen, dtype=dt)
    amp[child, 1] = 1 + 0.2 * torch.rand(int(child.sum()), generator=gen, dtype=dt)
    for f in range(2, k):
        on = torch.rand(n, generator=gen) < 0.15
        amp[on, f] = 1 + 0.2 * torch.rand(int(on.sum()), generator=gen, dtype=dt)
    return Planted(x=amp @ atoms + 0.3, atoms=atoms, lam=lam)


def optimal_codes_and_bias(x: Tensor, atoms: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Exact codes and the exact bias for a fixed dictionary."""
    return codes_and_bias(x, atoms, lam)
