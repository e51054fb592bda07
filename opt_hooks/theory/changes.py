"""What every certificate family is (THEORY.md 3.1), and the per-token sums they all report.

Each condition of THEORY.md section 2 lives in its own module (c1_floor.py .. c6_spare.py, the
decoder gap's step in gaps.py): its check on pass-1 statistics and its certificate family.

A certificate is a concrete change of the SAE's parameters chosen from the audit tokens alone
(new atoms, a new bias, or a per-feature code rule an encoder can implement) and applied,
unchanged, to the held-out tokens. A family holds F certificates of one condition and gives,
in float64:

- `line_search(stats, lam)`: the step of each certificate, by exact line search of its change
  on the audit tokens over a bounded range (closed forms where the change is a quadratic or a
  trigonometric polynomial of the step, a grid for C2). The family keeps it as `step`.
- `audit_change(stats, lam, step)`: the exact change of sum_n loss_n on the audit tokens at
  `step`, and its first-order part, from pass-1 statistics alone (sums, the sparse codes with
  each active <d_i, r_n>, the kept worst residuals).
- `held_out(tokens, lam)`: on a `TokenBatch` (held-out tokens), the per-token changes at
  `step`, summed: `TokenChanges(sum, sum of squares, tokens touched)`, mergeable sums from
  which the held-out change gets its standard error.
- `apply(k, atoms, z, bias, r, lam, weight)`: the same change on full tensors, so the tests can
  check every closed form against a float64 recompute of L.

With token weights w_n (THEORY.md section 1) every squared-error term carries w_n: the pass-1
sums are weighted where a squared error enters (stats.LayerStatistics), a TokenBatch's `wr`
and projections are w_n r_n and w_n <d_i, r_n>, and each per-token quadratic term is
multiplied by the token's w_n. The L1 terms are unweighted.

The closed forms are algebraically identical to recomputing L and far more accurate than
subtracting two large losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.codes import SparseBatch
from opt_hooks.theory.stats import LayerStatistics

Perturbed = tuple[Tensor, Tensor, Tensor]  # (atoms, z, bias) after the change


@dataclass
class TokenChanges:
    """Per-certificate sums over tokens of the per-token change of the loss: the sum, the sum of
    squares and the number of tokens whose loss the certificate changes (all mergeable)."""

    sum: Tensor  # (F,) float64
    sum_sq: Tensor  # (F,) float64
    touched: Tensor  # (F,) int64

    @classmethod
    def per_feature(cls, entries: SparseBatch, slots: Tensor, n_slots: int, values: Tensor) -> "TokenChanges":
        """From one value per code entry, certificate `slots[entry]` (-1: none): certificates whose
        change lives on their feature's active tokens only."""
        keep = slots >= 0
        slot, values = slots[keep], values[keep].double()
        zeros = torch.zeros(n_slots, dtype=torch.float64, device=values.device)
        count = torch.zeros(n_slots, dtype=torch.int64, device=values.device)
        return cls(
            zeros.index_add(0, slot, values), zeros.index_add(0, slot, values**2),
            count.index_add(0, slot, (values != 0).long()),
        )

    @classmethod
    def per_token(cls, changes: Tensor) -> "TokenChanges":
        """From dense per-token changes (n, F)."""
        changes = changes.double()
        return cls(changes.sum(0), (changes**2).sum(0), (changes != 0).sum(0))


def per_entry(values: Tensor, slots: Tensor) -> Tensor:
    """values[slot] at every entry, 0 where the entry has no certificate (slot -1)."""
    return torch.cat([values.to(slots.device), values.new_zeros(1).to(slots.device)])[slots]


def slots_of(features: Tensor, cols: Tensor, n_features: int) -> Tensor:
    """Each entry's certificate, by its feature (-1: that feature has none)."""
    slot_of = torch.full((n_features,), -1, dtype=torch.int64, device=cols.device)
    slot_of[features.to(cols.device)] = torch.arange(len(features), device=cols.device)
    return slot_of[cols]


def column(w: Tensor | float) -> Tensor | float:
    """Per-token weights as a column, to scale (n, F) changes (a scalar stays one)."""
    return w[:, None] if isinstance(w, Tensor) else w


def once(family: object, stats: LayerStatistics, compute):
    """A family's sums of pass-1 statistics, computed once per statistics object: the line search
    and the audit change read the same (K, d) products."""
    cached = family.__dict__.get("_sums_of")
    if cached is None or cached[0] is not stats:
        cached = (stats, compute())
        family.__dict__["_sums_of"] = cached
    return cached[1]


def held_out_constant(family: object, name: str, like: Tensor, compute):
    """A (K, d)- or (F, d)-sized constant of a family's held-out change, in `like`'s dtype and
    device, built once: every held-out batch, and every window of one, reads it (rebuilding it per window cost
    as much as the window's own arithmetic)."""
    store = family.__dict__.setdefault("_held_out_constants", {})
    key = (name, like.dtype, like.device)
    if key not in store:
        store[key] = compute()
    return store[key]


@dataclass
class FeatureFamily:
    """Base of the families with one certificate per feature of `features` (C3, C4): steps
    start at 0, and `_sums` gives the family's pass-1 sums (`_compute_sums`), computed once."""

    features: Tensor  # (F,)

    def __post_init__(self) -> None:
        self.step = torch.zeros(len(self.features), dtype=torch.float64, device=self.features.device)

    def __len__(self) -> int:
        return len(self.features)

    def _sums(self, stats: LayerStatistics) -> tuple[Tensor, ...]:
        return once(self, stats, lambda: self._compute_sums(stats))

    def _compute_sums(self, stats: LayerStatistics) -> tuple[Tensor, ...]:
        raise NotImplementedError
