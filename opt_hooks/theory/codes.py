"""The audit tokens' nonzero codes, kept exactly and mergeable (THEORY.md section 4).

The pair condition C2 needs, for every ordered pair of features, the extremes of z_j over the
tokens where i is off. Those are settled from the sparse code matrix itself (see
`opt_hooks.theory.pairs`), so pass 1 keeps every nonzero code of every audit token.

`SparseCodes` streams batches in the spirit of torchmetrics' `Metric`: `update` stores one
chunk per batch (no concatenation per update), `merge` adopts another partial state's chunks,
and `compute` returns one canonical `CSR` with rows sorted by global token index. Because the
result only depends on the set of (token, row) pairs, merging partial states in any order or
streaming with any batch split gives exactly the same CSR.

Rows without any nonzero are tokens too (every feature is off there): they are kept as empty
rows, so `n_tokens` is the number of rows ever updated.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class CSR:
    """Codes z (N tokens x K features) in compressed sparse row form, one row per token.

    Rows are sorted by `token_index` (ascending, no duplicates) and columns ascending within
    each row, so the flat keys `row * K + col` are strictly increasing. Treat as immutable.
    """

    token_index: Tensor  # (N,) int64, ascending: global token index of each row
    crow: Tensor  # (N + 1,) int64: row r holds entries crow[r] .. crow[r + 1] - 1
    col: Tensor  # (nnz,) int32: feature index of each entry
    val: Tensor  # (nnz,) float32 or float64: the nonzero code value
    n_features: int
    # (nnz,) optional per-entry companion value, permuted with the entries (the engine keeps
    # w_n <d_i, r_n> of every active (n, i) here: C4's active terms and the C2 certificates need it)
    aux: Tensor | None = None
    # (N,) optional per-row token weight w_n (normalising SAEs, THEORY.md section 1), float64
    weight: Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.token_index.numel()

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.crow.device

    def _arrays(self) -> list[Tensor]:
        return [t for t in (self.token_index, self.crow, self.col, self.val, self.aux, self.weight) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._arrays())

    def to(self, device: torch.device | str) -> "CSR":
        aux, weight = (None if t is None else t.to(device) for t in (self.aux, self.weight))
        return CSR(*(t.to(device) for t in (self.token_index, self.crow, self.col, self.val)), self.n_features, aux, weight)

    def row_weight(self, rows: Tensor) -> Tensor | float:
        """w_n of the given rows (float64), or 1.0 when the tokens are unweighted."""
        return 1.0 if self.weight is None else self.weight[rows].double()

    def keys(self) -> Tensor:
        """(nnz,) int64 flat keys row * K + col: strictly increasing."""
        return self.row_ids() * self.n_features + self.col.long()

    def entry_of(self, rows: Tensor, features: Tensor, keys: Tensor | None = None) -> Tensor:
        """Position of entry (row, feature) in the entry arrays, -1 where that code is zero:
        one binary search in the flat keys (pass `keys()` when looking up many times)."""
        keys = self.keys() if keys is None else keys
        wanted = rows.long() * self.n_features + features.long()
        where = torch.searchsorted(keys, wanted).clamp(max=max(self.nnz - 1, 0))
        found = (keys[where] == wanted) if self.nnz else torch.zeros_like(wanted, dtype=torch.bool)
        return torch.where(found, where, -1)

    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, start, count): entries of feature f are order[start[f] : start[f] + count[f]],
        in ascending row order."""
        return _by_feature(self.col, self.n_features)

    def row_ids(self) -> Tensor:
        """(nnz,) int64: the row (position in `token_index`) of every entry."""
        rows = torch.arange(self.n_tokens, device=self.device)
        return torch.repeat_interleave(rows, self.crow.diff())

    def counts(self) -> Tensor:
        """(K,) int64: number of tokens where each feature is active."""
        return torch.bincount(self.col.long(), minlength=self.n_features)

    def top_tokens(self, feature_ids: Tensor | Sequence[int], k: int) -> tuple[Tensor, Tensor]:
        """The k strongest tokens of each requested feature, strongest first.

        Returns (values (F, k) float64, token_index (F, k) int64). Equal values are ordered by
        ascending token index. A feature with fewer than k active tokens is padded with value 0
        and token index -1.
        """
        slots, inverse, n_slots = self._slots(feature_ids)
        entry_slot = slots[self.col.long()]
        picked = (entry_slot >= 0).nonzero().squeeze(1)
        slot, value = entry_slot[picked], self.val[picked].double()
        token = self.token_index[self.row_ids()[picked]]
        # Entries come in row order (ascending token); two stable sorts then order each
        # feature's entries by value, descending, ties by ascending token.
        by_value = torch.argsort(value, descending=True, stable=True)
        order = by_value[torch.argsort(slot[by_value], stable=True)]
        slot, value, token = slot[order], value[order], token[order]
        first = torch.searchsorted(slot, torch.arange(n_slots, device=self.device))
        rank = torch.arange(slot.numel(), device=self.device) - first[slot]
        keep = rank < k
        values = torch.zeros(n_slots, k, dtype=torch.float64, device=self.device)
        tokens = torch.full((n_slots, k), -1, dtype=torch.int64, device=self.device)
        values[slot[keep], rank[keep]] = value[keep]
        tokens[slot[keep], rank[keep]] = token[keep]
        return values[inverse], tokens[inverse]

    def columns(self, feature_ids: Tensor | Sequence[int]) -> Tensor:
        """Dense (N, F) float64 codes of the requested features, rows in `token_index` order."""
        slots, inverse, n_slots = self._slots(feature_ids)
        entry_slot = slots[self.col.long()]
        picked = (entry_slot >= 0).nonzero().squeeze(1)
        dense = torch.zeros(self.n_tokens, n_slots, dtype=torch.float64, device=self.device)
        dense[self.row_ids()[picked], entry_slot[picked]] = self.val[picked].double()
        return dense[:, inverse]

    def _slots(self, feature_ids: Tensor | Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """Map each feature to its slot among the distinct requested ones (-1: not requested).

        Returns (slots (K,), inverse (F,), number of slots): requested feature f is slot inverse[f].
        """
        ids = torch.as_tensor(feature_ids, dtype=torch.int64, device=self.device).reshape(-1)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_features):
            raise IndexError(f"feature ids must lie in [0, {self.n_features})")
        distinct, inverse = torch.unique(ids, return_inverse=True)
        slots = torch.full((self.n_features,), -1, dtype=torch.int64, device=self.device)
        slots[distinct] = torch.arange(distinct.numel(), device=self.device)
        return slots, inverse, distinct.numel()


