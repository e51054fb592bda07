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
- own size (held out): the evidence's denominator is the parent at its own size only where the
  parent latent's firing marks its direction at a consistent size: the coefficient of variation
  of <d_i, x_n - b> over i's own held-out tokens at most max_parent_cv (`own_size_cv`). A latent
  that fires where its direction is small or absent (a matching-pursuit atom picked on a small
  residual) has no own size, and its evidence reads anything;
- orientation (held out): the evidence must exceed the reverse orientation's significantly
  (`orientation_z`); one parent per child, the one its atom leans to most (`choose_parents`);
- price: splitting the child back, d_j -> d_j_perp with code sqrt(1 - rho^2) z_j and rho z_j
  moved onto i, keeps every reconstruction and raises the L1 term by
  lam * mu_j * (rho + sqrt(1 - rho^2) - 1) > 0 (`l1_price`, `split_child`): what keeps the
  absorption stable.

Score (one number per SAE, `absorption_score`): for each alive atom j that leans on another alive
atom (rho_min <= rho_ij < duplicate_rho: a latent the map could see absorbed), the largest rho_ij
times the share of j's audit tokens on which i is off, over j's candidate parents i that fire on
more audit tokens than j (0 where j has none); its mean over those leaning atoms, with the SE of a
mean over them. It is the part of a leaning latent's decoder, on average, that points at a more
frequent latent which stays off where it fires: 0 for a kept hierarchy (the parent fires with its
child) and for the parent's side of any pair, rho (up to ~0.7) for a child that absorbed its parent
on all of its tokens. The frequency rule is the one assumption: a parent fires wherever any child
does, so it fires more often than each child unless absorption took nearly all of its tokens.
Siblings that absorbed one parent lean on each other too (rho ~ rho_1 rho_2): the more frequent one
counts for the rarer as absorption, though not as a parent. Atoms that lean on none stay out of the
mean, so the score does not fall with the share of isolated latents, which differs by architecture.

Duplicates: alive pairs with rho >= duplicate_rho (one direction coded twice; merge them).
Antipodal dense pairs: rho <= -antipodal_rho, both on a large share of the tokens and rarely
together: a nonnegative code for one dense direction, normalise(d_i - d_j).

Candidates come from each alive atom's nearest atoms (largest and smallest rho) beyond the map's
thresholds, from blocked products of the atoms: no K x K table. Memory (bytes): blocks 6 * C
(4 * C in float32 alone; C = chunk_elements, at most GRAM_SIDE^2); candidates at most 20 * 8 * k * K (k = neighbours);
held-out sums 24 per measured ordered pair and 24 * K.

Pure tensor code: no TransformerLens / SAE-Lens import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.pairs import pair_rho
from opt_hooks.theory.products import FLOAT32, ProductFormat, bounded_products, fast_format, sampled_dots

