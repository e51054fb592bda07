"""Twin worlds: one activation distribution, several ground truths (docs/VALIDATION.md, section S).

A label-free statistic sees an SAE and its activations, never the features behind them. Two
worlds whose activations are the same tensor, token by token, therefore get the same map, the same
rows and the same absorption score from any such statistic, whatever their truths say. The two
families here are the smallest such constructions for the two things asked of an absorption
map, finding absorbed hierarchies and naming their parent the right way round, without writing
rows where there is none (docs/THEORY.md, section 6, "What no label-free map can know"):

- `absorbed_or_exclusive`: "absorbed hierarchy" against "two features that never fire together".
  Parent p with child c that fires only with p, on a third of its tokens, at the parent's size
  (children scaled by their parent): x = m p alone, x = m (p + c) with the child. The same x is
  two mutually exclusive features p and q = (p + c) / sqrt(2) with no hierarchy. The SAE with atoms [p, q] codes x
  exactly: in the first world it absorbed a hierarchy (its p latent off on every child token); in
  the second it is the perfect SAE. A map that finds the absorption in one puts a row into a world
  with no hierarchy at all.
- `parent_mirror_or_siblings`: orientation and parent-or-sibling. A root r that never fires alone,
  with two mutually exclusive children (x = m (r + 2 c1) or m (r + 2 c2)). The same x is a parent
  u = r + 2 c1 with a child v = 2 (c2 - c1), and its mirror, parent r + 2 c2 with child
  2 (c1 - c2). The SAE with atoms normalise(r + 2 c1), normalise(r + 2 c2) codes x exactly; the
  row between its two latents is right in one orientation in the second world, in the other in
  the third, and wrong both ways in the first (siblings; their parent has no latent).

What breaks each tie is an assumption on the features (the second worlds' features are not
orthogonal: q leans 0.71 on p, v -0.63 on u), so a label-free map is exact only on worlds whose
features it may assume near-orthogonal, and is judged there (docs/VALIDATION.md, section Q).

Every world also carries independent filler features on their own directions, so that an audit of
the twins' activations sees more than the structure in question. Pure tensor code, float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

N_FILLERS = 8  # independent features on their own directions, in every world of a family
FILLER_RATE = 0.1
STRUCTURE_RATE = 0.4  # the tokens on which the family's structure fires
MAGNITUDE_STD = 0.15  # firing sizes ~ 1 + 0.15 N(0, 1), clamped positive


@dataclass(frozen=True)
class Truth:
    """One ground truth of a family: unit feature atoms (F, d), activations (n, F) >= 0 with
    acts @ atoms = the family's x, and its direct hierarchy edges (parent, child) over features."""

    name: str
    atoms: Tensor
    acts: Tensor
    edges: list[tuple[int, int]]

    def x(self) -> Tensor:
        return self.acts @ self.atoms


@dataclass(frozen=True)
class Twins:
    """A family: its activations x (n, d), the SAE that codes them exactly (unit atoms (K, d),
    codes (n, K), x = codes @ atoms), and the truths that all generate x."""

    x: Tensor
    sae_atoms: Tensor
    codes: Tensor
    truths: list[Truth]


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def _basis_and_sizes(n: int, d: int, seed: int, second_share: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An orthonormal basis (d, d), each token's size m (n,), which tokens carry the structure
    and which of its two cases (the second on `second_share` of them), and the fillers'
    activations (n, N_FILLERS)."""
    if d < 3 + N_FILLERS:
        raise ValueError(f"twin worlds need d >= {3 + N_FILLERS}, got {d}")
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].T
    sizes = (1 + MAGNITUDE_STD * torch.randn(n, N_FILLERS + 1, generator=gen, dtype=torch.float64)).clamp(min=0.1)
    on = torch.rand(n, generator=gen, dtype=torch.float64) < STRUCTURE_RATE
    case = torch.rand(n, generator=gen, dtype=torch.float64) < second_share
    fillers = sizes[:, 1:] * (torch.rand(n, N_FILLERS, generator=gen, dtype=torch.float64) < FILLER_RATE)
    return basis, sizes[:, 0] * on, case, fillers


def _filler_atoms(basis: Tensor) -> Tensor:
    """(N_FILLERS, d): the basis directions after the three the structures use."""
    return basis[3:3 + N_FILLERS]


def _with_fillers(name: str, atoms: list[Tensor], acts: list[Tensor], edges: list[tuple[int, int]],
                  basis: Tensor, fillers: Tensor) -> Truth:
    return Truth(name, torch.cat([torch.stack(atoms), _filler_atoms(basis)]),
                 torch.cat([torch.stack(acts, dim=1), fillers], dim=1), edges)


def absorbed_or_exclusive(n: int = 8000, d: int = 16, seed: int = 0) -> Twins:
    """Hierarchy p -> c (the child on a third of the parent's tokens, at the parent's size) against
    two mutually exclusive features p and normalise(p + c). Features 0, 1 are the pair's. A third,
    not a half: the parent latent then fires on more tokens than the child's, as the map asks of a
    parent it names (`parent_covers_child`), so the tie is the one between the truths alone."""
    basis, m, child, fillers = _basis_and_sizes(n, d, seed, second_share=1 / 3)
    p, c = basis[0], basis[1]
    alone, with_child = m * ~child, m * child
    hierarchy = _with_fillers("absorbed hierarchy", [p, c], [m, with_child], [(0, 1)], basis, fillers)
    q = _unit(p + c)
    exclusive = _with_fillers("two exclusive features", [p, q], [alone, math.sqrt(2) * with_child], [],
                              basis, fillers)
    # the SAE: atoms [p, q, fillers], its codes those of the exclusive world (exact)
    return Twins(exclusive.x(), exclusive.atoms.clone(), exclusive.acts.clone(), [hierarchy, exclusive])


def parent_mirror_or_siblings(n: int = 8000, d: int = 16, seed: int = 0) -> Twins:
    """Root r never alone with mutually exclusive children c1, c2 (x = m (r + 2 c_k)) against a
    parent r + 2 c1 with child 2 (c2 - c1), and against its mirror. The SAE: normalise(r + 2 c1),
    normalise(r + 2 c2) (latents 0 and 1), then the fillers."""
    basis, m, second, fillers = _basis_and_sizes(n, d, seed)
    r, c1, c2 = basis[0], basis[1], basis[2]
    first_size, second_size = m * ~second, m * second
    siblings = _with_fillers("siblings under a root without a latent", [r, c1, c2], [m, 2 * first_size, 2 * second_size],
                             [(0, 1), (0, 2)], basis, fillers)
    truths = [siblings]
    for name, own, other, other_size in (("parent r + 2 c1, child 2 (c2 - c1)", c1, c2, second_size),
                                         ("parent r + 2 c2, child 2 (c1 - c2)", c2, c1, first_size)):
        parent, child = r + 2 * own, 2 * (other - own)
        # the parent fires on every structure token at size m; its child on the other case's tokens
        truths.append(_with_fillers(name, [_unit(parent), _unit(child)],
                                    [m * parent.norm(), other_size * child.norm()], [(0, 1)], basis, fillers))
    atoms = torch.cat([torch.stack([_unit(r + 2 * c1), _unit(r + 2 * c2)]), _filler_atoms(basis)])
    codes = torch.cat([torch.stack([first_size, second_size], dim=1) * math.sqrt(5), fillers], dim=1)
    return Twins(codes @ atoms, atoms, codes, truths)