class SparseBatch:
    """One batch of codes as its nonzero entries, found once and shared by every statistic."""

    def __init__(self, z: Tensor) -> None:
        self.n_tokens, self.n_features = z.shape
        self.rows, self.cols = z.nonzero(as_tuple=True)  # row-major: columns ascending within a row
        self.values = z[self.rows, self.cols]
        self.crow = row_pointers(torch.bincount(self.rows, minlength=self.n_tokens))

    @functools.cached_property
    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, start, count): entries of feature f are order[start[f] : start[f] + count[f]],
        in ascending row order (as `CSR.by_feature`)."""
        return _by_feature(self.cols, self.n_features)

    def matrix(self, dtype: torch.dtype) -> Tensor:
        """The codes as a sparse CSR tensor (n, K)."""
        return csr_matrix(self.crow, self.cols, self.values.to(dtype), (self.n_tokens, self.n_features))

    def transposed(self, dtype: torch.dtype) -> Tensor:
        """The codes transposed, (K, n), as a sparse CSR tensor: z^T products cost nnz x d."""
        order, _, count = self.by_feature
        return csr_matrix(row_pointers(count), self.rows[order], self.values[order].to(dtype), (self.n_features, self.n_tokens))

    def per_feature(self, values: Tensor, reduce: str = "sum") -> Tensor:
        """(K,) float64 reduction of one value per entry over each feature's entries."""
        if reduce == "sum":
            out = torch.zeros(self.n_features, dtype=torch.float64, device=values.device)
            return out.index_add_(0, self.cols, values.double())
        fill = float("inf") if reduce == "amin" else float("-inf")
        out = torch.full((self.n_features,), fill, dtype=torch.float64, device=values.device)
        return out.scatter_reduce_(0, self.cols, values.double(), reduce=reduce, include_self=True)

    def projections(self, r: Tensor, atoms: Tensor) -> Tensor:
        """<d_i, r_n> at every entry, computed at the entries only (a sampled product)."""
        if self.values.numel() == 0:
            return torch.zeros(0, dtype=r.dtype, device=r.device)
        pattern = self.matrix(r.dtype)
        return torch.sparse.sampled_addmm(pattern, r, atoms.T, beta=0.0).values()


