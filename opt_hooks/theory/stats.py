"""Pass-1 statistics of THEORY.md section 4, streamed and mergeable.

`LayerStats.update(x, z, token_index)` takes one batch in theory units (see
docs/ARCHITECTURE.md) and keeps only sums, counts, minima, maxima, the worst residuals and
the sparse codes. Per-batch products run in `objective.compute_dtype` (float32, or float64
when the input is float64 or too large for float32); every accumulator is float64 or int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opt_hooks.theory.accumulator import Accumulator
from opt_hooks.theory.codes import CSR, SparseCodes
from opt_hooks.theory.objective import compute_dtype, residuals


@dataclass
class LayerStatistics:
    """A computed snapshot of `LayerStats` (float64 / int64 tensors)."""

    n_tokens: int
    active_count: Tensor  # (K,) int64
    sum_z: Tensor  # (K,)
    sum_z2: Tensor  # (K,)
    min_z: Tensor  # (K,) over all tokens; +inf when no token was seen
    max_z: Tensor  # (K,)
    sum_z_rnorm: Tensor  # (K,) sum_n z_in ||r_n||
    sum_z_r: Tensor  # (K, d) sum_n z_in r_n
    sum_r: Tensor  # (d,)
    sum_rnorm: float
    sum_rnorm2: float
    worst_rnorm: Tensor  # (k,) largest ||r_n||, descending
    worst_token: Tensor  # (k,) their token indices
    worst_residual: Tensor  # (k, d) their residual vectors
    codes: CSR | None
    active_projections: Tensor | None  # <d_i, r_n> over active (n, i), for the lam estimate

    @property
    def mu(self) -> Tensor:
        """mu_i = (1/N) sum_n z_in, zeros included."""
        return self.sum_z / max(self.n_tokens, 1)

    @property
    def dead(self) -> Tensor:
        return self.active_count == 0


class LayerStats(Accumulator):
    """Streaming pass-1 statistics for one SAE (K features, d input dimensions)."""

    def __init__(
        self,
        atoms: Tensor,
        bias: Tensor,
        *,
        worst_k: int = 16,
        keep_codes: bool = True,
        keep_projections: bool = False,
    ) -> None:
        super().__init__()
        if atoms.ndim != 2 or bias.shape != atoms.shape[1:]:
            raise ValueError(
                f"atoms must be (K, d) and bias (d,); got {tuple(atoms.shape)} and {tuple(bias.shape)}"
            )
        n_features, d = atoms.shape
        dev = atoms.device
        self.atoms, self.bias = atoms, bias
        self.worst_k = worst_k
        f64 = dict(dtype=torch.float64, device=dev)
        self.add_state("n_tokens", torch.zeros((), dtype=torch.int64, device=dev), "sum")
        self.add_state("active_count", torch.zeros(n_features, dtype=torch.int64, device=dev), "sum")
        self.add_state("sum_z", torch.zeros(n_features, **f64), "sum")
        self.add_state("sum_z2", torch.zeros(n_features, **f64), "sum")
        self.add_state("min_z", torch.full((n_features,), float("inf"), **f64), "min")
        self.add_state("max_z", torch.zeros(n_features, **f64), "max")
        self.add_state("sum_z_rnorm", torch.zeros(n_features, **f64), "sum")
        self.add_state("sum_z_r", torch.zeros(n_features, d, **f64), "sum")
        self.add_state("sum_r", torch.zeros(d, **f64), "sum")
        self.add_state("sum_rnorm", torch.zeros((), **f64), "sum")
        self.add_state("sum_rnorm2", torch.zeros((), **f64), "sum")
        self.worst = WorstResiduals(worst_k, d, dev)
        self.codes = SparseCodes(n_features, device=dev) if keep_codes else None
        self.projections: list[Tensor] | None = [] if keep_projections else None
        self._next_token = 0

    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None) -> None:
        """Add a batch: x (n, d) internal inputs, z (n, K) codes in theory units."""
        n = x.shape[0]
        if token_index is None:
            token_index = torch.arange(self._next_token, self._next_token + n, device=x.device)
        self._next_token = max(self._next_token, int(token_index.max()) + 1) if n else self._next_token
        if n == 0:
            return
        compute = compute_dtype(x, z, self.bias)
        atoms, bias = self.atoms.to(compute), self.bias.to(compute)
        xc, zc = x.to(compute), z.to(compute)
        r = residuals(xc, atoms, zc, bias)
        rnorm = r.norm(dim=-1)
        z64 = zc.double()
        self.n_tokens += n
        self.active_count += (zc != 0).sum(0)
        self.sum_z += z64.sum(0)
        self.sum_z2 += (z64 * z64).sum(0)
        self.min_z = torch.minimum(self.min_z, z64.amin(0))
        self.max_z = torch.maximum(self.max_z, z64.amax(0))
        self.sum_z_rnorm += (zc.T @ rnorm).double()
        self.sum_z_r += (zc.T @ r).double()
        self.sum_r += r.double().sum(0)
        self.sum_rnorm += rnorm.double().sum()
        self.sum_rnorm2 += (rnorm.double() ** 2).sum()
        self.worst.update(rnorm.double(), token_index.to(x.device), r.double())
        if self.codes is not None:
            self.codes.update(z, token_index)
        if self.projections is not None:
            active = zc != 0
            self.projections.append((r @ atoms.T)[active].cpu())  # compute dtype: float32 could overflow

    def _merge_extra(self, other: "LayerStats") -> None:
        self.worst.merge(other.worst)
        if self.codes is not None:
            self.codes.merge(other.codes)
        if self.projections is not None:
            self.projections.extend(other.projections)
        self._next_token = max(self._next_token, other._next_token)

    def compute(self) -> LayerStatistics:
        projections = None
        if self.projections is not None:
            projections = torch.cat(self.projections) if self.projections else torch.zeros(0)
        return LayerStatistics(
            n_tokens=int(self.n_tokens),
            active_count=self.active_count.clone(),
            sum_z=self.sum_z.clone(),
            sum_z2=self.sum_z2.clone(),
            min_z=self.min_z.clone(),
            max_z=self.max_z.clone(),
            sum_z_rnorm=self.sum_z_rnorm.clone(),
            sum_z_r=self.sum_z_r.clone(),
            sum_r=self.sum_r.clone(),
            sum_rnorm=float(self.sum_rnorm),
            sum_rnorm2=float(self.sum_rnorm2),
            worst_rnorm=self.worst.values.clone(),
            worst_token=self.worst.tokens.clone(),
            worst_residual=self.worst.vectors.clone(),
            codes=self.codes.compute() if self.codes is not None else None,
            active_projections=projections,
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.unreduced_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.merge_unreduced([state])

    def unreduced_state(self) -> dict[str, Any]:
        """The parts that no sum, min or max combines (worst residuals, sparse codes, lam
        projections), on the CPU: distributed ranks exchange these whole and all-reduce the rest."""
        return {
            "worst": self.worst.state_dict(),
            "codes": self.codes.state_dict() if self.codes is not None else None,
            "projections": None if self.projections is None else [p.cpu() for p in self.projections],
            "next_token": self._next_token,
        }

    def merge_unreduced(self, states: list[dict[str, Any]]) -> None:
        """Replace those parts with the merge of `states` (`unreduced_state()`s of partial
        statistics, this one's included if it counts): exactly what `merge` makes of them."""
        n_features, d = self.atoms.shape
        self.worst = WorstResiduals(self.worst_k, d, self.atoms.device)
        if self.codes is not None:
            self.codes = SparseCodes(n_features, device=self.codes.device)
        if self.projections is not None:
            self.projections = []
        self._next_token = 0
        for state in states:
            worst = WorstResiduals(self.worst_k, d, self.atoms.device)
            worst.load_state_dict(state["worst"])
            self.worst.merge(worst)
            if self.codes is not None:
                codes = SparseCodes(n_features)
                codes.load_state_dict(state["codes"])
                self.codes.merge(codes)
            if self.projections is not None:
                self.projections.extend(state["projections"])
            self._next_token = max(self._next_token, int(state["next_token"]))


class WorstResiduals:
    """The k tokens with the largest ||r_n|| (ties broken by token index), with their residuals."""

    def __init__(self, k: int, d: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.zeros(0, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(0, dtype=torch.int64, device=device)
        self.vectors = torch.zeros(0, d, dtype=torch.float64, device=device)

    def update(self, values: Tensor, tokens: Tensor, vectors: Tensor) -> None:
        self._keep_top(
            torch.cat([self.values, values]),
            torch.cat([self.tokens, tokens.to(self.tokens.device)]),
            torch.cat([self.vectors, vectors]),
        )

    def merge(self, other: "WorstResiduals") -> None:
        dev = self.values.device
        self.update(other.values.to(dev), other.tokens.to(dev), other.vectors.to(dev))

    def _keep_top(self, values: Tensor, tokens: Tensor, vectors: Tensor) -> None:
        # Sort by token first, then stably by value: equal values keep ascending token order,
        # so the kept set does not depend on how the stream was split.
        by_token = torch.argsort(tokens, stable=True)
        values, tokens, vectors = values[by_token], tokens[by_token], vectors[by_token]
        order = torch.argsort(values, descending=True, stable=True)[: self.k]
        self.values, self.tokens, self.vectors = values[order], tokens[order], vectors[order]

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.cpu(), "tokens": self.tokens.cpu(), "vectors": self.vectors.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        dev = self.values.device
        self.values, self.tokens, self.vectors = (state[k].to(dev) for k in ("values", "tokens", "vectors"))
