"""C3, decoder stationarity (THEORY.md section 2): with codes fixed, every atom's tangent gradient
g_i = (1/N) sum_n z_in w_n (r_n - <d_i, r_n> d_i) must vanish; its certificate turns the atom.

A signed SAE's doubled dictionary (THEORY.md section 9, theory/signed.py) has one decoder row per pair
(d_i, -d_i): its check and certificates are tied, one per latent, with the signed code's gradient
(the positive atom's sum minus the negative atom's) and the tokens of both signs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import FeatureFamily, Perturbed, TokenChanges, held_out_constant, per_entry, slots_of
from opt_hooks.theory.products import sampled_dots
from opt_hooks.theory.signed import tied
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class DecoderCheck:
    gradient: Tensor  # (K, d) g_i, the tangent gradient of atom i (codes fixed)
    norm: Tensor  # (K,) ||g_i||
    size: Tensor  # (K,) ||g_i|| / ((1/N) sum_n z_in ||r_n||), in [0, 1]


def c3_decoder(stats: LayerStatistics, atoms: Tensor, *, signed: bool = False) -> DecoderCheck:
    """C3: g_i = (1/N) sum_n z_in (r_n - <d_i, r_n> d_i) must vanish. `signed`: the atoms are a signed
    SAE's doubled dictionary [d; -d]; the check is per latent (K rows), with the signed codes."""
    n = max(stats.n_tokens, 1)
    atoms = atoms.double().to(stats.sum_z_r.device)
    sum_zr, sum_zr_norm = stats.sum_z_r, stats.sum_z_rnorm
    if signed:  # -d_i has d_i's tangent space: the tied gradient is the difference of the two sums
        sum_zr, sum_zr_norm, atoms = tied(sum_zr, -1), tied(sum_zr_norm, 1), atoms[: atoms.shape[0] // 2]
    gradient = sum_zr / n  # (K, d): in place from here, each (K, d) temporary cost a pass and its pages
    gradient.addcmul_(atoms, torch.linalg.vecdot(gradient, atoms)[:, None], value=-1.0)
    norm = torch.linalg.vector_norm(gradient, dim=-1)
    scale = sum_zr_norm / n
    size = torch.where(scale > 0, norm / torch.where(scale > 0, scale, 1.0), torch.zeros_like(norm))
    return DecoderCheck(gradient=gradient, norm=norm, size=size)


@dataclass
class DecoderCertificates(FeatureFamily):
    """C3: rotate d_i by the angle theta_i towards its tangent gradient u_i = g_i / ||g_i||,
    codes fixed: d_i <- cos(theta) d_i + sin(theta) u_i.

    With codes fixed the change is a function of sums: with A = sum_n z_in w_n <r_n, d_i>,
    B = sum_n z_in w_n <r_n, u_i> and S = sum_n w_n z_in^2 it is 2 (A + S)(1 - cos theta) - 2 B sin theta,
    whose exact minimiser is theta = atan2(B, A + S) (bounded to [0, pi/2]).

    `partner` (F,): tied certificates of a signed SAE's doubled dictionary, the atom -d_i of each
    feature's negative sign, which turns with it (-d_i <- cos(theta) (-d_i) + sin(theta) (-u_i)): its
    tokens enter A, B and S with their codes, its direction reversed (B = <sum z w r of d_i's tokens
    minus of -d_i's, u_i>)."""

    atom: Tensor  # (F, d) d_i
    direction: Tensor  # (F, d) unit, orthogonal to d_i
    partner: Tensor | None = None  # (F,) the atom -d_i of a tied pair, None for an unsigned SAE
    condition = "C3"

    def _compute_sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features.to(stats.sum_z_r.device)
        zr, z2 = stats.sum_z_r[features], stats.sum_z2[features]
        if self.partner is not None:
            partner = self.partner.to(features.device)
            zr, z2 = zr - stats.sum_z_r[partner], z2 + stats.sum_z2[partner]
        zr = zr.to(self.atom.device)
        along = (torch.linalg.vecdot(zr, self.atom.double()), torch.linalg.vecdot(zr, self.direction.double()))
        return *along, z2.to(zr.device)

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        along_atom, along_direction, z2 = self._sums(stats)
        curvature = along_atom + z2
        theta = torch.where(curvature > 0, torch.atan2(along_direction, curvature), math.pi / 2)
        return theta.clamp(0, math.pi / 2)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        along_atom, along_direction, z2 = self._sums(stats)
        theta = step.double()
        change = 2 * (along_atom + z2) * (1 - torch.cos(theta)) - 2 * along_direction * torch.sin(theta)
        return change, -2 * along_direction * theta

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        entries = tokens.entries
        n_features = tokens.atoms.shape[0]
        slots = slots_of(self.features, entries.cols, n_features)
        sign = None
        if self.partner is not None:  # the negative sign's entries: the same certificate, turning -d_i
            partner_slots = slots_of(self.partner, entries.cols, n_features)
            sign = torch.where(partner_slots >= 0, -1.0, 1.0).double()
            slots = torch.maximum(slots, partner_slots)
        mine = slots >= 0
        # <u_i, w_n r_n> at the family's entries only, from its (F, d) directions: no (K, d) copy
        direction = held_out_constant(self, "direction", tokens.atoms, lambda: self.direction.to(tokens.atoms))
        along_direction = torch.zeros(len(slots), dtype=torch.float64, device=slots.device)
        along_direction[mine] = sampled_dots(tokens.wr, direction, entries.rows[mine], slots[mine])
        if sign is not None:
            along_direction = along_direction * sign
        theta = per_entry(self.step, slots)
        z, along_atom = entries.values.double(), tokens.projections.double()
        change = -2 * z * ((torch.cos(theta) - 1) * along_atom + torch.sin(theta) * along_direction)
        change = change + tokens.w(entries.rows) * z**2 * (2 - 2 * torch.cos(theta))
        return TokenChanges.per_feature(entries, slots, len(self), change)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        i, theta = int(self.features[k]), float(self.step[k])
        atoms2 = atoms.clone()
        atoms2[i] = math.cos(theta) * atoms[i] + math.sin(theta) * self.direction[k].to(atoms.dtype)
        if self.partner is not None:
            atoms2[int(self.partner[k])] = -atoms2[i]
        return atoms2, z, bias
