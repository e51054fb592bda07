"""Pass-1 statistics of THEORY.md section 4, streamed and mergeable.

`LayerStats.update(x, z, token_index, weight)` takes one batch in theory units (see
docs/ARCHITECTURE.md) and keeps only sums, counts, minima, maxima, the worst residuals and
the sparse codes. Per-batch products run in `objective.compute_dtype` (float32, or float64
when the input is float64 or too large for float32); every accumulator is float64 or int64.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opt_hooks.theory.accumulator import Accumulator
from opt_hooks.theory.codes import CSR, SparseBatch, SparseCodes
from opt_hooks.theory.objective import compute_dtype


@dataclass
class LamTotals:
    """The statistics that need lam (THEORY.md section 4), over the tokens they were summed on."""

    over_count: Tensor  # (K,) int64: inactive tokens where w_n <d_i, r_n> > lam / 2
    over_excess: Tensor  # (K,) float64: sum of w_n <d_i, r_n> - lam / 2 over those tokens
    n_over_half_lam: int  # tokens with w_n ||r_n|| > lam / 2

    @property
    def inactive_gain(self) -> Tensor:
        """(K,) sum over inactive tokens of max(0, 2 w_n <d_i, r_n> - lam): C4's inactive terms."""
        return 2 * self.over_excess


@dataclass
class LayerStatistics:
    """A computed snapshot of `LayerStats` (float64 / int64 tensors). With token weights w_n
    every sum over a squared error's terms carries w_n (w_n = 1 for unweighted tokens)."""

    n_tokens: int
    active_count: Tensor  # (K,) int64
    sum_z: Tensor  # (K,)
    sum_z2: Tensor  # (K,) sum_n w_n z_in^2
    min_z: Tensor  # (K,) over all tokens; +inf when no token was seen
    max_z: Tensor  # (K,)
    sum_z_rnorm: Tensor  # (K,) sum_n z_in w_n ||r_n||
    sum_z_r: Tensor  # (K, d) sum_n z_in w_n r_n
    sum_r: Tensor  # (d,) sum_n w_n r_n
    sum_w: float  # sum_n w_n
    sum_rnorm: float  # sum_n w_n ||r_n||
    sum_rnorm2: float  # sum_n w_n ||r_n||^2
    worst_rnorm: Tensor  # (k,) largest w_n ||r_n||, descending
    worst_token: Tensor  # (k,) their token indices
    worst_residual: Tensor  # (k, d) their residual vectors r_n
    worst_weight: Tensor  # (k,) their weights w_n
    codes: CSR | None  # with codes.aux = w_n <d_i, r_n> of every entry, codes.weight = w_n
    lam_totals: LamTotals | None  # when lam was known while streaming
    # skip transcoders only (THEORY.md section 8, C7), None otherwise: x_n is the transcoder's input
    sum_rx: Tensor | None = None  # (d, d_in) sum_n w_n r_n x_n^T
    sum_xx: Tensor | None = None  # (d_in, d_in) sum_n w_n x_n x_n^T
    sum_rnorm_xnorm: float = 0.0  # sum_n w_n ||r_n|| ||x_n||

    @property
    def mu(self) -> Tensor:
        """mu_i = (1/N) sum_n z_in, zeros included."""
        return self.sum_z / max(self.n_tokens, 1)

    @property
    def dead(self) -> Tensor:
        return self.active_count == 0

    @property
    def active_projections(self) -> Tensor:
        """w_n <d_i, r_n> over every active (n, i): the lam estimate and C4's active terms."""
        if self.codes is None or self.codes.aux is None:
            return torch.zeros(0, dtype=torch.float64)
        return self.codes.aux