class SparseCodes:
    """Mergeable store of nonzero codes: `update` per batch, `merge`, then `compute()` -> CSR.

    Values keep float64 when the codes arrive in float64 and are stored as float32 otherwise
    (exact for float16 / bfloat16 / float32 inputs). Chunks stay on the device their batch came
    from; `compute` gathers them on `device` (default: the device of the first update, else CPU).
    """

    def __init__(self, d_sae: int, device: torch.device | str | None = None) -> None:
        self.n_features = d_sae
        self.device = torch.device(device) if device is not None else None
        self._chunks: list[CSR] = []
        self._computed: CSR | None = None  # the last compute() result, while it is the only chunk

    def update(self, z: Tensor, token_index: Tensor) -> None:
        """Add a batch: z (n, K) nonnegative codes, token_index (n,) their global token indices."""
        if z.ndim != 2 or z.shape[1] != self.n_features:
            raise ValueError(f"z must be (n, {self.n_features}); got {tuple(z.shape)}")
        if token_index.shape != (z.shape[0],):
            raise ValueError(f"token_index must be ({z.shape[0]},); got {tuple(token_index.shape)}")
        self.add(token_index, SparseBatch(z))

    def add(self, token_index: Tensor, batch: SparseBatch, aux: Tensor | None = None,
            weight: Tensor | None = None) -> None:
        """Add a batch given as its nonzero entries: token_index (n,) their global token
        indices, `aux` one companion value per entry (see `CSR.aux`), `weight` one per token."""
        if batch.n_tokens == 0:
            return
        if self.device is None:
            self.device = token_index.device
        value_dtype = torch.float64 if batch.values.dtype == torch.float64 else torch.float32
        self._chunks.append(
            CSR(
                token_index=token_index.to(device=batch.crow.device, dtype=torch.int64),
                crow=batch.crow,
                col=batch.cols.to(torch.int32),
                val=batch.values.to(value_dtype),
                n_features=self.n_features,
                aux=None if aux is None else aux.to(value_dtype),
                weight=None if weight is None else weight.to(device=batch.crow.device, dtype=torch.float64),
            )
        )

    def merge(self, other: "SparseCodes") -> "SparseCodes":
        """Adopt another partial state's codes (in place); the other state is left unchanged."""
        if not isinstance(other, SparseCodes) or other.n_features != self.n_features:
            raise ValueError("can only merge SparseCodes with the same number of features")
        self._chunks.extend(other._chunks)
        if self.device is None:
            self.device = other.device
        return self

    def compute(self) -> CSR:
        """One CSR with rows sorted by token index. Consolidates the stored chunks into it."""
        if len(self._chunks) == 1 and self._chunks[0] is self._computed:
            return self._computed
        device = self.device or torch.device("cpu")
        chunks = [c.to(device) for c in self._chunks] or [_empty_csr(self.n_features, device)]
        merged = _concatenate_rows(chunks)
        canonical = _sort_rows(merged, torch.argsort(merged.token_index, stable=True))
        if canonical.n_tokens and (canonical.token_index.diff() == 0).any():
            raise ValueError("a token index was updated twice; token indices must be unique")
        # Keeping the result as the only chunk holds one copy and makes repeated compute() free.
        self._chunks = [canonical]
        self._computed = canonical
        return canonical

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self._chunks)

    @property
    def nnz(self) -> int:
        return sum(c.nnz for c in self._chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks)

    def top_tokens(self, feature_ids: Tensor | Sequence[int], k: int) -> tuple[Tensor, Tensor]:
        """See `CSR.top_tokens`."""
        return self.compute().top_tokens(feature_ids, k)

    def columns(self, feature_ids: Tensor | Sequence[int]) -> Tensor:
        """See `CSR.columns`."""
        return self.compute().columns(feature_ids)

    def state_dict(self) -> dict[str, Any]:
        csr = self.compute()
        state = {
            "n_features": torch.tensor(self.n_features),
            "token_index": csr.token_index.cpu(),
            "crow": csr.crow.cpu(),
            "col": csr.col.cpu(),
            "val": csr.val.cpu(),
        }
        for name in ("aux", "weight"):
            if getattr(csr, name) is not None:
                state[name] = getattr(csr, name).cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_features"]) != self.n_features:
            raise ValueError(f"state has {int(state['n_features'])} features, expected {self.n_features}")
        csr = CSR(state["token_index"], state["crow"], state["col"], state["val"], self.n_features, state.get("aux"),
                  state.get("weight"))
        self._chunks = [csr.to(self.device)] if self.device is not None else [csr]


