"""The exact pair engine for C2 (THEORY.md section 2 and section 4), without a dense K x K table.

For every ordered pair i != j with mu_j > 0, A_i = {n : z_in = 0} non-empty and |rho_ij| < 1,
C2 asks that (1 - rho_ij) mu_j lie between m_ij = min_{A_i} z_j and M_ij = max_{A_i} z_j.
`pair_violations` returns every pair where it does not, exactly:

- hierarchy (upper bound broken):   M_ij < (1 - rho_ij) mu_j - tol_j
- complementary (lower bound broken): m_ij > (1 - rho_ij) mu_j + tol_j

with tol_j = rel_tol * mu_j + abs_tol; every comparison is made in float64.

How the K^2 pairs are settled from the sparse codes alone
---------------------------------------------------------
Hierarchy. Let n*_j be a token where z_j reaches its maximum max_j. Every i that is off at n*_j
has M_ij = max_j, which can only break the bound if max_j < (1 - rho_ij) mu_j <= 2 mu_j: a
feature that is on at more than half of the tokens. For those rare j the rho column is computed
in chunks (atoms @ atoms[j]) and compared directly. The remaining pairs have i on at n*_j, so
there are at most L0 of them per j; for each, M_ij is the value of z_j at the first token, in
descending z_j order, where i is off (0 when i is on wherever j is). All pairs walk their
column together, in rounds of doubling block length, and "is i on at token n" is a binary
search for n * K + i in the sorted CSR keys. Ties need no care: n*_j itself is a top token.

Complementary. If some token has both i and j off then m_ij = 0 and the bound holds, so the
lower bound can only break when j is on at every token where i is off, which needs
count_i + count_j >= N. Those candidates (pairs of dense features, in practice) walk the
tokens where the denser of the two is off, in ascending order, until one has the other off
too; the pairs that never find one are exactly those with count_i + count_j - co_ij = N
(so co_ij needs no counting), and m_ij is the value of z_j at the first token, in ascending
z_j order, where i is off.

Memory (bytes; nnz = N * mean L0 nonzero codes, K features, C = chunk_elements, v = 4 for
float32 codes or 8 for float64)
-------------------------------------------------------------------------------------------
    index held for the call     (16 + v) * nnz + 40 * K      keys; rows and values by feature
    peak while building it      ~ 48 * nnz                    one stable int64 argsort (freed after)
    walks (both bounds)         ~ 270 * C                     ~15 int64 arrays per pair and per
                                                              visited position, in pieces of C
    Gram columns, rho of pairs  ~ 24 * C                      chunks of ~C / d atom rows
    dense-feature candidates    ~ 24 * nnz(features with count_i + max_j count_j >= N)
    result                      80 * (number of violations)

on top of the CSR itself ((4 + v) * nnz + 16 * N) and the atoms. Nothing grows as K^2, and N
enters only through nnz. Peak ~ max(48 * nnz, (16 + v) * nnz + 270 * C): with the default
C = 2^21, N = 100k tokens, L0 = 64 and K = 131,072 (float32 codes) that is ~0.65 GiB above
the inputs (measured: see docs/PAIRS.md), where a dense float64 K x K table of M alone would
take 128 GiB. Lower `chunk_elements` to trade speed for memory.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from opt_hooks.theory.codes import CSR

HIERARCHY = 1
COMPLEMENTARY = -1
DEFAULT_CHUNK_ELEMENTS = 1 << 21
_FIRST_BLOCK = 1  # first walk round looks at this many tokens per pair, then doubles
_NOT_FOUND = torch.iinfo(torch.int64).max


@dataclass(eq=False)  # eq=False: tensors have no single truth value
class PairViolations:
    """Every C2 violation, one entry per ordered pair (i, j), sorted by (i, j)."""

    i: Tensor  # (V,) int64: the feature that is off (parent for a hierarchy)
    j: Tensor  # (V,) int64: the feature whose values are bounded (child for a hierarchy)
    kind: Tensor  # (V,) int64: HIERARCHY (+1) or COMPLEMENTARY (-1)
    rho: Tensor  # (V,) float64: <d_i, d_j>
    bound: Tensor  # (V,) float64: M_ij (hierarchy) or m_ij (complementary)
    threshold: Tensor  # (V,) float64: (1 - rho_ij) mu_j
    margin: Tensor  # (V,) float64: how far the bound lies past the threshold, > tol_j >= 0
    count_i: Tensor  # (V,) int64: tokens where i is active
    count_j: Tensor  # (V,) int64: tokens where j is active
    co_count: Tensor  # (V,) int64: tokens where both are active

    def __len__(self) -> int:
        return self.i.numel()


def pair_violations(
    codes: CSR,
    atoms: Tensor,
    mu: Tensor,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 0.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> PairViolations:
    """All C2 violations of nonnegative codes (CSR, N x K) with unit atoms (K, d).

    mu (K,) is the mean of z_j over all N tokens (zeros included). Runs on the codes' device;
    `chunk_elements` bounds the size of every intermediate (see the module docstring).
    """
    index = _CodeIndex.build(codes)
    atoms = atoms.to(codes.device)
    mu = mu.to(device=codes.device, dtype=torch.float64)
    _check_inputs(index, codes, atoms, mu)
    tol = rel_tol * mu + abs_tol
    hierarchy = [
        *_hierarchy_on_top_token(index, atoms, mu, tol, chunk_elements),
        *_hierarchy_off_top_token(index, atoms, mu, tol, chunk_elements),
    ]
    complementary = list(_complementary(index, atoms, mu, tol, chunk_elements))
    return _assemble(index, mu, hierarchy, complementary, chunk_elements)


def co_counts(codes: CSR, i: Tensor, j: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Exact number of tokens where both features are active, for each pair (i[p], j[p]); int64."""
    index = _CodeIndex.build(codes)
    device = codes.device
    return _co_counts(index, i.to(device).long(), j.to(device).long(), chunk_elements)