def lam_terms(r: Tensor, atoms: Tensor, lam: float, batch: SparseBatch,
              chunk_elements: int = 1 << 21) -> tuple[Tensor, Tensor, int]:
    """One batch's lam statistics: per feature, the count of inactive tokens where
    <d_i, r_n> > lam / 2 and the sum of <d_i, r_n> - lam / 2 over them; and the number of
    tokens with ||r_n|| > lam / 2. Weighted tokens pass r = w_n r_n (THEORY.md section 1).

    The (K, n) products are formed a block of features at a time, small enough to stay in
    cache while they are reduced; the active entries are zeroed in the block before it is
    summed, so each token is counted on one side exactly. No (n, K) matrix or inactive mask is
    ever built."""
    half = lam / 2
    n_features = atoms.shape[0]
    count = torch.empty(n_features, dtype=torch.int64, device=r.device)
    excess = torch.empty(n_features, dtype=torch.float64, device=r.device)
    by_feature = batch.by_feature[0]
    cols, rows = batch.cols[by_feature], batch.rows[by_feature]
    step = max(1, chunk_elements // max(r.shape[0], 1))
    count_dtype = r.dtype if r.shape[0] < 2**24 else torch.float64  # sums of ones, exact below 2^24 in float32
    starts = torch.arange(0, n_features, step, device=r.device)
    bounds = torch.searchsorted(cols, torch.cat([starts, starts.new_tensor([n_features])])).tolist()
    for block, start in enumerate(starts.tolist()):
        stop = min(start + step, n_features)
        # (k, n): q where q > lam/2 >= 0, else 0, in one pass. Its row sums in float64 (so that any
        # split into batches sums alike), its counts as sums of signs, exact below 2^24 tokens in
        # float32: a bool reduction of the block cost a quarter of its product
        over = torch.nn.functional.threshold_(atoms[start:stop] @ r.T, half, 0.0)
        entries = slice(bounds[block], bounds[block + 1])
        over[cols[entries] - start, rows[entries]] = 0.0  # the active entries: C4's other side
        total = over.sum(1, dtype=torch.float64)
        n_over = over.sign_().sum(1, dtype=count_dtype).double()
        count[start:stop] = n_over.long()
        excess[start:stop] = total - half * n_over
    return count, excess.clamp(min=0), int((r.norm(dim=-1) > half).sum())


class TokenBatch:
    """A batch of tokens as the statistics and certificates read them: codes, residuals, the
    codes' nonzero entries with w_n <d_i, r_n> at each; the lam terms (one dense (n, K)
    product) only when asked for.

    `weight` (n,) holds each token's weight w_n > 0 (THEORY.md section 1: normalising SAEs),
    None for w_n = 1. Wherever a squared error enters, the batch offers it weighted: `wr` is
    w_n r_n (r itself when unweighted) and `projections` / `q` are w_n <d_i, r_n>.

    `inputs` (n, d_in): a skip transcoder's inputs x_n, which its skip term W_skip x_n reads
    (the C7 statistics and certificate); None for every other dictionary."""

    def __init__(self, x: Tensor, z: Tensor, atoms: Tensor, bias: Tensor, lam: float | None = None,
                 weight: Tensor | None = None, inputs: Tensor | None = None) -> None:
        self.entries = SparseBatch(z)
        compute = compute_dtype(x, self.entries.values, bias)  # the nonzeros bound |z| as well
        self.atoms = atoms.to(compute)
        self.r = x.to(compute) - bias.to(compute) - self.entries.matrix(compute) @ self.atoms
        self.weight = None if weight is None else weight.to(compute)
        self.wr = self.r if self.weight is None else self.r * self.weight[:, None]
        self.projections = self.entries.projections(self.wr, self.atoms)
        self.z = z.to(compute)  # (n, K) in the compute dtype
        self.lam = lam
        self.inputs = None if inputs is None else inputs.to(compute)

    @functools.cached_property
    def totals(self) -> LamTotals:
        if self.lam is None:
            raise ValueError("the lam terms of a TokenBatch need lam")
        return LamTotals(*lam_terms(self.wr, self.atoms, self.lam, self.entries))

    @property
    def n_tokens(self) -> int:
        return self.z.shape[0]

    def w(self, rows: Tensor | slice = slice(None)) -> Tensor | float:
        """w_n of the given tokens in float64, or 1.0 when the batch is unweighted."""
        return 1.0 if self.weight is None else self.weight[rows].double()

    def weights(self) -> Tensor:
        """(n,) float64 w_n of every token, ones when the batch is unweighted (for sums over tokens)."""
        if self.weight is None:
            return torch.ones(self.n_tokens, dtype=torch.float64, device=self.r.device)
        return self.weight.double()

    def q(self, features: Tensor) -> Tensor:
        """(n, F) w_n <d_i, r_n> for the requested features only."""
        return self.wr @ self.atoms[features].T


class LamStatistics(Accumulator):
    """An accumulator that may also sum the lam statistics (`lam_terms`) of its tokens."""

    def add_lam_states(self, n_features: int, device: torch.device) -> None:
        self.add_state("over_count", torch.zeros(n_features, dtype=torch.int64, device=device), "sum")
        self.add_state("over_excess", torch.zeros(n_features, dtype=torch.float64, device=device), "sum")
        self.add_state("n_over_half_lam", torch.zeros((), dtype=torch.int64, device=device), "sum")

    def add_lam_terms(self, over_count: Tensor, over_excess: Tensor, n_over_half_lam: int) -> None:
        self.over_count += over_count
        self.over_excess += over_excess
        self.n_over_half_lam += n_over_half_lam

    def lam_totals(self) -> LamTotals:
        return LamTotals(self.over_count.clone(), self.over_excess.clone(), int(self.n_over_half_lam))


class LayerStats(LamStatistics):
    """Streaming pass-1 statistics for one SAE (K features, d input dimensions).

    Per batch the costs are one scan of the (n, K) codes for their nonzeros and products over
    those nonzeros (nnz x d), except for the lam statistics: C4's inactive terms need
    <d_i, r_n> for every feature and token, one dense (n, K) product, computed when `lam` is
    given (else the engine collects them on a second look once lam is estimated).
    """

    def __init__(
        self,
        atoms: Tensor,
        bias: Tensor,
        *,
        lam: float | None = None,
        worst_k: int = 16,
        keep_codes: bool = True,
        skip_inputs: int | None = None,
    ) -> None:
        """`skip_inputs`: a skip transcoder's input width d_in; its batches then carry the inputs
        x_n and the C7 sums are streamed (THEORY.md section 8)."""
        super().__init__()
        if atoms.ndim != 2 or bias.shape != atoms.shape[1:]:
            raise ValueError(
                f"atoms must be (K, d) and bias (d,); got {tuple(atoms.shape)} and {tuple(bias.shape)}"
            )
        n_features, d = atoms.shape
        dev = atoms.device
        self.atoms, self.bias, self.lam = atoms, bias, lam
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
        self.add_state("sum_w", torch.zeros((), **f64), "sum")
        self.add_state("sum_rnorm", torch.zeros((), **f64), "sum")
        self.add_state("sum_rnorm2", torch.zeros((), **f64), "sum")
        if lam is not None:
            self.add_lam_states(n_features, dev)
        self.skip_inputs = skip_inputs
        if skip_inputs is not None:
            self.add_state("sum_rx", torch.zeros(d, skip_inputs, **f64), "sum")
            self.add_state("sum_xx", torch.zeros(skip_inputs, skip_inputs, **f64), "sum")
            self.add_state("sum_rnorm_xnorm", torch.zeros((), **f64), "sum")
        self.worst = WorstResiduals(worst_k, d, dev)
        self.codes = SparseCodes(n_features, device=dev) if keep_codes else None
        self._next_token = 0

    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None, weight: Tensor | None = None,
               inputs: Tensor | None = None) -> None:
        """Add a batch: x (n, d) internal inputs, z (n, K) codes in theory units, `weight` (n,)
        the tokens' weights w_n (None: all 1), `inputs` (n, d_in) a skip transcoder's inputs."""
        if (inputs is None) != (self.skip_inputs is None):
            raise ValueError(
                "a skip transcoder's batches carry its inputs x_n (and only its batches do): "
                f"this LayerStats has skip_inputs={self.skip_inputs}, the batch "
                f"{'has no' if inputs is None else 'has'} inputs"
            )
        n = x.shape[0]
        if token_index is None:
            token_index = torch.arange(self._next_token, self._next_token + n, device=x.device)
        self._next_token = max(self._next_token, int(token_index.max()) + 1) if n else self._next_token
        if n == 0:
            return
        tokens = TokenBatch(x, z, self.atoms, self.bias, weight=weight)
        batch, r, wr = tokens.entries, tokens.r, tokens.wr
        w = tokens.weights()
        rnorm = r.norm(dim=-1).double()
        values = batch.values.double()
        count = torch.bincount(batch.cols, minlength=batch.n_features)
        self.n_tokens += n
        self.active_count += count
        weighted_rnorm = w * rnorm
        moments = torch.stack([values, tokens.w(batch.rows) * values * values, values * weighted_rnorm[batch.rows]], 1)
        sums = torch.zeros(batch.n_features, 3, dtype=torch.float64, device=z.device).index_add_(0, batch.cols, moments)
        self.sum_z += sums[:, 0]
        self.sum_z2 += sums[:, 1]
        self.sum_z_rnorm += sums[:, 2]
        # min over all tokens: 0 unless the feature fired on every token of the batch
        batch_min = torch.where(count == n, batch.per_feature(values, "amin"), 0.0)
        self.min_z = torch.minimum(self.min_z, batch_min)
        self.max_z = torch.maximum(self.max_z, batch.per_feature(values, "amax").clamp(min=0))
        self.sum_z_r += (batch.transposed(wr.dtype) @ wr).double()
        self.sum_r += wr.sum(0, dtype=torch.float64)
        self.sum_w += w.sum()
        self.sum_rnorm += weighted_rnorm.sum()
        self.sum_rnorm2 += (weighted_rnorm * rnorm).sum()
        self.worst.update(weighted_rnorm, token_index.to(x.device), r, w)
        if inputs is not None:
            xin = inputs.to(wr.dtype)
            self.sum_rx += (wr.T @ xin).double()
            self.sum_xx += (xin.T @ (xin * tokens.weights().to(xin.dtype)[:, None])).double()
            self.sum_rnorm_xnorm += (weighted_rnorm * xin.norm(dim=-1).double()).sum()
        if self.lam is not None:
            self.add_lam_terms(*lam_terms(wr, tokens.atoms, self.lam, batch))
        if self.codes is not None:
            self.codes.add(token_index, batch, tokens.projections, None if weight is None else w)

    def _merge_extra(self, other: "LayerStats") -> None:
        self.worst.merge(other.worst)
        if self.codes is not None:
            self.codes.merge(other.codes)
        self._next_token = max(self._next_token, other._next_token)

    def compute(self) -> LayerStatistics:
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
            sum_w=float(self.sum_w),
            sum_rnorm=float(self.sum_rnorm),
            sum_rnorm2=float(self.sum_rnorm2),
            worst_rnorm=self.worst.values.clone(),
            worst_token=self.worst.tokens.clone(),
            worst_residual=self.worst.vectors.clone(),
            worst_weight=self.worst.weights.clone(),
            codes=self.codes.compute() if self.codes is not None else None,
            lam_totals=None if self.lam is None else self.lam_totals(),
            **({} if self.skip_inputs is None else {
                "sum_rx": self.sum_rx.clone(), "sum_xx": self.sum_xx.clone(),
                "sum_rnorm_xnorm": float(self.sum_rnorm_xnorm)}),
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.unreduced_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.merge_unreduced([state])

    def unreduced_state(self) -> dict[str, Any]:
        """The parts that no sum, min or max combines (worst residuals, sparse codes with their
        projections), on the CPU: distributed ranks exchange these whole and all-reduce the rest."""
        return {
            "worst": self.worst.state_dict(),
            "codes": self.codes.state_dict() if self.codes is not None else None,
            "next_token": self._next_token,
        }

    def merge_unreduced(self, states: list[dict[str, Any]]) -> None:
        """Replace those parts with the merge of `states` (`unreduced_state()`s of partial
        statistics, this one's included if it counts): exactly what `merge` makes of them."""
        n_features, d = self.atoms.shape
        self.worst = WorstResiduals(self.worst_k, d, self.atoms.device)
        if self.codes is not None:
            self.codes = SparseCodes(n_features, device=self.codes.device)
        self._next_token = 0
        for state in states:
            worst = WorstResiduals(self.worst_k, d, self.atoms.device)
            worst.load_state_dict(state["worst"])
            self.worst.merge(worst)
            if self.codes is not None:
                codes = SparseCodes(n_features)
                codes.load_state_dict(state["codes"])
                self.codes.merge(codes)
            self._next_token = max(self._next_token, int(state["next_token"]))


