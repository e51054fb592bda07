"""C6, spare capacity (THEORY.md section 2): while any feature is dead, no token may have
w_n ||r_n|| > lam/2; its certificate resamples a dead feature towards the worst residuals.

For a signed SAE's doubled dictionary (THEORY.md section 9) an atom is free only when its latent is
dead in both signs (the pair is one decoder row): the check counts such latents, and the certificate
writes the new atom into the pair (a and -a) and replaces the codes of both signs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import Perturbed, TokenChanges
from opt_hooks.theory.objective import check_lam
from opt_hooks.theory.signed import tied
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class SpareCheck:
    dead: Tensor  # (K,) bool: off on every audit token (a signed SAE: its latents off in both signs)
    max_rnorm: float
    threshold: float  # lam / 2
    margin: float  # max ||r_n|| - lam / 2
    violated: bool  # a dead feature exists and some residual is longer than lam / 2


def c6_spare(stats: LayerStatistics, lam: float, *, rel_tol: float = 1e-6, signed: bool = False) -> SpareCheck:
    """C6: while any feature is dead, every residual norm must be at most lam / 2. `signed`: the
    atoms are a signed SAE's doubled dictionary, and `dead` lists its latents dead in both signs."""
    check_lam(lam)
    dead = tied(stats.active_count, 1) == 0 if signed else stats.dead
    max_rnorm = float(stats.worst_rnorm[0]) if stats.worst_rnorm.numel() else 0.0
    threshold = lam / 2
    margin = max_rnorm - threshold
    violated = bool(dead.any()) and margin > rel_tol * max(threshold, 1e-30)
    return SpareCheck(dead=dead, max_rnorm=max_rnorm, threshold=threshold, margin=margin, violated=violated)


@dataclass
class SpareCertificate:
    """C6: resample one dead feature k towards the worst residuals.

    The new atom a is the direction of one kept worst-residual token; the code rule is
    z_kn <- c on every token with w_n ||r_n|| > radius and 2 w_n <a, r_n> > lam (else 0), where
    radius is the smallest kept w_n ||r_n||. Every audit token with w_n ||r_n|| > radius is among
    the kept ones, so the same rule is evaluated exactly on the audit tokens from them, and
    applied unchanged to the held-out tokens (where feature k may have had codes: they are
    replaced). On the audit tokens the change is c^2 sum_S w_n - c sum_S (2 w_n p_n - lam),
    p_n = <a, r_n>, with the exact minimiser c = sum_S (2 w_n p_n - lam) / (2 sum_S w_n).

    `partner`: a signed SAE's atom -d_k, dead on the audit tokens too, which becomes -a: on held-out
    tokens its codes are replaced as well (by 0), so the old signed code z_k - z_partner leaves."""

    feature: int
    atom: Tensor  # (d,) unit
    old_atom: Tensor  # (d,) d_k (zero for a zero-norm decoder row)
    radius: float
    partner: int | None = None
    condition = "C6"

    def __post_init__(self) -> None:
        self.step = torch.zeros(1, dtype=torch.float64, device=self.atom.device)

    def __len__(self) -> int:
        return 1

    @classmethod
    def best_of(cls, stats: LayerStatistics, feature: int, old_atom: Tensor, lam: float,
                partner: int | None = None) -> "SpareCertificate | None":
        """The kept worst residual whose direction, as a new atom, lowers L on the audit tokens most."""
        norms, vectors, w = stats.worst_rnorm, stats.worst_residual, stats.worst_weight
        usable = norms > 0
        if not bool(usable.any()):
            return None
        radius = float(norms[-1]) if stats.n_tokens > len(norms) else -1.0
        candidates = vectors[usable] / vectors[usable].norm(dim=-1, keepdim=True)
        wp = w[:, None] * (vectors @ candidates.T)  # (kept, candidates)
        coded = (norms[:, None] > radius) & (2 * wp > lam)
        excess = torch.where(coded, 2 * wp - lam, 0.0).sum(0)
        gain = excess**2 / (4 * torch.where(coded, w[:, None], 0.0).sum(0).clamp(min=1e-300))
        best = int(gain.argmax())
        if float(gain[best]) <= 0:
            return None
        return cls(feature, candidates[best], old_atom.double(), radius, partner)

    def _coded(self, r: Tensor, w: Tensor | float, lam: float) -> tuple[Tensor, Tensor]:
        """(p = <a, r_n>, the rule's mask) on tokens with residuals r and weights w."""
        p = (r @ self.atom.to(r.dtype)).double()
        return p, (w * r.norm(dim=-1).double() > self.radius) & (2 * w * p > lam)

    def _audit_sums(self, stats: LayerStatistics, lam: float) -> tuple[Tensor, Tensor]:
        """(sum_S (2 w_n p_n - lam), sum_S w_n) over the kept audit tokens the rule codes."""
        w = stats.worst_weight.to(self.atom.device)
        p, coded = self._coded(stats.worst_residual.to(self.atom.device), w, lam)
        return torch.where(coded, 2 * w * p - lam, 0.0).sum(), torch.where(coded, w, 0.0).sum()

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        excess, weight = self._audit_sums(stats, lam)
        return (excess / (2 * weight.clamp(min=1e-300)))[None]

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        excess, weight = self._audit_sums(stats, lam)
        first = -step * excess
        return first + step**2 * weight, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        w = tokens.w()
        p, coded = self._coded(tokens.r, w, lam)
        c = float(self.step[0])
        old = l1_old = tokens.z[:, self.feature].double()
        if self.partner is not None:  # the signed code on d_k, and its size
            other = tokens.z[:, self.partner].double()
            old, l1_old = old - other, old + other
        q_old = (tokens.r @ self.old_atom.to(tokens.r.dtype)).double()
        new = c * coded.double()
        cross = float(self.atom @ self.old_atom.to(self.atom.dtype))
        old_norm2 = float(self.old_atom.norm() ** 2)
        # r' = r - (new a - old d_k): w (||r'||^2 - ||r||^2) + lam (new - old)
        squared = -2 * (new * p - old * q_old) + new**2 + old**2 * old_norm2 - 2 * new * old * cross
        return TokenChanges.per_token((w * squared + lam * (new - l1_old))[:, None])

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        _, coded = self._coded(r, 1.0 if weight is None else weight.double(), lam)
        atoms2, z2 = atoms.clone(), z.clone()
        atoms2[self.feature] = self.atom.to(atoms.dtype)
        z2[:, self.feature] = float(self.step[0]) * coded.to(z.dtype)
        if self.partner is not None:
            atoms2[self.partner], z2[:, self.partner] = -atoms2[self.feature], 0.0
        return atoms2, z2, bias
