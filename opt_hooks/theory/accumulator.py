"""Mergeable streaming state, in the spirit of torchmetrics' `Metric`.

An `Accumulator` declares named tensor states, each with the reduction that combines two
partial states: "sum", "min" or "max". `Clustered` is one: sums over tokens grouped in windows,
from which a mean gets its standard error over windows. Batches, resumed runs and distributed ranks then
combine exactly (integer states exactly, float states in float64).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_COMBINE = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}


class Accumulator:
    """Base class: `add_state` in __init__, `update` in subclasses, then merge / state_dict."""

    def __init__(self) -> None:
        self._reductions: dict[str, str] = {}

    def add_state(self, name: str, value: Tensor, reduce: str) -> None:
        if reduce not in _COMBINE:
            raise ValueError(f"unknown reduction {reduce!r}; use one of {sorted(_COMBINE)}")
        self._reductions[name] = reduce
        setattr(self, name, value)

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Combine another partial state of the same shape into this one (in place)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name, reduce in self._reductions.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"cannot merge state {name!r}: shapes {tuple(mine.shape)} and {tuple(theirs.shape)} "
                    "differ (were both built for the same SAE?)"
                )
            setattr(self, name, _COMBINE[reduce](mine, theirs.to(mine.device)))
        self._merge_extra(other)
        return self

    def _merge_extra(self, other: "Accumulator") -> None:
        """Subclasses with non-reducible parts (sparse codes, top-k lists) combine them here."""

    def all_reduce(self, group: Any = None) -> None:
        """Reduce every declared state across torch.distributed ranks (in place)."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        for name, reduce in self._reductions.items():
            dist.all_reduce(getattr(self, name), op=ops[reduce], group=group)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).detach().cpu() for name in self._reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._reductions:
            current = getattr(self, name)
            setattr(self, name, state[name].to(device=current.device, dtype=current.dtype))


class Clustered(Accumulator):
    """Sums of F per-token quantities over tokens grouped in windows, for `policy.clustered_estimate`:
    sum_n v, sum_w T_w^2, sum_w n_w T_w (T_w: a window's total), sum_w n_w^2, tokens and windows.
    A window's tokens must arrive in one update (each forward pass holds whole windows)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(n, dtype=torch.float64), "sum")
        self.add_state("cluster_sq", torch.zeros(n, dtype=torch.float64), "sum")
        self.add_state("cluster_cross", torch.zeros(n, dtype=torch.float64), "sum")
        self.add_state("count_sq", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("n_tokens", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("n_windows", torch.zeros((), dtype=torch.int64), "sum")

    def update(self, values: Tensor, windows: Tensor) -> None:
        """values (n, F) per token, windows (n,) each token's window id."""
        values = values.double().cpu()
        ids, slot = torch.unique(windows.cpu(), return_inverse=True)
        totals = torch.zeros(len(ids), values.shape[1], dtype=torch.float64).index_add_(0, slot, values)
        counts = torch.bincount(slot, minlength=len(ids)).double()
        self.total = self.total + values.sum(0)
        self.cluster_sq = self.cluster_sq + (totals**2).sum(0)
        self.cluster_cross = self.cluster_cross + counts @ totals
        self.count_sq = self.count_sq + (counts**2).sum()
        self.n_tokens = self.n_tokens + len(values)
        self.n_windows = self.n_windows + len(ids)