def _by_feature(cols: Tensor, n_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, start, count) of entries grouped by feature, each group in entry order."""
    order = torch.argsort(cols, stable=True)
    count = torch.bincount(cols.long(), minlength=n_features)
    return order, torch.cumsum(count, 0) - count, count


def _empty_csr(n_features: int, device: torch.device) -> CSR:
    return CSR(
        token_index=torch.zeros(0, dtype=torch.int64, device=device),
        crow=torch.zeros(1, dtype=torch.int64, device=device),
        col=torch.zeros(0, dtype=torch.int32, device=device),
        val=torch.zeros(0, dtype=torch.float32, device=device),
        n_features=n_features,
    )


def _concatenate_rows(chunks: list[CSR]) -> CSR:
    """Stack the chunks' rows in the given order (values promoted to the widest dtype)."""
    if len(chunks) == 1:
        return chunks[0]
    return CSR(
        token_index=torch.cat([c.token_index for c in chunks]),
        crow=row_pointers(torch.cat([c.crow.diff() for c in chunks])),
        col=torch.cat([c.col for c in chunks]),
        val=torch.cat([c.val for c in chunks]),
        n_features=chunks[0].n_features,
        aux=None if any(c.aux is None for c in chunks) else torch.cat([c.aux for c in chunks]),
        weight=_concatenate_weights(chunks),
    )


def _concatenate_weights(chunks: list[CSR]) -> Tensor | None:
    """The chunks' row weights, 1 for rows of unweighted chunks; None when no chunk is weighted."""
    if all(c.weight is None for c in chunks):
        return None
    return torch.cat([
        c.weight if c.weight is not None else torch.ones(c.n_tokens, dtype=torch.float64, device=c.device)
        for c in chunks
    ])


def _sort_rows(csr: CSR, order: Tensor) -> CSR:
    """Permute whole rows: new row r is old row order[r]."""
    lengths = csr.crow.diff()[order]
    crow = row_pointers(lengths)
    new_row = torch.repeat_interleave(torch.arange(order.numel(), device=order.device), lengths)
    offset_in_row = torch.arange(csr.nnz, device=order.device) - crow[new_row]
    source = csr.crow[order][new_row] + offset_in_row
    aux = None if csr.aux is None else csr.aux[source]
    weight = None if csr.weight is None else csr.weight[order]
    return CSR(csr.token_index[order], crow, csr.col[source], csr.val[source], csr.n_features, aux, weight)


def row_pointers(lengths: Tensor) -> Tensor:
    """(R + 1,) int64 CSR row pointers of rows with these (R,) lengths: row r's entries are
    crow[r] .. crow[r + 1] - 1."""
    crow = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
    crow[1:] = lengths.cumsum(0)
    return crow


def csr_matrix(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR tensor from parts already in CSR order (invariants not re-checked), without
    torch's warning that CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