def pair_bounds_dense(z: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force C2 bounds from dense codes z (N, K): the reference for tests and the baseline.

    Returns (M, m, both_off), each (K, K): M[i, j] = max_{n in A_i} z_jn and m[i, j] =
    min_{n in A_i} z_jn in float64 (NaN on rows i with A_i empty), both_off[i, j] whether some
    token has i and j off. Memory grows as K^2 (17 bytes per pair returned, about twice that at
    the peak) and time as N * K^2 + K * nnz: for small K only (tests, and the baseline of
    scripts/bench_pairs.py); use `pair_violations` at scale.
    """
    n_features = z.shape[1]
    # max and min only pick code values, so the tables are exact in the codes' own dtype. They
    # are built as [j, i] so that each active code updates one contiguous row (index_reduce_
    # along dim 0 is ~20x faster than a scatter along dim 1 on CPU).
    table = dict(dtype=z.dtype, device=z.device)
    upper_by_j = torch.zeros(n_features, n_features, **table)
    lower_on_j_by_j = torch.full((n_features, n_features), float("inf"), **table)
    both_off = torch.zeros(n_features, n_features, dtype=torch.bool, device=z.device)
    # Token chunks keep the (tokens, K) off-mask near chunk_elements, entry chunks the (entries, K) updates.
    tokens_per_step = entries_per_step = max(1, chunk_elements // max(n_features, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce.. is in beta")
        for z_chunk in z.split(tokens_per_step):
            off = z_chunk == 0
            off_f32 = off.float()  # a float32 count of tokens is > 0 exactly when the true count is
            both_off |= (off_f32.T @ off_f32) > 0
            # An active code z_nj raises M[:, j] (and lowers m[:, j]) on every i that is off at n.
            for rows, cols in zip(*(t.split(entries_per_step) for t in (~off).nonzero(as_tuple=True))):
                value = z_chunk[rows, cols][:, None]
                off_at = off[rows]  # (entries, K): is i off at the entry's token
                upper_by_j.index_reduce_(0, cols, torch.where(off_at, value, 0.0), "amax")
                lower_on_j_by_j.index_reduce_(0, cols, torch.where(off_at, value, float("inf")), "amin")
    upper = upper_by_j.T.double()
    lower = torch.where(both_off, 0.0, lower_on_j_by_j.T.double())
    i_always_on = (z != 0).all(0)
    upper[i_always_on] = float("nan")
    lower[i_always_on] = float("nan")
    return upper, lower, both_off


class _Pairs(NamedTuple):
    """Violating pairs found by one search, before counts are attached."""

    i: Tensor
    j: Tensor
    rho: Tensor
    bound: Tensor


@dataclass
class _CodeIndex:
    """Lookups over the codes, built once per call.

    `keys` answers "is feature f on at row n" by binary search; the by-value arrays list each
    feature's active rows grouped by feature, values descending (ties by ascending row).
    """

    n_tokens: int
    n_features: int
    crow: Tensor  # (N + 1,) int64, the CSR's row pointers
    col: Tensor  # (nnz,) the CSR's feature indices
    keys: Tensor  # (nnz,) int64 row * K + col, strictly increasing
    count: Tensor  # (K,) int64 active tokens per feature
    start: Tensor  # (K,) int64 where each feature's entries begin in the by-value arrays
    by_value_row: Tensor  # (nnz,) int64
    by_value_val: Tensor  # (nnz,) the CSR's value dtype

    @classmethod
    def build(cls, codes: CSR) -> "_CodeIndex":
        keys = codes.row_ids() * codes.n_features + codes.col
        by_feature = _by_feature_then_value(codes.col, codes.val)
        count = torch.bincount(codes.col, minlength=codes.n_features)
        return cls(
            n_tokens=codes.n_tokens,
            n_features=codes.n_features,
            crow=codes.crow,
            col=codes.col,
            keys=keys,
            count=count,
            start=count.cumsum(0) - count,
            by_value_row=keys[by_feature] // codes.n_features,
            by_value_val=codes.val[by_feature],
        )

    def is_on(self, rows: Tensor, features: Tensor) -> Tensor:
        """Whether feature features[p] is active at row rows[p]."""
        if self.keys.numel() == 0:
            return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        query = rows * self.n_features + features
        at = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return self.keys[at] == query

    def max_value(self) -> Tensor:
        """(K,) float64 max_n z_jn (0 for a feature that is never on)."""
        active = (self.count > 0).nonzero().squeeze(1)
        top = torch.zeros(self.n_features, dtype=torch.float64, device=self.count.device)
        top[active] = self.by_value_val[self.start[active]].double()
        return top

    def top_row(self, features: Tensor) -> Tensor:
        """A row where each (active somewhere) feature takes its maximum."""
        return self.by_value_row[self.start[features]]

    def descending(self, features: Tensor, position: Tensor) -> Tensor:
        """Index into the by-value arrays of each feature's position-th largest value."""
        return self.start[features] + position

    def ascending(self, features: Tensor, position: Tensor) -> Tensor:
        """Index into the by-value arrays of each feature's position-th smallest value."""
        return self.start[features] + self.count[features] - 1 - position


def _by_feature_then_value(col: Tensor, val: Tensor) -> Tensor:
    """Permutation of the CSR entries: grouped by feature, values descending, ties by row.

    Stable sorts of the CSR order (rows ascending) keep ties by row. Nonnegative float32
    values order like their bit patterns, so (feature, descending value) packs into one int64
    key and one sort (3x faster than two at 64M entries); other dtypes take two sorts.
    """
    if val.dtype == torch.float32:
        key = col.long() << 31
        key |= 0x7FFFFFFF - val.view(torch.int32)  # in place: one int64 array at a time
        return torch.argsort(key, stable=True)
    by_value = torch.argsort(val, descending=True, stable=True)
    return by_value[torch.argsort(col[by_value], stable=True)]


class _OffRows:
    """The rows where a feature is off, enumerated in ascending order, for a set of features.

    If a feature's active rows are a_0 < a_1 < ..., then a_r - r rows before a_r are inactive,
    so its t-th inactive row (0-based) is t + #{r : a_r - r <= t}. The values a_r - r are
    nondecreasing per feature, so one binary search over slot * (N + 1) + (a_r - r) serves all.
    """

    def __init__(self, index: _CodeIndex, features: Tensor) -> None:
        device = features.device
        self._slot = torch.full((index.n_features,), -1, dtype=torch.int64, device=device)
        self._slot[features] = torch.arange(features.numel(), device=device)
        entry_slot = self._slot[index.col.long()]
        picked = (entry_slot >= 0).nonzero().squeeze(1)
        slot = entry_slot[picked]
        order = torch.argsort(slot, stable=True)  # rows stay ascending within a slot
        slot, rows = slot[order], (index.keys[picked] // index.n_features)[order]
        self._first = torch.searchsorted(slot, torch.arange(features.numel(), device=device))
        rank = torch.arange(slot.numel(), device=device) - self._first[slot]
        self._stride = index.n_tokens + 1
        self._keys = slot * self._stride + rows - rank

    def rows_of(self, features: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """row_at(p, t): the t-th row (0-based, ascending) where features[p] is off."""
        slots = self._slot[features]

        def row_at(p: Tensor, t: Tensor) -> Tensor:
            slot = slots[p]
            active_before = torch.searchsorted(self._keys, slot * self._stride + t, right=True) - self._first[slot]
            return t + active_before

        return row_at


def _check_inputs(index: _CodeIndex, codes: CSR, atoms: Tensor, mu: Tensor) -> None:
    n_features = codes.n_features
    if atoms.ndim != 2 or atoms.shape[0] != n_features:
        raise ValueError(f"atoms must be ({n_features}, d); got {tuple(atoms.shape)}")
    if mu.shape != (n_features,):
        raise ValueError(f"mu must be ({n_features},); got {tuple(mu.shape)}")
    for name, values in (("atoms", atoms), ("mu", mu), ("codes", codes.val)):
        if not torch.isfinite(values).all():
            raise ValueError(f"{name} contain non-finite values")
    if (codes.val < 0).any():
        raise ValueError("codes must be nonnegative")
    if (index.keys.diff() <= 0).any():
        raise ValueError("CSR rows must be sorted by token with ascending, distinct columns")
    if ((mu > 0) != (index.count > 0)).any():
        raise ValueError("mu does not match the codes: mu_j > 0 must hold exactly where j is active")


def _hierarchy_on_top_token(
    index: _CodeIndex, atoms: Tensor, mu: Tensor, tol: Tensor, chunk: int
) -> Iterator[_Pairs]:
    """Hierarchy violations among pairs with i active at j's top token (at most L0 per j)."""
    alive = (mu > 0).nonzero().squeeze(1)
    top = index.top_row(alive)
    n_partners = index.crow[top + 1] - index.crow[top]
    for piece in _pieces(n_partners, chunk):
        owner, offset = _expand(n_partners[piece])
        j = alive[piece][owner]
        i = index.col[index.crow[top[piece]][owner] + offset].long()
        keep = (i != j) & (index.count[i] < index.n_tokens)
        i, j = i[keep], j[keep]
        first = _first_off(
            index,
            probe=i,
            length=index.count[j],
            row_at=_column_rows(index, j, descending=True),
            start=torch.ones_like(i),  # position 0 is j's top token, where i is on
            chunk=chunk,
        )
        # First token, in descending z_j, with i off; none (i on wherever j is) means M = 0.
        at = index.descending(j, first.clamp(max=index.count[j] - 1))
        upper = torch.where(first < index.count[j], index.by_value_val[at].double(), 0.0)
        maybe = upper < 2 * mu[j]  # (1 - rho) mu_j <= 2 mu_j: the others cannot break the bound
        i, j, upper = i[maybe], j[maybe], upper[maybe]
        rho = pair_rho(atoms, i, j, chunk)
        broken = _breaks(HIERARCHY, rho, upper, mu[j], tol[j])
        yield _Pairs(i[broken], j[broken], rho[broken], upper[broken])


def _hierarchy_off_top_token(
    index: _CodeIndex, atoms: Tensor, mu: Tensor, tol: Tensor, chunk: int
) -> Iterator[_Pairs]:
    """Hierarchy violations with i off at j's top token, where M_ij = max_j.

    Possible only for rho_ij < 1 - max_j / mu_j, so only for j with max_j < 2 mu_j; for those
    the rho columns come from chunked products atoms @ atoms[j].
    """
    n_features, d = atoms.shape
    max_value = index.max_value()
    candidates = ((mu > 0) & (max_value < 2 * mu)).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return
    i_has_off_token = index.count < index.n_tokens
    # A block holds rows x d atoms in float64 and a rows x cols block of rho: both near `chunk`.
    cols_per_block = max(1, chunk // max(n_features, 1))
    rows_per_block = max(1, chunk // max(min(cols_per_block, candidates.numel()), d))
    for j_block in candidates.split(cols_per_block):
        atoms_j = atoms[j_block].double()
        for i_start in range(0, n_features, rows_per_block):
            rho = atoms[i_start : i_start + rows_per_block].double() @ atoms_j.T
            i_grid = torch.arange(i_start, i_start + rho.shape[0], device=rho.device)
            broken = _breaks(HIERARCHY, rho, max_value[j_block], mu[j_block], tol[j_block])
            broken &= i_has_off_token[i_grid, None] & (i_grid[:, None] != j_block[None, :])
            row, column = broken.nonzero().unbind(1)
            i, j = i_grid[row], j_block[column]
            off_at_top = ~index.is_on(index.top_row(j), i)
            yield _Pairs(i[off_at_top], j[off_at_top], rho[row, column][off_at_top], max_value[j][off_at_top])


def _complementary(index: _CodeIndex, atoms: Tensor, mu: Tensor, tol: Tensor, chunk: int) -> Iterator[_Pairs]:
    """Complementary violations: pairs where j is on at every token where i is off."""
    n_tokens, count = index.n_tokens, index.count
    alive = (mu > 0).nonzero().squeeze(1)
    by_count = alive[torch.argsort(count[alive], stable=True)]
    open_i = (count < n_tokens).nonzero().squeeze(1)
    # j can cover i's N - count_i off tokens only if count_j >= N - count_i.
    first_partner = torch.searchsorted(count[by_count], n_tokens - count[open_i])
    n_partners = by_count.numel() - first_partner
    has_partner = n_partners > 0
    open_i, first_partner, n_partners = open_i[has_partner], first_partner[has_partner], n_partners[has_partner]
    if open_i.numel() == 0:
        return
    partners = by_count[first_partner.min() :]
    off_rows = _OffRows(index, torch.unique(torch.cat([open_i, partners])))
    for piece in _pieces(n_partners, chunk):
        owner, offset = _expand(n_partners[piece])
        slot = piece.start + owner
        i, j = open_i[slot], by_count[first_partner[slot] + offset]
        i, j = i[i != j], j[i != j]
        # "No token has both off" reads the same from either side: walk the shorter off-list.
        j_is_denser = count[j] >= count[i]
        walked, probe = torch.where(j_is_denser, j, i), torch.where(j_is_denser, i, j)
        n_off = n_tokens - count[walked]
        first_both_off = _first_off(
            index, probe=probe, length=n_off, row_at=off_rows.rows_of(walked), start=torch.zeros_like(i), chunk=chunk
        )
        covers = first_both_off == n_off
        i, j = i[covers], j[covers]
        # m_ij: z_j at the first token, in ascending z_j, where i is off (one exists: A_i is
        # non-empty and j is on all over it).
        first = _first_off(
            index,
            probe=i,
            length=count[j],
            row_at=_column_rows(index, j, descending=False),
            start=torch.zeros_like(i),
            chunk=chunk,
        )
        lower = index.by_value_val[index.ascending(j, first)].double()
        rho = pair_rho(atoms, i, j, chunk)
        broken = _breaks(COMPLEMENTARY, rho, lower, mu[j], tol[j])
        yield _Pairs(i[broken], j[broken], rho[broken], lower[broken])


def _column_rows(index: _CodeIndex, features: Tensor, descending: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """row_at(p, t): the row of feature features[p]'s t-th largest (or smallest) value."""
    if descending:
        first = index.descending(features, torch.zeros_like(features))
        return lambda p, t: index.by_value_row[first[p] + t]
    last = index.ascending(features, torch.zeros_like(features))
    return lambda p, t: index.by_value_row[last[p] - t]


def _breaks(kind: int, rho: Tensor, bound: Tensor, mu_j: Tensor, tol_j: Tensor) -> Tensor:
    """Whether the bound lies past (1 - rho) mu_j by more than tol_j, for pairs with |rho| < 1."""
    threshold = (1 - rho) * mu_j
    if kind == HIERARCHY:
        broken = bound < threshold - tol_j
    else:
        broken = bound > threshold + tol_j
    return broken & (rho.abs() < 1)


def _assemble(
    index: _CodeIndex, mu: Tensor, hierarchy: list[_Pairs], complementary: list[_Pairs], chunk: int
) -> PairViolations:
    """Attach thresholds, margins and counts; sort by (i, j)."""
    upper = _concat_pairs(hierarchy, mu.device)
    lower = _concat_pairs(complementary, mu.device)
    i, j, rho, bound = (torch.cat(fields) for fields in zip(upper, lower))
    n_upper = upper.i.numel()
    kind = torch.full_like(i, COMPLEMENTARY)
    kind[:n_upper] = HIERARCHY
    count_i, count_j = index.count[i], index.count[j]
    # A complementary pair has j on at every token where i is off: count_i + count_j - co = N.
    co_count = torch.cat(
        [_co_counts(index, upper.i, upper.j, chunk), count_i[n_upper:] + count_j[n_upper:] - index.n_tokens]
    )
    threshold = (1 - rho) * mu[j]
    margin = torch.where(kind == HIERARCHY, threshold - bound, bound - threshold)
    order = torch.argsort(i * index.n_features + j)
    return PairViolations(
        *(t[order] for t in (i, j, kind, rho, bound, threshold, margin, count_i, count_j, co_count))
    )


def _concat_pairs(parts: list[_Pairs], device: torch.device) -> _Pairs:
    if not parts:
        empty_long = torch.zeros(0, dtype=torch.int64, device=device)
        empty_f64 = torch.zeros(0, dtype=torch.float64, device=device)
        return _Pairs(empty_long, empty_long, empty_f64, empty_f64)
    return _Pairs(*(torch.cat(field) for field in zip(*parts)))


def _co_counts(index: _CodeIndex, i: Tensor, j: Tensor, chunk: int) -> Tensor:
    """Scan the rarer feature's active rows and count those where the other is on too."""
    i_is_rarer = index.count[i] <= index.count[j]
    rarer, other = torch.where(i_is_rarer, i, j), torch.where(i_is_rarer, j, i)
    both = torch.zeros_like(i)
    never_done = torch.zeros_like(i, dtype=torch.bool)
    for pairs, owner, t in _scan(index.count[rarer], torch.zeros_like(i), never_done, chunk, first_block=chunk):
        entry = pairs[owner]
        hit = index.is_on(index.by_value_row[index.descending(rarer[entry], t)], other[entry])
        both.index_add_(0, entry, hit.long())
    return both


def _first_off(
    index: _CodeIndex,
    probe: Tensor,
    length: Tensor,
    row_at: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    chunk: int,
) -> Tensor:
    """For each pair p, the first position t >= start[p] of a sequence of rows
    row_at(p, t), t < length[p], at which feature probe[p] is off; length[p] if none is.

    A pair that stops at position t costs O(t) lookups over O(log t) rounds.
    """
    first = length.clone()
    done = torch.zeros_like(length, dtype=torch.bool)
    for pairs, owner, t in _scan(length, start, done, chunk, first_block=_FIRST_BLOCK):
        entry = pairs[owner]
        off = ~index.is_on(row_at(entry, t), probe[entry])
        hit = torch.full_like(pairs, _NOT_FOUND).scatter_reduce(0, owner[off], t[off], "amin")
        found = hit != _NOT_FOUND
        first[pairs[found]] = hit[found]
        done[pairs[found]] = True
    return first


def _scan(
    length: Tensor, start: Tensor, done: Tensor, chunk: int, first_block: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Walk positions start[p] .. length[p] - 1 of every pair in rounds of doubling block size.

    Yields (pairs, owner, t): the pairs of one piece of a round, and for each position visited,
    its pair (index into `pairs`) and t. A pair stops after the round in which the caller sets
    done[p]. A piece visits at most about `chunk` positions (twice that in the worst case).
    """
    position = start.clone()
    live = ((position < length) & ~done).nonzero().squeeze(1)
    block = min(first_block, chunk)
    while live.numel():
        steps = (length[live] - position[live]).clamp(max=block)
        for piece in _pieces(steps, chunk):
            pairs = live[piece]
            owner, offset = _expand(steps[piece])
            yield pairs, owner, position[pairs][owner] + offset
        position[live] += steps
        live = live[(position[live] < length[live]) & ~done[live]]
        block = min(block * 2, chunk)


def _pieces(sizes: Tensor, chunk: int) -> list[slice]:
    """Split consecutive items into slices whose sizes add up to about `chunk` (at least one item each)."""
    if sizes.numel() == 0:
        return []
    piece_of = (sizes.cumsum(0) - sizes) // max(chunk, 1)
    counts = torch.unique_consecutive(piece_of, return_counts=True)[1].tolist()
    bounds = list(itertools.accumulate(counts, initial=0))
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _expand(sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten items of the given sizes: (owner item, offset within the item) of every element."""
    owner = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
    offset = torch.arange(owner.numel(), device=sizes.device) - (sizes.cumsum(0) - sizes)[owner]
    return owner, offset


def pair_rho(atoms: Tensor, i: Tensor, j: Tensor, chunk: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """rho_ij = <d_i, d_j> in float64 for each pair, a chunk of pairs at a time."""
    pairs_per_step = max(1, chunk // max(atoms.shape[1], 1))
    dots = [
        (atoms[a].double() * atoms[b].double()).sum(1)
        for a, b in zip(i.split(pairs_per_step), j.split(pairs_per_step))
    ]
    return torch.cat(dots) if dots else torch.zeros(0, dtype=torch.float64, device=atoms.device)
