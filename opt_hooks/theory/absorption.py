"""The label-free map of latent-pair structure (THEORY.md section 6): absorption, duplicates,
antipodal dense pairs.

Absorption. A trained L1 SAE resolves a hierarchy by absorption: the child latent j's atom takes
in the parent's direction, d_j = rho d_i + sqrt(1 - rho^2) d_j_perp, and the parent latent i is
off on the child's tokens although the input there carries d_i. C2 is then silent (j fires
without i), so this module looks for the signature itself:

- geometry: rho_ij = <d_i, d_j> well above the spread of unrelated atom pairs;
- counts (audit tokens, exact): fraction = share of the child's tokens where the parent is off;
- evidence (held-out tokens): on the held-out tokens where j is on and i is off, the input's
  component along the parent's atom, <d_i, x_n - b>, as a share of its mean where i fires. An
  absorbed parent is present at its own size (evidence ~1); in the reverse orientation (child as
  "parent") and between two siblings that absorbed the same parent the share is ~rho^2, and for
  an unrelated pair it is ~rho times a ratio of code sizes;
- orientation (held out): the evidence must exceed the reverse orientation's significantly
  (`orientation_z`); one parent per child, the one its atom leans to most (`choose_parents`);
- price: splitting the child back, d_j -> d_j_perp with code sqrt(1 - rho^2) z_j and rho z_j
  moved onto i, keeps every reconstruction and raises the L1 term by
  lam * mu_j * (rho + sqrt(1 - rho^2) - 1) > 0 (`l1_price`, `split_child`): what keeps the
  absorption stable.

Duplicates: alive pairs with rho >= duplicate_rho (one direction coded twice; merge them).
Antipodal dense pairs: rho <= -antipodal_rho, both on a large share of the tokens and rarely
together: a nonnegative code for one dense direction, normalise(d_i - d_j).

Candidates come from each alive atom's nearest atoms (largest and smallest rho), from blocked
products of the atoms: no K x K table. Memory (bytes): blocks 4 * C (C = chunk_elements);
candidates 24 * 2 * k * K (k = neighbours); held-out sums 24 per measured ordered pair and 24 * K.

Pure tensor code: no TransformerLens / SAE-Lens import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 22
SPREAD_SAMPLE = 20_000  # random alive atom pairs whose rho estimate the spread of unrelated pairs
MAD_TO_SD = 1.4826  # median |rho| * this: the sd of a normal spread, robust to the structured pairs


@dataclass(frozen=True)
class MapOptions:
    """Thresholds of the map (AuditOptions carries one); defaults chosen on the validation
    worlds (docs/VALIDATION.md, section E)."""

    neighbours: int = 8  # nearest atoms per alive atom searched on each side (largest and smallest rho)
    spread_z: float = 4.0  # a candidate's rho must exceed this many robust sds of unrelated pairs' rho
    min_rho: float = 0.1  # ... and at least this
    min_evidence: float = 0.5  # the parent's direction on the child's tokens: at least this share of its own size
    duplicate_rho: float = 0.9  # rho at or above: a duplicate, never an absorption
    antipodal_rho: float = 0.9  # rho at or below minus this: a candidate antipodal pair
    antipodal_min_share: float = 0.05  # each of an antipodal pair fires on at least this share of tokens
    antipodal_max_overlap: float = 0.05  # ... and on at most this share of the rarer one's tokens together

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        for name in ("min_rho", "duplicate_rho", "antipodal_rho"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} is a cosine in (0, 1], got {getattr(self, name)!r}")
        if not self.min_rho < self.duplicate_rho:
            raise ValueError("min_rho must be below duplicate_rho: absorption lies between the two")
        for name in ("min_evidence", "antipodal_min_share", "antipodal_max_overlap", "spread_z"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(eq=False)
class Neighbours:
    """For each alive atom j, its nearest alive atoms i (both signs): ordered pairs (i, j)."""

    i: Tensor  # (P,) int64
    j: Tensor  # (P,) int64
    rho: Tensor  # (P,) float64 <d_i, d_j>


def nearest_atoms(atoms: Tensor, alive: Tensor, k: int, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Neighbours:
    """The k largest and the k smallest rho_ij (i != j) of every alive atom j among the alive
    atoms, from square blocks of products (about chunk_elements each, float32), every atom's
    running top k merged block by block; rho recomputed in float64. The Gram matrix is symmetric,
    so only the blocks on and above the diagonal are computed, each updating its rows and, through
    its transpose, its columns. Square blocks keep both operands small: a block of rows against
    all K atoms would repack a (d, K) operand at every product."""
    ids = torch.nonzero(alive.to(atoms.device)).flatten()
    n, device = len(ids), atoms.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if n < 2:
        return Neighbours(empty, empty, torch.zeros(0, dtype=torch.float64, device=device))
    live = atoms[ids].float()
    k = min(k, n - 1)
    side = max(k + 1, math.isqrt(chunk_elements))
    starts = list(range(0, n, side))
    def no_top(r0: int) -> tuple[Tensor, Tensor]:
        size = min(side, n - r0)
        return torch.empty(size, 0, device=device), torch.empty(size, 0, dtype=torch.int64, device=device)

    high, low = [no_top(r0) for r0 in starts], [no_top(r0) for r0 in starts]
    for a, r0 in enumerate(starts):
        rows = torch.arange(r0, min(r0 + side, n), device=device)
        for b in range(a, len(starts)):
            cols = torch.arange(starts[b], min(starts[b] + side, n), device=device)
            gram = live[rows] @ live[cols].T  # (rows, cols)
            diagonal = (torch.arange(len(rows), device=device),) * 2 if a == b else None
            for tops, largest, own in ((high, True, -math.inf), (low, False, math.inf)):
                if diagonal is not None:  # not its own neighbour
                    gram[diagonal] = own
                v, at = torch.topk(gram, min(k, len(cols)), dim=1, largest=largest)  # for the rows
                tops[a] = _merge_top(*tops[a], v, cols[at], k, largest=largest)
                if a != b:  # for the columns, down the block: no transposed copy
                    v, at = torch.topk(gram, min(k, len(rows)), dim=0, largest=largest)
                    tops[b] = _merge_top(*tops[b], v.T, rows[at.T], k, largest=largest)
    found_i = torch.cat([torch.cat([h[1], l_[1]], dim=1).flatten() for h, l_ in zip(high, low)])
    found_j = torch.arange(n, device=device).repeat_interleave(2 * k)
    i, j = ids[found_i], ids[found_j]
    key = torch.unique(j * atoms.shape[0] + i)  # one entry per ordered pair (top and bottom may meet)
    i, j = key % atoms.shape[0], key // atoms.shape[0]
    return Neighbours(i, j, pair_rho(atoms, i, j, chunk_elements))


def _merge_top(values: Tensor, index: Tensor, new_values: Tensor, new_index: Tensor, k: int, *,
               largest: bool) -> tuple[Tensor, Tensor]:
    """Each row's k largest (or smallest) of its running top and a block's top: values and atom ids."""
    values, index = torch.cat([values, new_values], dim=1), torch.cat([index, new_index], dim=1)
    if values.shape[1] <= k:
        return values, index
    v, at = torch.topk(values, k, dim=1, largest=largest)
    return v, torch.gather(index, 1, at)


def pair_rho(atoms: Tensor, i: Tensor, j: Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """<d_i, d_j> in float64 for each pair, in chunks."""
    step = max(1, chunk_elements // max(atoms.shape[1], 1))
    out = [(atoms[a].double() * atoms[b].double()).sum(-1) for a, b in zip(i.split(step), j.split(step))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=atoms.device)


def rho_spread(atoms: Tensor, alive: Tensor, *, n_pairs: int = SPREAD_SAMPLE, seed: int = 0) -> float:
    """Robust sd of rho over random pairs of alive atoms (1.4826 * median |rho|): the spread of
    unrelated pairs, insensitive to the few structured ones. Seeded: the same on every rank."""
    ids = torch.nonzero(alive.cpu()).flatten()
    if len(ids) < 2:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    a = ids[torch.randint(len(ids), (n_pairs,), generator=gen)]
    b = ids[torch.randint(len(ids), (n_pairs,), generator=gen)]
    keep = a != b
    rho = pair_rho(atoms, a[keep].to(atoms.device), b[keep].to(atoms.device))
    return float(rho.abs().median()) * MAD_TO_SD if len(rho) else 0.0


def l1_price(rho: Tensor, mu_child: Tensor, lam: float) -> Tensor:
    """lam * mu_j * (rho + sqrt(1 - rho^2) - 1): the rise of L when the child is split back
    (THEORY.md section 6), for 0 < rho < 1."""
    rho = rho.double()
    return lam * mu_child.double() * (rho + torch.sqrt((1 - rho**2).clamp(min=0)) - 1)


def split_child(atoms: Tensor, z: Tensor, parent: int, child: int) -> tuple[Tensor, Tensor]:
    """The split of THEORY.md section 6: d_child -> d_perp (its part orthogonal to d_parent,
    normalised), z_child -> sqrt(1 - rho^2) z_child and z_parent += rho z_child. Every
    reconstruction is kept; the L1 term rises by `l1_price`. Needs 0 < rho < 1."""
    atoms, z = atoms.double().clone(), z.double().clone()
    rho = float(atoms[parent] @ atoms[child])
    if not 0 < rho < 1:
        raise ValueError(f"the split needs 0 < rho < 1 (a nonnegative code moved onto the parent), got {rho}")
    own = math.sqrt(1 - rho**2)
    atoms[child] = (atoms[child] - rho * atoms[parent]) / own
    z[:, parent] += rho * z[:, child]
    z[:, child] *= own
    return atoms, z


@dataclass(eq=False)
class HeldOutEvidence:
    """Held-out sums of s_n = <d_i, x_n - b>: per ordered pair (i, j) over the tokens where j is
    on and i is off; per feature f over the tokens where f is on (the parent's own size)."""

    pair_count: Tensor  # (P,) int64
    pair_sum: Tensor  # (P,) float64
    pair_sum_sq: Tensor  # (P,) float64
    own_count: Tensor  # (K,) int64
    own_sum: Tensor  # (K,) float64
    own_sum_sq: Tensor  # (K,) float64


def held_out_evidence(centred: Tensor, rows: Tensor, cols: Tensor, z: Tensor, atoms: Tensor, parent: Tensor,
                      child: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> HeldOutEvidence:
    """The sums of `HeldOutEvidence` for one batch: centred = x - b (n, d), (rows, cols) the
    batch's active entries, z (n, K) its codes, (parent, child) the measured ordered pairs
    sorted by child. Each active (n, j) is expanded to the pairs whose child is j."""
    n_features, device = atoms.shape[0], atoms.device
    f64 = dict(dtype=torch.float64, device=device)
    out = HeldOutEvidence(torch.zeros(len(parent), dtype=torch.int64, device=device), torch.zeros(len(parent), **f64),
                          torch.zeros(len(parent), **f64), torch.zeros(n_features, dtype=torch.int64, device=device),
                          torch.zeros(n_features, **f64), torch.zeros(n_features, **f64))
    if len(rows) == 0:
        return out
    d = atoms.shape[1]
    step = max(1, chunk_elements // max(d, 1))
    is_parent = torch.zeros(n_features, dtype=torch.bool, device=device)
    is_parent[parent] = True
    own = is_parent[cols]
    own_rows, own_cols = rows[own], cols[own]
    for r, c in zip(own_rows.split(step), own_cols.split(step)):
        s = _dots(centred, atoms, r, c)
        out.own_count.index_add_(0, c, torch.ones_like(c))
        out.own_sum.index_add_(0, c, s)
        out.own_sum_sq.index_add_(0, c, s * s)
    per_child = torch.bincount(child, minlength=n_features)
    start = torch.zeros(n_features, dtype=torch.int64, device=device)
    start[1:] = per_child.cumsum(0)[:-1]
    expand = per_child[cols]
    entries = torch.nonzero(expand).flatten()
    if len(entries) == 0:
        return out
    cum = expand[entries].cumsum(0)  # chunks of entries whose expansion stays near `step` pairs
    cuts = torch.searchsorted(cum, torch.arange(step, max(int(cum[-1]), step), step, device=device), right=True)
    for e in torch.tensor_split(entries, cuts.cpu()):
        if len(e) == 0:
            continue
        reps = expand[e]
        entry = e.repeat_interleave(reps)
        offset = torch.arange(len(entry), device=device) - (reps.cumsum(0) - reps).repeat_interleave(reps)
        pair = start[cols[entry]] + offset
        token = rows[entry]
        off = z[token, parent[pair]] == 0
        pair, token = pair[off], token[off]
        s = _dots(centred, atoms, token, parent[pair])
        out.pair_count.index_add_(0, pair, torch.ones_like(pair))
        out.pair_sum.index_add_(0, pair, s)
        out.pair_sum_sq.index_add_(0, pair, s * s)
    return out


def _dots(centred: Tensor, atoms: Tensor, rows: Tensor, features: Tensor) -> Tensor:
    """<d_f, x_n - b> for each (n, f), float64."""
    return (centred[rows].double() * atoms[features].double()).sum(-1)


@dataclass(eq=False)
class EvidenceRatio:
    """evidence = mean_T s / mean_own s with its delta-method SE, and a one-sided z against a
    threshold: (evidence - threshold) / se."""

    value: Tensor  # (P,) float64, NaN where undefined
    se: Tensor  # (P,)
    z: Tensor  # (P,)


def evidence_ratio(pair_count: Tensor, pair_sum: Tensor, pair_sum_sq: Tensor, own_count: Tensor, own_sum: Tensor,
                   own_sum_sq: Tensor, threshold: float) -> EvidenceRatio:
    """The ratio of two held-out means and its SE (the two token sets are disjoint: the parent is
    off on the first, on on the second)."""
    def mean_var(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
        n = count.double()
        mean = total / n
        var = ((total_sq - n * mean**2) / (n - 1)).clamp(min=0) / n  # variance of the mean
        return mean, torch.where(n >= 2, var, math.nan)

    m_t, v_t = mean_var(pair_count, pair_sum, pair_sum_sq)
    m_a, v_a = mean_var(own_count, own_sum, own_sum_sq)
    valid = (m_a > 0) & (pair_count > 0)
    value = torch.where(valid, m_t / m_a, math.nan)
    se = torch.sqrt(v_t / m_a**2 + value**2 * v_a / m_a**2)
    se = torch.where(valid, se, math.nan)
    z = (value - threshold) / se
    z = torch.where(se == 0, torch.where(value >= threshold, math.inf, -math.inf), z)
    return EvidenceRatio(value, se, z)


def reverse_of(parent: Tensor, child: Tensor, n_features: int) -> Tensor:
    """For each ordered pair p = (i, j), the index of (j, i) among the pairs, -1 where it is absent."""
    key = parent * n_features + child
    order = torch.argsort(key)
    wanted = child * n_features + parent
    at = torch.searchsorted(key[order], wanted).clamp(max=max(len(key) - 1, 0))
    found = key[order][at] == wanted if len(key) else torch.zeros(0, dtype=torch.bool)
    return torch.where(found, order[at], -1)


def orientation_z(ratio: EvidenceRatio, reverse: Tensor) -> Tensor:
    """(evidence - reverse evidence) / the SE of the difference, per ordered pair: the orientation
    measured, not assumed. The child's atom carries the parent at the parent's own size
    (evidence ~1), the reverse sees ~rho^2 of it; two siblings, or a pair with no hierarchy in it,
    look alike both ways. -inf where the reverse was not measured (the would-be parent fires on
    all of the child's audit tokens: C2's territory, an unabsorbed hierarchy the other way round)."""
    has = reverse >= 0
    rev = reverse.clamp(min=0)
    diff = ratio.value - ratio.value[rev]
    se = torch.sqrt(ratio.se**2 + ratio.se[rev] ** 2)
    z = torch.where(se > 0, diff / se, torch.where(diff > 0, math.inf, -math.inf))
    return torch.where(has & torch.isfinite(ratio.value[rev]), torch.nan_to_num(z, nan=-math.inf), -math.inf)


def choose_parents(child: Tensor, rho: Tensor, passes: Tensor) -> Tensor:
    """One parent per child among the ordered pairs that pass every test: the candidate with the
    largest rho (a child's atom leans most towards its own parent; siblings lean towards each other
    only through it, rho ~ the product). Ties go to the lower pair index. Pair indices, ascending."""
    keep = torch.nonzero(passes).flatten()
    keep = keep[torch.argsort(-rho[keep], stable=True)]
    keep = keep[torch.argsort(child[keep], stable=True)]
    first = torch.ones(len(keep), dtype=torch.bool, device=child.device)
    first[1:] = child[keep][1:] != child[keep][:-1]
    return torch.sort(keep[first]).values