DEFAULT_CHUNK_ELEMENTS = 1 << 22
GRAM_SIDE = 1024  # rows of the square Gram blocks: the fastest on CPU (measured 512-4096 at d = 768)
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
    max_parent_cv: float = 0.5  # the parent's own size: sd / mean of its direction on its own tokens at most this
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
        if not self.max_parent_cv > 0:
            raise ValueError(f"max_parent_cv is a coefficient of variation, > 0; got {self.max_parent_cv!r}")
        for name in ("min_evidence", "antipodal_min_share", "antipodal_max_overlap", "spread_z"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(eq=False)
class Neighbours:
    """For each alive atom j, its nearest alive atoms i (both signs): ordered pairs (i, j)."""

    i: Tensor  # (P,) int64
    j: Tensor  # (P,) int64
    rho: Tensor  # (P,) float64 <d_i, d_j>


def nearest_atoms(atoms: Tensor, alive: Tensor, k: int, *, above: float, below: float,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, screen: ProductFormat | None = None) -> Neighbours:
    """For every alive atom j, its k largest rho_ij (i != j, i alive) among those >= `above` and
    its k smallest among those <= `below`: the only neighbours the map reads (absorption and
    duplicates at rho >= min(rho_min, duplicate_rho) > 0, antipodal pairs at rho <= -antipodal_rho
    < 0); rho in float64.

    The Gram matrix is formed in square blocks (GRAM_SIDE rows, fewer when chunk_elements is
    smaller), on and above the diagonal only: it is symmetric, so each block serves its rows and,
    through its transpose, its columns. An entry is kept when its float32 value is within the float32
    rounding bound of a threshold, and its float64 rho decides: the result is that of an exact Gram
    matrix, without a top-k pass over every block. Each block is first formed in the `screen` format
    (default `fast_format`: bfloat16 on matrix units, else float32); only its entries within that
    format's bound of a threshold are formed in float32 (in bfloat16, a few per row at most, for
    thresholds several spreads beyond unrelated pairs), found through the rows whose largest or
    smallest entry lies there. Square blocks keep both
    operands small: a block of rows against all K atoms would repack a (d, K) operand at every
    product. Kept entries are few; whenever they outgrow 8 k per atom they are cut to the ones some
    atom ranks among its k, so memory stays O(k K) on any dictionary."""
    if not below < 0 < above:
        raise ValueError(f"nearest_atoms keeps rho >= above > 0 and rho <= below < 0, got {above=}, {below=}")
    ids = torch.nonzero(alive.to(atoms.device)).flatten()
    n, device = len(ids), atoms.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if n < 2:
        return Neighbours(empty, empty, torch.zeros(0, dtype=torch.float64, device=device))
    screen = fast_format(device) if screen is None else screen
    live = atoms[ids].float()
    fine = FLOAT32.dot_bound(atoms[ids])
    high, low = above - fine, below + fine  # float32 values kept
    # A float32 value beyond high or low lies within 2 fine + coarse of the screen's value
    coarse = 2 * fine + screen.dot_bound(live)
    screen_high, screen_low = above - coarse, below + coarse
    fast = live.to(screen.dtype)
    side = max(2, min(GRAM_SIDE, math.isqrt(chunk_elements)))
    starts = range(0, n, side)
    found: list[tuple[Tensor, Tensor, Tensor]] = []
    held, budget = 0, 8 * k * n
    # One set of block buffers, reused: a fresh (side, side) product per block, freed between small
    # kept pieces, fragments the C heap until the process runs out of memory (measured at K = 2^17)
    buffers: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    with bounded_products():
        for a, r0 in enumerate(starts):
            rows = fast[r0:r0 + side]
            for c0 in starts[a:]:
                cols = fast[c0:c0 + side]
                shape = (len(rows), len(cols))
                if shape not in buffers:
                    product = torch.empty(shape, dtype=screen.dtype, device=device)
                    buffers[shape] = (product, product if screen.dtype == torch.float32 else torch.empty(shape, device=device))
                product, gram = buffers[shape]
                torch.matmul(rows, cols.T, out=product)
                if gram is not product:
                    gram.copy_(product)  # float32 reductions run several times faster than bfloat16 ones
                if c0 == r0:
                    gram.diagonal().zero_()  # an atom with itself: never a neighbour
                hit = (gram.amax(1) >= screen_high) | (gram.amin(1) <= screen_low)
                hit_rows = hit.nonzero().flatten()
                values = gram[hit_rows]
                near = (values >= screen_high) | (values <= screen_low)
                if c0 == r0:  # the diagonal block: each unordered pair once
                    near &= torch.arange(len(cols), device=device)[None, :] > hit_rows[:, None]
                p, q = near.nonzero(as_tuple=True)
                p = hit_rows[p]
                if gram is product:
                    values = values[near]
                else:  # the screen's few entries near a threshold, in float32
                    values = (live[r0 + p] * live[c0 + q]).sum(1)
                kept = (values >= high) | (values <= low)
                found.append((p[kept] + r0, q[kept] + c0, values[kept]))
                held += len(found[-1][0])
                if held > budget:
                    found = [_prune(*_cat(found), k, high, low)]
                    held = len(found[0][0])
    p, q, value = _prune(*_cat(found), k, high, low)
    i, j, value = torch.cat([p, q]), torch.cat([q, p]), torch.cat([value, value])  # (neighbour, atom) both ways
    keep = _among_top(j, value, k, high, low)
    i, j = ids[i[keep]], ids[j[keep]]
    rho = pair_rho(atoms, i, j, chunk_elements)
    exact = (rho >= above) | (rho <= below)
    return Neighbours(i[exact], j[exact], rho[exact])


def _cat(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def _prune(p: Tensor, q: Tensor, value: Tensor, k: int, high: float, low: float) -> tuple[Tensor, Tensor, Tensor]:
    """The unordered pairs {p, q} that p or q ranks among its k on either side."""
    keep = _among_top(torch.cat([q, p]), torch.cat([value, value]), k, high, low)
    keep = keep[:len(p)] | keep[len(p):]
    return p[keep], q[keep], value[keep]


def _among_top(atom: Tensor, value: Tensor, k: int, high: float, low: float) -> Tensor:
    """Whether each entry is among its atom's k largest values >= high or k smallest <= low."""
    keep = torch.zeros(len(atom), dtype=torch.bool, device=atom.device)
    for on_side, score in ((value >= high, value), (value <= low, -value)):
        score = torch.where(on_side, score, -math.inf)
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(atom[order], stable=True)]  # by atom, each atom's best first
        grouped = atom[order]
        rank = torch.arange(len(order), device=atom.device) - torch.searchsorted(grouped, grouped)
        keep[order] |= (rank < k) & on_side[order]
    return keep


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
        s = sampled_dots(centred, atoms, r, c)
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
        s = sampled_dots(centred, atoms, token, parent[pair])
        out.pair_count.index_add_(0, pair, torch.ones_like(pair))
        out.pair_sum.index_add_(0, pair, s)
        out.pair_sum_sq.index_add_(0, pair, s * s)
    return out


@dataclass(eq=False)
class EvidenceRatio:
    """evidence = mean_T s / mean_own s with its delta-method SE, and a one-sided z against a
    threshold: (evidence - threshold) / se."""

    value: Tensor  # (P,) float64, NaN where undefined
    se: Tensor  # (P,)
    z: Tensor  # (P,)


def _mean_and_variance(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sample variance (n - 1) from streamed count, sum and sum of squares; the variance
    NaN with fewer than two values."""
    n = count.double()
    mean = total / n
    var = ((total_sq - n * mean**2) / (n - 1)).clamp(min=0)
    return mean, torch.where(n >= 2, var, math.nan)


def evidence_ratio(pair_count: Tensor, pair_sum: Tensor, pair_sum_sq: Tensor, own_count: Tensor, own_sum: Tensor,
                   own_sum_sq: Tensor, threshold: float) -> EvidenceRatio:
    """The ratio of two held-out means and its SE (the two token sets are disjoint: the parent is
    off on the first, on on the second)."""
    def mean_var(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = _mean_and_variance(count, total, total_sq)
        return mean, var / count.double()  # variance of the mean

    m_t, v_t = mean_var(pair_count, pair_sum, pair_sum_sq)
    m_a, v_a = mean_var(own_count, own_sum, own_sum_sq)
    valid = (m_a > 0) & (pair_count > 0)
    value = torch.where(valid, m_t / m_a, math.nan)
    se = torch.sqrt(v_t / m_a**2 + value**2 * v_a / m_a**2)
    se = torch.where(valid, se, math.nan)
    z = (value - threshold) / se
    z = torch.where(se == 0, torch.where(value >= threshold, math.inf, -math.inf), z)
    return EvidenceRatio(value, se, z)


def own_size_cv(own_count: Tensor, own_sum: Tensor, own_sum_sq: Tensor) -> Tensor:
    """Per latent, the coefficient of variation (sample sd / mean) of its direction's component
    <d_i, x_n - b> over its own held-out tokens, from the sums `held_out_evidence` keeps; NaN where
    it has no own size (fewer than two tokens, or a mean <= 0), so that no comparison passes.
    The parent's own size is the evidence's denominator: it means the parent "at its own size"
    only where the latent fires where its direction is, at a consistent size."""
    mean, var = _mean_and_variance(own_count, own_sum, own_sum_sq)
    return torch.where(mean > 0, var.sqrt() / mean, math.nan)  # NaN variance (n < 2) stays NaN


def pair_index(parent: Tensor, child: Tensor, n_features: int, want_parent: Tensor, want_child: Tensor) -> Tensor:
    """The index of each wanted ordered pair (want_parent, want_child) among the pairs
    (parent, child), -1 where it is absent."""
    key = parent * n_features + child
    order = torch.argsort(key)
    wanted = want_parent * n_features + want_child
    if len(key) == 0:
        return torch.full_like(wanted, -1)
    at = torch.searchsorted(key[order], wanted).clamp(max=len(key) - 1)
    return torch.where(key[order][at] == wanted, order[at], -1)


def reverse_of(parent: Tensor, child: Tensor, n_features: int) -> Tensor:
    """For each ordered pair p = (i, j), the index of (j, i) among the pairs, -1 where it is absent."""
    return pair_index(parent, child, n_features, child, parent)


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


def parent_covers_child(parent: Tensor, child: Tensor, co: Tensor, count: Tensor, passes: Tensor) -> Tensor:
    """Per candidate pair (i, j): does the parent's feature, as far as the map sees it, fire on
    more audit tokens than the child's? A parent fires wherever any of its children does.
    Absorption moves the parent's tokens onto its children's latents, so latent i alone can
    undercount it (a parent with three children, each on half of its tokens, keeps 1/8 of them on
    its own latent). The map also sees the parent on the tokens of a sibling k of j: a latent whose
    pair (i, k) passes and which is itself a candidate partner of j, (k, j) among the pairs
    (siblings that absorbed one parent lean on each other, rho ~ rho_ik rho_ij). So i covers j when
    max(n_i, max over such k of n_i + n_k - n_ik) > n_j, with the exact audit counts (n_ik the
    co-count). The score's frequency rule (`absorption_score`), widened by the child's siblings;
    an unrelated latent that passes with i does not count, as it says nothing about i's feature."""
    n = count.to(torch.int64)
    covered = n[parent].clone()
    tested = torch.nonzero(passes).flatten()  # the pairs (i, j) that a sibling could cover
    if len(tested):
        by_child = torch.argsort(child, stable=True)
        sorted_child = child[by_child]
        # every partner k of j, as pairs (k, j): each tested pair expands to its child's partners
        # (temporary memory: the passing pairs times their children's partners, a few per pair)
        first = torch.searchsorted(sorted_child, child[tested])
        reps = torch.searchsorted(sorted_child, child[tested], right=True) - first
        pair = tested.repeat_interleave(reps)
        offset = torch.arange(len(pair), device=n.device) - (reps.cumsum(0) - reps).repeat_interleave(reps)
        k = parent[by_child[first.repeat_interleave(reps) + offset]]
        i = parent[pair]
        ik = pair_index(parent, child, len(n), i, k)  # the pair (i, k), -1 where it is absent
        sibling = (k != i) & (ik >= 0) & passes[ik.clamp(min=0)]
        union = n[i] + n[k] - co[ik.clamp(min=0)]  # |i or k| on the audit tokens
        best = torch.full_like(covered, -1).scatter_reduce(0, pair[sibling], union[sibling], "amax")
        covered = torch.maximum(covered, best)
    return covered > n[child]


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


@dataclass
class AbsorptionScore:
    """The layer's label-free absorption score (module docstring), float64."""

    value: float  # mean over the leaning atoms of a_j (module docstring); 0 (SE 0) when none leans; NaN: none alive
    se: float  # its standard error over the leaning atoms (NaN with fewer than two)
    n_latents: int  # alive atoms that lean on another alive atom: the ones averaged over
    n_absorbing: int  # of those, atoms with a more frequent candidate parent off on some of their tokens (a_j > 0)


def absorption_score(parent: Tensor, child: Tensor, rho: Tensor, co: Tensor, count: Tensor,
                     leaning: Tensor) -> AbsorptionScore:
    """From the map's candidate pairs (parent i, child j, rho_ij, co-count n_ij on the audit tokens),
    every atom's audit count n_j and the mask of alive atoms that lean on another alive atom:
    a_j = max rho_ij (n_j - n_ij) / n_j over j's candidates with n_i > n_j (0 where none), averaged
    over the leaning atoms. Exact counts in, so the score is the same under any batch split, rank
    merge or resume."""
    count = count.double()
    if not bool((count > 0).any()):
        return AbsorptionScore(math.nan, math.nan, 0, 0)
    leaning = leaning & (count > 0)
    a = torch.zeros(len(count), dtype=torch.float64, device=count.device)
    if len(child):
        off = (count[child] - co.double()) / count[child]
        more_frequent = count[parent] > count[child]  # a parent fires wherever any of its children does
        a = a.scatter_reduce(0, child, torch.where(more_frequent, rho.double() * off, 0.0).clamp(min=0), "amax")
    a = a[leaning]
    n = len(a)
    if n == 0:  # no atom leans on another: nothing the map could see absorbed, exactly
        return AbsorptionScore(0.0, 0.0, 0, 0)
    se = float(a.std() / math.sqrt(n)) if n > 1 else math.nan
    return AbsorptionScore(float(a.mean()), se, n, int((a > 0).sum()))
