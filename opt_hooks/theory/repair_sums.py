"""The streamed sums a repair decides on (THEORY.md section 7), all mergeable.

- `VariantSums`: per-token losses of several versions of one SAE on the same tokens (the SAE's own
  encode / decode, computed by the caller), their parts and, for each version, the paired change
  against the version it was built from (a paired test on the same tokens). Tokens of one window
  (a row of a forward pass) are not independent, so the sums are also kept per window (`accumulator.Clustered`):
  every mean gets the standard error of a ratio estimator over windows.
- `PlantFit`: the choice of a resampled latent's code rule on the audit tokens. For candidate unit
  atoms a_r and thresholds tau_rg, the code z = beta max(0, p - tau) (p = <a_r, x - b>) changes the
  loss by beta^2 S_zz - beta (2 S_zq - lam S_z) with S_z = sum u, S_zz = sum w u^2,
  S_zq = sum w u <a_r, r> (u = max(0, p - tau)): the best beta and its gain are closed forms.
- `LatentChanges`: per planted latent, the exact per-token change of the loss on held-out tokens
  (clustered by window), from the latent's old and new codes and the residual before planting.

Pure tensor code: nothing here knows about TransformerLens or SAE-Lens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from opt_hooks.theory.accumulator import Accumulator, Clustered


def _f64(*shape: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(*shape, dtype=torch.float64, device=device)


class VariantSums(Accumulator):
    """Sums over tokens for V versions of one SAE. `reference[v]`: the version v is compared with
    (-1: none). Each update takes per-token (n, V) loss, mse and l1 (unweighted, in the SAE's input
    space), (n, V) L0 counts, (V, K) bool of latents that fired, the inputs (n, d) for the explained
    variance and each token's window (n,). `parts[name]` holds each part's `Clustered` sums, "change"
    the paired change against the reference."""

    PARTS = ("loss", "mse", "l1", "l0", "change")

    def __init__(self, reference: list[int], n_features: int, d_in: int) -> None:
        super().__init__()
        self.reference = list(reference)
        n = len(reference)
        self.parts = {part: Clustered(n) for part in self.PARTS}
        self.add_state("fired", torch.zeros(n, n_features, dtype=torch.int64), "sum")
        self.add_state("x_sum", _f64(d_in), "sum")
        self.add_state("x_sq", _f64(()), "sum")

    @property
    def n_tokens(self) -> int:
        return int(self.parts["loss"].n_tokens)

    def update(self, loss: Tensor, mse: Tensor, l1: Tensor, l0: Tensor, fired: Tensor, x: Tensor,
               windows: Tensor) -> None:
        loss = loss.double().cpu()
        ref = torch.tensor([max(r, 0) for r in self.reference])
        has = torch.tensor([r >= 0 for r in self.reference], dtype=torch.float64)
        change = (loss - loss[:, ref]) * has
        for part, values in zip(self.PARTS, (loss, mse, l1, l0, change)):
            self.parts[part].update(values, windows)
        self.fired = self.fired + fired.long().cpu()
        x = x.double().cpu()
        self.x_sum = self.x_sum + x.sum(0)
        self.x_sq = self.x_sq + (x**2).sum()

    def _merge_extra(self, other: "VariantSums") -> None:
        for part in self.PARTS:
            self.parts[part].merge(other.parts[part])

    def spread(self) -> float:
        """sum_n ||x_n - mean x||^2: what the explained variance compares the MSE with."""
        n = self.n_tokens
        return float(self.x_sq) - float((self.x_sum**2).sum()) / n if n else 0.0


class PlantFit(Accumulator):
    """Sums choosing (tau, beta) for R candidate atoms (R, d) and thresholds (R, G)."""

    def __init__(self, atoms: Tensor, thresholds: Tensor) -> None:
        super().__init__()
        self.atoms, self.thresholds = atoms.double(), thresholds.double()
        shape = tuple(thresholds.shape)
        for name in ("s_z", "s_zz", "s_zq"):
            self.add_state(name, _f64(*shape, device=atoms.device), "sum")

    def update(self, x: Tensor, r: Tensor, bias: Tensor, w: Tensor | None) -> None:
        """x, r (n, d) inputs and residuals in the internal space, w (n,) token weights or None."""
        a = self.atoms.to(x.device)
        p = (x.double() - bias.double()) @ a.T  # (n, R)
        q = r.double() @ a.T
        u = (p[:, :, None] - self.thresholds.to(x.device)[None]).clamp(min=0)  # (n, R, G)
        weight = torch.ones(len(x), dtype=torch.float64, device=x.device) if w is None else w.double()
        self.s_z = self.s_z + u.sum(0)
        self.s_zz = self.s_zz + torch.einsum("n,nrg->rg", weight, u**2)
        self.s_zq = self.s_zq + torch.einsum("n,nrg,nr->rg", weight, u, q)

    def best(self, lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per candidate: (threshold, beta, gain on the audit tokens, summed), the best threshold's."""
        drive = 2 * self.s_zq - lam * self.s_z
        gain = torch.where((drive > 0) & (self.s_zz > 0), drive**2 / (4 * self.s_zz.clamp(min=1e-300)), 0.0)
        g = gain.argmax(dim=1)
        rows = torch.arange(len(g), device=g.device)
        beta = torch.where(gain[rows, g] > 0, drive[rows, g] / (2 * self.s_zz[rows, g].clamp(min=1e-300)), 0.0)
        return self.thresholds.to(g.device)[rows, g], beta, gain[rows, g]


class LatentChanges(Accumulator):
    """Per planted latent k (R of them): the per-token change of the loss,
    w (||r + z_old d_old - z_new a||^2 - ||r||^2) + lam (z_new - z_old), summed by window (`changes`),
    and the tokens it touches."""

    def __init__(self, old_atoms: Tensor, new_atoms: Tensor) -> None:
        super().__init__()
        self.old_atoms, self.new_atoms = old_atoms.double(), new_atoms.double()
        self.cross = (self.old_atoms * self.new_atoms).sum(-1)  # <d_old, a>
        self.old_norm2 = (self.old_atoms**2).sum(-1)
        self.changes = Clustered(len(new_atoms))
        self.add_state("touched", torch.zeros(len(new_atoms), dtype=torch.int64), "sum")

    def update(self, r: Tensor, z_old: Tensor, z_new: Tensor, w: Tensor | None, lam: float, windows: Tensor) -> None:
        """r (n, d) residuals before planting; z_old, z_new (n, R) the latents' codes before/after."""
        r, z_old, z_new = r.double(), z_old.double(), z_new.double()
        old_q = r @ self.old_atoms.to(r.device).T
        new_q = r @ self.new_atoms.to(r.device).T
        squared = (2 * z_old * old_q + z_old**2 * self.old_norm2.to(r.device) - 2 * z_new * new_q
                   - 2 * z_old * z_new * self.cross.to(r.device) + z_new**2)
        weight = 1.0 if w is None else w.double()[:, None]
        change = (weight * squared + lam * (z_new - z_old)).cpu()
        self.changes.update(change, windows)
        self.touched = self.touched + (change != 0).sum(0)

    def _merge_extra(self, other: "LatentChanges") -> None:
        self.changes.merge(other.changes)