class WorstResiduals:
    """The k tokens with the largest w_n ||r_n|| (ties broken by token index), with their
    residuals and weights."""

    def __init__(self, k: int, d: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.zeros(0, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(0, dtype=torch.int64, device=device)
        self.vectors = torch.zeros(0, d, dtype=torch.float64, device=device)
        self.weights = torch.zeros(0, dtype=torch.float64, device=device)

    def update(self, values: Tensor, tokens: Tensor, vectors: Tensor, weights: Tensor) -> None:
        if 0 < self.k < len(values):  # only the batch's top k (ties at the k-th value included) can stay
            kth = torch.topk(values, self.k).values[-1]
            keep = values >= kth
            values, tokens, vectors, weights = values[keep], tokens[keep], vectors[keep], weights[keep]
        self._keep_top(
            torch.cat([self.values, values]),
            torch.cat([self.tokens, tokens.to(self.tokens.device)]),
            torch.cat([self.vectors, vectors.double()]),
            torch.cat([self.weights, weights.double()]),
        )

    def merge(self, other: "WorstResiduals") -> None:
        dev = self.values.device
        self.update(other.values.to(dev), other.tokens.to(dev), other.vectors.to(dev), other.weights.to(dev))

    def _keep_top(self, values: Tensor, tokens: Tensor, vectors: Tensor, weights: Tensor) -> None:
        # Sort by token first, then stably by value: equal values keep ascending token order,
        # so the kept set does not depend on how the stream was split.
        by_token = torch.argsort(tokens, stable=True)
        values, tokens, vectors, weights = values[by_token], tokens[by_token], vectors[by_token], weights[by_token]
        order = torch.argsort(values, descending=True, stable=True)[: self.k]
        self.values, self.tokens, self.vectors, self.weights = values[order], tokens[order], vectors[order], weights[order]

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).cpu() for name in ("values", "tokens", "vectors", "weights")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        dev = self.values.device
        for name in ("values", "tokens", "vectors", "weights"):
            setattr(self, name, state[name].to(dev))
