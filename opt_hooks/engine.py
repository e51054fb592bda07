"""The audit of one SAE layer, in theory units: pass 1 -> plan -> pass 2 -> LayerResult.

    audit = LayerAudit(atoms, bias, lam=...)
    for x, z in audit_batches:            # audit tokens only
        audit.update(x, z)
    plan = audit.plan()                   # C1-C6 margins; every certificate fixed by line search
                                          # and measured on the audit tokens from pass 1's state
    for x, z, held in pass_two_batches:   # held-out tokens (and, when lam was estimated,
        plan.update(x, z, held_out=held)  # the audit tokens again: plan.needs_audit_tokens)
    layer = plan.result()                 # the verdicts (opt_hooks/policy.py): a LayerResult

Pass 1 keeps the sparse codes with each active <d_i, r_n>, so every certificate's exact
change on the audit tokens is a closed form of its state (see theory/changes.py): the
data is streamed once, plus the held-out share. Pass 2 measures the same fixed changes on the
held-out tokens, summing each one's per-token changes and their squares (its standard error),
and the layer's held-out objective and gaps. Only C4's inactive terms (the G4 size) need lam on
every (token, feature), so they are summed in pass 1 when lam is known. The API estimates an
unknown lam beforehand on the first audit windows (`LamCalibration`); a LayerAudit given
lam=None estimates it on every audit token after pass 1 and its plan then needs the audit
tokens again. When no lam can be had, C4, C6 and the code gap are skipped. A signed SAE (AbsTopK,
THEORY.md section 9) is audited as its doubled dictionary (`LayerAudit(signed=True)`, theory/signed.py):
C2 skips each atom's pair with its opposite and the pairs whose moved atom's other sign fires, C3, the
decoder gap and C6 are tied (one decoder row per latent), and the rows name each atom's latent and
sign. The plan also builds
the layer's label-free pair map (opt_hooks/pair_map.py: candidates and exact counts from pass 1's
codes); pass 2 sums its held-out evidence beside the certificates'.

Both stages are mergeable (`merge`, `state_dict`), so batches, resumed runs and distributed
ranks combine exactly. Pure tensor code: no TransformerLens / SAE-Lens import.
"""
from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from opt_hooks import policy as pol
from opt_hooks.pair_map import PairMap
from opt_hooks.policy import MIN_LAYER_SHARE, MIN_SHARE, MIN_TOUCHED, VerdictPolicy
from opt_hooks.records import CertificateCheck, FeatureRow, LayerResult, PairRow, finite_or_none
from opt_hooks.theory import c4_codes
from opt_hooks.theory.absorption import MapOptions
from opt_hooks.theory.accumulator import Clustered
from opt_hooks.theory.c1_floor import FloorCertificates, c1_floor
from opt_hooks.theory.c2_pairs import PairCertificates, c2_pairs, tied_pairs
from opt_hooks.theory.c3_decoder import DecoderCertificates, c3_decoder
from opt_hooks.theory.c4_codes import CodeCertificates, estimate_lam
from opt_hooks.theory.c5_bias import BiasCertificate, c5_bias
from opt_hooks.theory.c6_spare import SpareCertificate, c6_spare
from opt_hooks.theory.c7_skip import SkipCertificate, c7_skip
from opt_hooks.theory.changes import TokenChanges
from opt_hooks.theory.gaps import DecoderStep
from opt_hooks.theory.lasso import exact_codes
from opt_hooks.theory.objective import check_lam
from opt_hooks.theory.signed import doubled_atoms, latent_and_sign, partners, tied
from opt_hooks.theory.stats import LamStatistics, LamTotals, LayerStatistics, LayerStats, TokenBatch


@dataclass
class AuditOptions:
    """Tolerances, sizes and the verdict policy's settings (opt_hooks/policy.py)."""

    pair_rel_tol: float = 1e-6  # C2 margin must exceed this share of mu_j
    c3_tol: float = 1e-5  # C3 size above which the decoder certificate is tried
    c5_tol: float = 1e-5  # C5 size above which the bias certificate is tried
    c7_tol: float = 1e-5  # C7 size above which a skip transcoder's W_skip certificate is tried
    max_pairs: int | None = 50_000  # C2 pairs given certificates, largest margin first (None: all)
    lam_calibration_tokens: int = 16_384  # audit tokens whose active <d_i, r_n> estimate an unknown lam
    worst_k: int = 256  # worst-residual tokens kept for C6 (its certificate codes tokens beyond the 256th largest ||r||)
    top_tokens: int = 5  # top activations reported per flagged feature
    scatter_pairs: int = 64  # flagged pairs that carry a scatter sample
    scatter_points: int = 400
    alpha: float = 0.05  # significance level of every layer's verdicts (Bonferroni over its certificates)
    min_share: float = MIN_SHARE  # materiality: held-out gain / the feature's value
    min_layer_share: float = MIN_LAYER_SHARE  # materiality of layer findings: gain / held-out L
    min_touched: int = MIN_TOUCHED  # held-out tokens a certificate must change to be certified
    code_gap_tokens: int = 128  # held-out tokens of the code gap's exact lasso solve (its SE shrinks as 1/sqrt)
    code_gap_max_iter: int = 100  # FISTA steps per working-set round of that solve, at most
    code_gap_tol: float = 1e-7  # relative change of its objective at which the solve stops
    pair_map: MapOptions | None = field(default_factory=MapOptions)  # the absorption map's thresholds; None: off

    def __post_init__(self) -> None:
        self.policy  # noqa: B018 -- bad settings are refused before any token is streamed

    @property
    def policy(self) -> VerdictPolicy:
        return VerdictPolicy(self.alpha, self.min_share, self.min_layer_share, self.min_touched)


class LayerAudit:
    """Pass 1: lam-free statistics of one SAE over the audit tokens."""

    def __init__(
        self,
        atoms: Tensor,
        bias: Tensor,
        *,
        lam: float | None = None,
        lam_estimated: bool = False,
        lam_unavailable: str | None = None,
        hook_name: str = "sae",
        architecture: str = "standard",
        scope: str = "L1 objective (exact)",
        options: AuditOptions | None = None,
        meta: dict[str, Any] | None = None,
        skip: Tensor | None = None,
        signed: bool = False,
    ) -> None:
        """`skip`: a skip transcoder's W_skip (d, d_in), whose batches then carry its inputs x_n
        (`update(..., inputs=)`) for C7; None for SAEs and plain transcoders. A transcoder's x is
        the target its dictionary reconstructs, y_n - W_skip x_n (THEORY.md section 8); W_skip
        gives back y_n for the held-out explained variance. `signed`: a signed SAE's doubled
        dictionary, atoms [d; -d] (2K, d) and codes [relu(z), relu(-z)] (theory/signed.py)."""
        if lam is not None:
            check_lam(lam)
        # lam None: estimated from every audit token once pass 1 is done (pass 2 then streams
        # them again), unless `lam_unavailable` says why no lam can be had (C4, C6 skipped);
        # lam_estimated: lam was estimated beforehand (`LamCalibration`)
        self.lam_estimated = (lam is None and lam_unavailable is None) or lam_estimated
        self.lam_unavailable = lam_unavailable
        if not (torch.isfinite(atoms).all() and torch.isfinite(bias).all()):
            raise ValueError(f"{hook_name}: non-finite values (NaN or inf) in the SAE's decoder or b_dec")
        if signed and not torch.equal(atoms, doubled_atoms(atoms[: atoms.shape[0] // 2])):
            raise ValueError(f"{hook_name}: a signed SAE's atoms are its doubled dictionary [d; -d] (2K, d)")
        self.signed = signed
        self.atoms, self.bias, self.lam = atoms, bias, lam
        self.hook_name, self.architecture, self.scope = hook_name, architecture, scope
        self.options = options or AuditOptions()
        self.meta = dict(meta or {})
        self.skip = skip
        self.stats = LayerStats(atoms, bias, lam=lam, worst_k=self.options.worst_k,
                                skip_inputs=None if skip is None else skip.shape[1])

    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None, weight: Tensor | None = None,
               inputs: Tensor | None = None) -> None:
        """Add audit tokens: x (n, d), z (n, K) in theory units, `weight` (n,) their weights w_n
        (THEORY.md section 1; None for an SAE without run-time normalisation), `inputs` (n, d_in) a
        skip transcoder's inputs."""
        _check_batch(x, z, self.atoms, token_index, weight, inputs)
        self.stats.update(x, z, token_index, weight, inputs)

    def merge(self, other: "LayerAudit") -> "LayerAudit":
        self.stats.merge(other.stats)
        return self

    @property
    def n_tokens(self) -> int:
        return int(self.stats.n_tokens)

    def plan(self) -> "AuditPlan":
        if self.n_tokens == 0:
            raise ValueError(
                f"{self.hook_name}: no audit tokens were seen (none streamed, or all skipped as "
                "special or non-finite); nothing to audit"
            )
        return AuditPlan(self, self.stats.compute())

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["lam"] is None) != (self.lam is None):
            raise ValueError(f"{self.hook_name}: the state was streamed with lam = {state['lam']!r}, not {self.lam!r}")
        # a resumed run keeps the lam it was streamed with (a calibrated one may differ in its
        # last bits when recomputed on another device)
        self.lam = self.stats.lam = state["lam"]
        self.stats.load_state_dict(state["stats"])


class LamCalibration:
    """An unknown lam estimated before pass 1 (THEORY.md C4): lam_hat = 2 * median of
    w_n <d_i, r_n> over the active (n, i) of the calibration tokens, the first audit tokens.

    Known before pass 1, lam_hat lets C4's inactive terms be summed in pass 1 itself, so the
    audit tokens are streamed once. The calibration tokens are audit tokens like any other."""

    def __init__(self, atoms: Tensor, bias: Tensor, hook_name: str = "sae") -> None:
        self.atoms, self.bias, self.hook_name = atoms, bias, hook_name
        self.projections: list[Tensor] = []
        self.n_tokens = 0

    @property
    def n_codes(self) -> int:
        return sum(len(p) for p in self.projections)

    def update(self, x: Tensor, z: Tensor, weight: Tensor | None = None) -> None:
        _check_batch(x, z, self.atoms, None, weight)
        self.projections.append(TokenBatch(x, z, self.atoms, self.bias, weight=weight).projections)
        self.n_tokens += x.shape[0]

    def compute(self) -> float:
        """lam_hat; ValueError (saying why) when it cannot be estimated."""
        return estimate_lam(torch.cat(self.projections) if self.projections else torch.zeros(0))


VERDICT_FAMILIES = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")  # certificates that get verdicts; "decoder" is a gap


class AuditPlan:
    """The conditions evaluated on pass-1 statistics, every certificate fixed by line search on
    the audit tokens and measured there from pass 1's state; pass 2 measures them unchanged on
    the held-out tokens (`update`), `result()` applies the verdict policy."""

    def __init__(self, audit: LayerAudit, stats: LayerStatistics) -> None:
        self.audit, self.stats, self.options = audit, stats, audit.options
        self.policy = self.options.policy
        self.atoms, self.bias = audit.atoms, audit.bias
        self.lam_estimated = audit.lam_estimated
        self.lam, self.lam_missing = self._lam()
        self.lam_or_zero = 0.0 if self.lam is None else self.lam  # lam-free certificates read no lam
        self.signed = signed = audit.signed
        self.floor = c1_floor(stats)
        self.pairs = c2_pairs(stats, self.atoms, rel_tol=self.options.pair_rel_tol)
        # a signed SAE: the pairs of the tied problem only (theory/c2_pairs.py), the others counted
        self.pairs, self.untied_pairs = tied_pairs(self.pairs, stats.active_count) if signed else (self.pairs, 0)
        self.decoder = c3_decoder(stats, self.atoms, signed=signed)  # a signed SAE: per latent, tied
        self.bias_check = c5_bias(stats)
        self.spare = None if self.lam is None else c6_spare(stats, self.lam, signed=signed)
        self.skip = None if stats.sum_rx is None else c7_skip(stats)
        self.families = self._build_certificates()
        self.audit_changes: dict[str, tuple[Tensor, Tensor]] = {}
        for name, family in self.families.items():
            family.step = family.line_search(stats, self.lam_or_zero)
            self.audit_changes[name] = family.audit_change(stats, self.lam_or_zero, family.step)
        # lam estimated after pass 1: C4's inactive terms and the C6 count are summed over the
        # audit tokens in pass 2, with the estimate
        self.needs_audit_tokens = self.lam is not None and stats.lam_totals is None
        self.state = _Pass2State(self.families, self.atoms.shape, self.atoms.device, self.needs_audit_tokens,
                                 self.options.code_gap_tokens)
        self.pair_map = PairMap(stats.codes, stats.active_count, stats.n_tokens, self.atoms, self.options.pair_map,
                                signed=signed)
        self.pair_map.add_states(self.state)

    def _lam(self) -> tuple[float | None, str | None]:
        audit = self.audit
        if audit.lam is not None:
            return float(audit.lam), None
        if audit.lam_unavailable is not None:
            return None, audit.lam_unavailable
        try:
            return estimate_lam(self.stats.active_projections), None
        except ValueError as error:
            return None, str(error)

    # -- certificates -----------------------------------------------------------------
    def _build_certificates(self) -> dict[str, Any]:
        st, dev, opts = self.stats, self.atoms.device, self.options
        idx = lambda mask: torch.nonzero(mask.to(dev)).flatten()  # noqa: E731
        alive = idx(st.active_count > 0)
        families: dict[str, Any] = {}
        # near-duplicate latents are the pair map's finding (duplicates to merge), never a C2 pair
        duplicate_rho = math.inf if opts.pair_map is None else opts.pair_map.duplicate_rho
        self.duplicate_pairs = int((self.pairs.rho >= duplicate_rho).sum())
        candidates = torch.nonzero(self.pairs.rho < duplicate_rho).flatten()
        if self.lam is not None:  # C1 and C2 descend by lam times a lam-free margin
            floor_ids = idx(self.floor.violated)
            families["C1"] = FloorCertificates(floor_ids, self.floor.floor.to(dev)[floor_ids])
            # capped by the first-order gain per unit step, lam * margin: chance pairs of rare
            # features have tiny margins (at most mu_j) and fall below the cap first
            order = candidates[torch.argsort(self.pairs.margin[candidates], descending=True, stable=True)]
            if opts.max_pairs is not None:
                order = order[: opts.max_pairs]
            self.pair_order = order
            p = self.pairs
            j = p.j[order].to(dev)
            families["C2"] = PairCertificates(
                p.i[order].to(dev), j, p.kind[order].to(dev), p.bound[order].to(dev), p.rho[order].to(dev),
                partners(len(self.atoms), dev)[j] if self.signed else None,  # tied: -d_j turns with d_j
            )
        else:
            self.pair_order = candidates
        # a signed SAE: one tied certificate per live latent, on its positive atom and, turning with
        # it, its negative one (the latent's row K + i)
        alive_rows = tied(st.active_count, 1) > 0 if self.signed else st.active_count > 0
        decoder_ids = idx((self.decoder.size > opts.c3_tol) & alive_rows.to(self.decoder.size.device))
        grads = self.decoder.gradient.to(dev)[decoder_ids]
        families["C3"] = DecoderCertificates(
            decoder_ids, self.atoms[decoder_ids].double(), grads / grads.norm(dim=-1, keepdim=True),
            partners(len(self.atoms), decoder_ids.device)[decoder_ids] if self.signed else None,
        )
        if self.lam is not None:
            families["C4"] = CodeCertificates(alive, self.atoms[alive].double())
        if self.bias_check.size > opts.c5_tol:
            families["C5"] = BiasCertificate(self.bias_check.mean_residual.to(dev) / self.bias_check.norm)
        if self.skip is not None and self.skip.size > opts.c7_tol:
            families["C7"] = SkipCertificate(self.skip.gradient.to(dev) / self.skip.norm)
        if self.spare is not None and self.spare.violated:
            dead = int(torch.nonzero(self.spare.dead)[0])  # a signed SAE: a latent dead in both signs
            partner = int(partners(len(self.atoms))[dead]) if self.signed else None
            spare = SpareCertificate.best_of(st, dead, self.atoms[dead], self.lam, partner)
            if spare is not None:
                families["C6"] = spare
        # a signed SAE: each latent's tied gradient g_i moves d_i, and -g_i its opposite -d_i
        gradient = self.decoder.gradient.to(dev)
        families["decoder"] = DecoderStep(doubled_atoms(gradient) if self.signed else gradient)
        return families

    @property
    def n_tests(self) -> int:
        """The multiplicity correction's m: every certificate that gets a verdict."""
        return sum(len(f) for name, f in self.families.items() if name in VERDICT_FAMILIES)

    # -- pass 2 -----------------------------------------------------------------------
    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None, held_out: Tensor | None = None,
               weight: Tensor | None = None, window: Tensor | None = None, inputs: Tensor | None = None) -> None:
        """Add a batch of held-out tokens (held_out True) and, when `needs_audit_tokens`, audit
        tokens (False; otherwise they are ignored: pass 1's state already measured them).

        `window` (n,): each token's window (a row of a forward pass), whose tokens must all be in
        this batch; held-out standard errors are over windows, since the tokens of one window are
        not independent. None: every token is its own window (rows of activations). `inputs`: a
        skip transcoder's inputs (see LayerAudit)."""
        _check_batch(x, z, self.atoms, token_index, weight, inputs)
        if (inputs is None) != (self.audit.skip is None):
            raise ValueError(f"{self.audit.hook_name}: a skip transcoder's batches carry its inputs, and only its batches do")
        if held_out is None:
            held_out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if held_out.shape != (x.shape[0],) or held_out.dtype != torch.bool:
            raise ValueError(f"held_out must be a bool mask ({x.shape[0]},); got {held_out.dtype} {tuple(held_out.shape)}")
        if token_index is None:
            token_index = torch.arange(x.shape[0], device=x.device) + int(self.state.n_seen)
        self.state.n_seen += x.shape[0]
        rows = held_out if not self.needs_audit_tokens else torch.ones_like(held_out)
        if not bool(rows.any()):
            return
        x, z, held_out, token_index = x[rows], z[rows], held_out[rows], token_index[rows]
        weight, window, inputs = rows_of(weight, rows), rows_of(window, rows), rows_of(inputs, rows)
        if bool(held_out.any()):
            self._add_held_out(x[held_out], z[held_out], token_index[held_out], rows_of(weight, held_out),
                               rows_of(window, held_out), rows_of(inputs, held_out))
        audit = ~held_out
        if self.needs_audit_tokens and bool(audit.any()):
            tokens = TokenBatch(x[audit], z[audit], self.atoms, self.bias, self.lam, rows_of(weight, audit))
            self.state.n_audit += tokens.n_tokens
            totals = tokens.totals
            self.state.add_lam_terms(totals.over_count, totals.over_excess, totals.n_over_half_lam)

    def _add_held_out(self, x: Tensor, z: Tensor, token_index: Tensor, weight: Tensor | None,
                      window: Tensor | None, inputs: Tensor | None) -> None:
        lam, state = self.lam_or_zero, self.state
        tokens = TokenBatch(x, z, self.atoms, self.bias, weight=weight, inputs=inputs)
        state.n_held_out += tokens.n_tokens
        groups = _window_groups(window, tokens.n_tokens)
        if groups is None:  # every token its own window: a window's total is the token's change
            state.n_windows += tokens.n_tokens
            state.count_sq += tokens.n_tokens
            for name, family in self.families.items():
                changes = family.held_out(tokens, lam)
                state.add(name, changes, changes.sum_sq, changes.sum)
        else:  # each window measured alone: its totals give the standard error over windows
            state.n_windows += len(groups)
            state.count_sq += sum(len(g) ** 2 for g in groups)
            alone = [TokenBatch(x[g], z[g], self.atoms, self.bias, weight=rows_of(weight, g), inputs=rows_of(inputs, g))
                     for g in groups]
            for name, family in self.families.items():
                parts = [family.held_out(batch, lam) for batch in alone]
                totals = torch.stack([part.sum for part in parts])  # (windows, F)
                counts = torch.tensor([float(len(g)) for g in groups], dtype=torch.float64, device=totals.device)
                state.add(name, TokenChanges(totals.sum(0), sum(part.sum_sq for part in parts),
                                             sum(part.touched for part in parts)), (totals**2).sum(0), counts @ totals)
        state.value_sum += c4_codes.feature_values(tokens, lam)
        self.pair_map.held_out(x, tokens, self.bias, state)
        entries, values = tokens.entries, tokens.entries.values.double()
        w = tokens.weights()
        mse = w * (tokens.r.double() ** 2).sum(-1)  # the SAE's own (weighted) squared error
        l1 = torch.zeros(tokens.n_tokens, dtype=torch.float64, device=mse.device).index_add_(0, entries.rows, values)
        loss = mse + lam * l1
        state.loss_sum += loss.sum()
        state.loss_sum_sq += (loss**2).sum()
        totals = loss if groups is None else torch.stack([loss[g].sum() for g in groups])
        sizes = torch.ones_like(totals) if groups is None else torch.tensor(
            [float(len(g)) for g in groups], dtype=torch.float64, device=totals.device)
        state.loss_cluster_sq += (totals**2).sum()
        state.loss_cluster_cross += sizes @ totals
        state.mse_sum += mse.sum()
        state.l1_sum += l1.sum()
        state.nnz += len(values)
        state.weight_sum += w.sum()
        # explained variance is of what the model computes at the hook: for a skip transcoder, whose x
        # here is the target t_n = y_n - W_skip x_n, that is y_n = t_n + W_skip x_n
        y = x.double() if inputs is None else x.double() + inputs.double() @ self.audit.skip.double().T.to(x.device)
        state.x_sum += w @ y
        state.x_sq_sum += w @ (y**2).sum(-1)
        if self.lam is not None:
            state.sample.update(x, z, token_index, w, token_index if window is None else window)

    def merge(self, other: "AuditPlan") -> "AuditPlan":
        self.state.merge(other.state)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    # -- results ----------------------------------------------------------------------
    def lam_totals(self) -> LamTotals | None:
        """The lam statistics of the audit tokens: from pass 1 when lam was known, else pass 2's."""
        if self.lam is None:
            return None
        return self.stats.lam_totals if self.stats.lam_totals is not None else self.state.lam_totals()

    def result(self) -> LayerResult:
        if self.needs_audit_tokens and int(self.state.n_audit) != self.stats.n_tokens:
            raise RuntimeError(
                f"pass 2 saw {int(self.state.n_audit)} audit tokens but pass 1 saw {self.stats.n_tokens}: "
                "with lam estimated, pass 2 must stream the same audit tokens again"
            )
        with python_gc_paused():
            return _LayerAssembler(self).assemble()


class TokenSample:
    """The code gap's sample: the k held-out tokens whose token index hashes lowest (inputs, codes,
    weights, windows). The hash spreads the sample over the held-out windows (the lowest indices would
    be the first window's tokens, one context); chosen by a function of the index alone, so any batch
    split, merge order or rank split keeps the same tokens."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.tokens = torch.zeros(0, dtype=torch.int64)
        self.window = torch.zeros(0, dtype=torch.int64)
        self.x: Tensor | None = None  # (m, d), in the precision the batches came in
        self.z: Tensor | None = None  # (m, K), sparse COO while kept
        self.weight: Tensor | None = None  # (m,) float64 w_n (ones for an unweighted SAE)

    @staticmethod
    def key(tokens: Tensor) -> Tensor:
        """A fixed scramble of token indices (Knuth's multiplicative hash modulo 2^31, ties by index)."""
        return (tokens * 2654435761) % (1 << 31) * (1 << 31) + tokens

    def update(self, x: Tensor, z: Tensor, token_index: Tensor, weight: Tensor, window: Tensor) -> None:
        if self.k <= 0 or len(token_index) == 0:
            return
        token_index = token_index.cpu()
        if len(self.tokens) >= self.k:  # only rows that can enter the sample are copied
            rows = self.key(token_index) < int(self.key(self.tokens).max())
            if not bool(rows.any()):
                return
            token_index, x, z, weight, window = token_index[rows], x[rows.to(x.device)], z[rows.to(z.device)], \
                weight[rows.to(weight.device)], window[rows.to(window.device)]
        # the batch's precision
        self._keep(token_index, x.detach().cpu(), z.detach().cpu().to_sparse(), weight.detach().cpu().double(),
                   window.cpu())

    def _keep(self, tokens: Tensor, x: Tensor, z: Tensor, weight: Tensor, window: Tensor) -> None:
        if self.x is not None:
            tokens = torch.cat([self.tokens, tokens])
            x = torch.cat([self.x, x])
            z = torch.cat([self.z, z])
            weight = torch.cat([self.weight, weight])
            window = torch.cat([self.window, window])
        order = torch.argsort(self.key(tokens), stable=True)[: self.k]
        self.tokens, self.x, self.weight, self.window = tokens[order], x[order], weight[order], window[order]
        self.z = z.index_select(0, order).coalesce()

    def merge(self, other: "TokenSample") -> None:
        if other.x is not None:
            self._keep(other.tokens, other.x, other.z, other.weight, other.window)

    def state_dict(self) -> dict[str, Any]:
        if self.x is None:
            return {"tokens": self.tokens}
        z = self.z.coalesce()
        return {"tokens": self.tokens, "x": self.x, "z_indices": z.indices(), "z_values": z.values(),
                "n_features": z.shape[1], "weight": self.weight, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens, self.x, self.z, self.weight = state["tokens"], None, None, state.get("weight")
        self.window = state.get("window", torch.zeros(0, dtype=torch.int64))
        if "x" in state:
            self.x = state["x"]
            shape = (len(self.tokens), state["n_features"])
            # read from a checkpoint file: check the indices once here (torch leaves it off unless told,
            # and from 2.14 warns that a malformed sparse tensor can crash later operations)
            self.z = torch.sparse_coo_tensor(state["z_indices"], state["z_values"], shape,
                                             check_invariants=True).coalesce()


class _Pass2State(LamStatistics):
    """Pass 2's sums: per certificate, the held-out per-token changes' sum, sum of squares and
    touched-token count; per feature its value; the held-out objective's parts; the code gap's
    sample; with lam estimated after pass 1, the lam statistics of the audit tokens."""

    def __init__(self, families: dict[str, Any], shape: torch.Size, device: torch.device, audit_terms: bool,
                 sample_tokens: int) -> None:
        super().__init__()
        n_features, d = shape
        f64 = dict(dtype=torch.float64, device=device)
        count = lambda *size: torch.zeros(*size, dtype=torch.int64, device=device)  # noqa: E731
        self.add_state("n_held_out", count(()), "sum")
        self.add_state("n_seen", count(()), "sum")
        self.add_state("n_windows", count(()), "sum")  # held-out windows
        self.add_state("count_sq", torch.zeros((), **f64), "sum")  # sum over them of (tokens)^2
        for name, family in families.items():
            self.add_state(f"{name}_sum", torch.zeros(len(family), **f64), "sum")
            self.add_state(f"{name}_sum_sq", torch.zeros(len(family), **f64), "sum")
            self.add_state(f"{name}_touched", count(len(family)), "sum")
            # over windows: sum_w T_w^2 and sum_w n_w T_w, T_w a window's total change
            self.add_state(f"{name}_cluster_sq", torch.zeros(len(family), **f64), "sum")
            self.add_state(f"{name}_cluster_cross", torch.zeros(len(family), **f64), "sum")
        self.add_state("value_sum", torch.zeros(n_features, **f64), "sum")
        for name in ("loss_sum", "loss_sum_sq", "loss_cluster_sq", "loss_cluster_cross", "mse_sum", "l1_sum",
                     "weight_sum", "x_sq_sum"):
            self.add_state(name, torch.zeros((), **f64), "sum")
        self.add_state("nnz", count(()), "sum")
        self.add_state("x_sum", torch.zeros(d, **f64), "sum")
        if audit_terms:
            self.add_state("n_audit", count(()), "sum")
            self.add_lam_states(n_features, device)
        self.sample = TokenSample(sample_tokens)

    def add(self, name: str, changes: TokenChanges, cluster_sq: Tensor, cluster_cross: Tensor) -> None:
        device = self.value_sum.device
        getattr(self, f"{name}_sum").add_(changes.sum.to(device))
        getattr(self, f"{name}_sum_sq").add_(changes.sum_sq.to(device))
        getattr(self, f"{name}_touched").add_(changes.touched.to(device))
        getattr(self, f"{name}_cluster_sq").add_(cluster_sq.to(device))
        getattr(self, f"{name}_cluster_cross").add_(cluster_cross.to(device))

    def changes(self, name: str) -> TokenChanges:
        return TokenChanges(getattr(self, f"{name}_sum"), getattr(self, f"{name}_sum_sq"), getattr(self, f"{name}_touched"))

    def estimate(self, name: str) -> pol.Estimate:
        """A family's held-out change per token, its standard error over windows."""
        return pol.clustered_estimate(getattr(self, f"{name}_sum").cpu(), getattr(self, f"{name}_cluster_sq").cpu(),
                                      getattr(self, f"{name}_cluster_cross").cpu(), float(self.count_sq),
                                      int(self.n_held_out), int(self.n_windows))

    def _merge_extra(self, other: "_Pass2State") -> None:
        self.sample.merge(other.sample)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sample": self.sample.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sample.load_state_dict(state["sample"])

    def unreduced_state(self) -> dict[str, Any]:
        """The part no sum combines (the code gap's sample): ranks exchange it whole."""
        return self.sample.state_dict()

    def merge_unreduced(self, states: list[dict[str, Any]]) -> None:
        self.sample = TokenSample(self.sample.k)
        for state in states:
            part = TokenSample(self.sample.k)
            part.load_state_dict(state)
            self.sample.merge(part)


class _LayerAssembler:
    """Turns a finished plan into a LayerResult: every certificate's held-out estimate and
    verdict (opt_hooks/policy.py), feature and pair rows in the policy's order, layer findings,
    gaps and the held-out objective."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan, self.stats, self.opts, self.policy = plan, plan.stats, plan.options, plan.policy
        state = plan.state
        self.n_held = int(state.n_held_out)
        self.z = self.policy.critical_z(plan.n_tests)
        self.loss = float(state.loss_sum) / self.n_held if self.n_held else math.nan
        self.values = (state.value_sum / self.n_held).cpu() if self.n_held else torch.full_like(state.value_sum.cpu(), math.nan)
        self.n_pairs = len(plan.families["C2"]) if "C2" in plan.families else 0

    # -- one family's checks ------------------------------------------------------------
    def checks(self, name: str, scales: Tensor | None, *, layer_finding: bool = False,
               count_p: list[float] | None = None) -> list[CertificateCheck]:
        """The CertificateCheck of every certificate of a family. `scales` (F,): what each gain
        is judged against (None: the layer's held-out L)."""
        plan = self.plan
        family, n_audit = plan.families[name], self.stats.n_tokens
        change, first = (t.cpu() for t in plan.audit_changes[name])
        held = plan.state.changes(name)
        est = plan.state.estimate(name)
        means, ses, p_values = (list(map(finite_or_none, t.tolist())) for t in (est.mean, est.se, est.p_value))
        touched, steps = held.touched.cpu().tolist(), family.step.cpu().tolist()
        changes, firsts = change.tolist(), first.tolist()
        scales = [self.loss] * len(family) if scales is None else scales.tolist()
        count_threshold = self.policy.alpha / max(self.n_pairs, 1)
        gains = [None if mean is None else -mean for mean in means]
        shares = [None if gain is None or not scale > 0 else gain / scale for gain, scale in zip(gains, scales)]
        verdicts = pol.decide_all(
            self.policy, audit_change=changes, held_out=means, se=ses, touched=touched, z=self.z, share=shares,
            layer_finding=layer_finding, count_p=count_p, count_threshold=count_threshold,
        )
        out = []
        for k, verdict in enumerate(verdicts):
            mean, gain, share = means[k], gains[k], shares[k]
            out.append(CertificateCheck(
                condition=family.condition, step=steps[k], predicted=firsts[k] / n_audit,
                measured=changes[k] / n_audit, held_out=mean, held_out_se=ses[k],
                p_value=p_values[k] if mean is not None else None, gain=gain, share=share,
                tier=verdict.tier, reason=verdict.reason, n_audit=n_audit, n_held_out=self.n_held,
                n_touched=int(touched[k]), count_p_value=None if count_p is None else count_p[k],
            ))
        return out

    def assemble(self) -> LayerResult:
        plan, st = self.plan, self.stats
        n_features = plan.atoms.shape[0]
        found: list[dict[str, CertificateCheck]] = [{} for _ in range(n_features)]
        for name in ("C1", "C3", "C4"):
            if name not in plan.families:
                continue
            features = plan.families[name].features.cpu()
            if name == "C3" and plan.signed:  # tied: a latent's check, judged against both signs' worth
                self._tied_checks(found, features)
                continue
            for k, check in zip(features.tolist(), self.checks(name, self.values[features])):
                if check.tier != "satisfied":
                    found[k][name] = check
        if "C1" not in plan.families:  # no lam: the exact violation stands, uncertified
            for k in torch.nonzero(plan.floor.violated).flatten().tolist():
                found[k]["C1"] = _unmeasured("C1", float(plan.floor.floor[k]))
        pairs = self._pairs(found)
        skipped: dict[str, str] = {}
        notes: list[str] = []
        if plan.lam is None:
            reason = f"no lam: it is not known and cannot be estimated ({plan.lam_missing}); pass lam= to audit it"
            skipped = {"C4": reason, "C6": reason, "codes": reason}
            if bool(plan.floor.violated.any()) or len(plan.pairs):
                notes.append("C1 / C2 violations are listed as violated: their gain is lam times their margin, "
                             "so without lam they cannot be certified")
        if self.n_held < self.policy.min_touched:
            notes.append(
                f"only {self.n_held} held-out token(s): no certificate can be certified (each needs at least "
                f"{self.policy.min_touched} held-out tokens it changes); raise held_out or the number of tokens"
            )
        if len(plan.pairs) - plan.duplicate_pairs > len(plan.pair_order):
            notes.append(
                f"{len(plan.pairs) - plan.duplicate_pairs} C2 pairs violated; certificates evaluated for the "
                f"{len(plan.pair_order)} with the largest margins (AuditOptions.max_pairs)"
            )
        if plan.untied_pairs:
            notes.append(
                f"{plan.untied_pairs} C2 violation(s) left out: their moved latent j fires with its other sign "
                "too, and its decoder row turns for both signs, so the pair condition is not one of the signed "
                "SAE's own problem there (THEORY.md section 9)"
            )
        if plan.duplicate_pairs:
            notes.append(
                f"{plan.duplicate_pairs} C2 violation(s) between near-duplicate latents (rho >= "
                f"{self.opts.pair_map.duplicate_rho:g}) are listed as duplicates to merge, not as pairs"
            )
        layer_conditions = {"C5": self._stationarity("C5", plan.bias_check), "C6": self._c6()}
        if plan.skip is not None:
            layer_conditions["C7"] = self._stationarity("C7", plan.skip)
        pair_map = plan.pair_map
        absorption = pair_map.absorption_rows(plan.state, self.policy, st.mu, plan.lam)
        if not pair_map.available:
            skipped["absorption"] = pair_map.unavailable
        mapped = {f for r in absorption for f in (r.parent, r.child)}
        mapped |= {f for r in [*pair_map.duplicates, *pair_map.antipodal] for f in (r.i, r.j)}
        rows = self._feature_rows(found, mapped)
        layer = LayerResult(
            hook_name=plan.audit.hook_name, architecture=plan.audit.architecture, scope=plan.audit.scope,
            lam=plan.lam, lam_estimated=plan.lam_estimated and plan.lam is not None,
            d_in=int(plan.audit.meta.get("d_in") or plan.atoms.shape[1]), d_sae=self.n_latents, n_tokens=st.n_tokens,
            n_held_out=self.n_held, features=rows, pairs=pairs, layer_conditions=layer_conditions,
            objective=self._objective(), gaps=self._gaps(layer_conditions), skipped=skipped,
            n_tests=plan.n_tests, alpha=self.policy.alpha,
            dead_features=torch.nonzero(self.dead_latents).flatten().tolist(), notes=notes, absorption=absorption,
            duplicates=pair_map.duplicates, antipodal=pair_map.antipodal, pair_map=pair_map.settings(),
            signed=plan.signed, **{k: plan.audit.meta.get(k) for k in ("sae_id", "neuronpedia_id", "hook_name_out")},
        )
        if plan.signed:
            _name_signs(layer)
        return layer

    @property
    def n_latents(self) -> int:
        """The SAE's latents: its atoms, or half of a signed SAE's doubled dictionary."""
        n_atoms = self.plan.atoms.shape[0]
        return n_atoms // 2 if self.plan.signed else n_atoms

    @property
    def dead_latents(self) -> Tensor:
        """(latents,) bool: off on every audit token (a signed SAE's latent: in both signs)."""
        counts = self.stats.active_count
        return (tied(counts, 1) if self.plan.signed else counts) == 0

    def _tied_checks(self, found: list[dict[str, CertificateCheck]], latents: Tensor) -> None:
        """A signed SAE's tied C3 certificates (one per latent, turning its decoder row for both signs),
        each judged against the latent's value (both signs' codes removed: v_i+ + v_i-) and listed on the
        rows of the signs that fire."""
        n, counts = self.n_latents, self.stats.active_count.cpu()
        for i, check in zip(latents.tolist(), self.checks("C3", tied(self.values, 1)[latents])):
            if check.tier != "satisfied":
                for row in (i, i + n):
                    if counts[row] > 0:
                        found[row]["C3"] = check

    # -- pairs ----------------------------------------------------------------------------
    def _pairs(self, found: list[dict[str, CertificateCheck]]) -> list[PairRow]:
        plan, p = self.plan, self.plan.pairs
        order = plan.pair_order.cpu()
        n = self.stats.n_tokens
        columns = ("i", "j", "kind", "rho", "bound", "threshold", "margin", "count_i", "count_j", "co_count")
        pair = {name: getattr(p, name)[order].tolist() for name in columns}  # Python lists: no per-pair tensor access
        count_p = []
        for kind, count_i, count_j, co in zip(pair["kind"], pair["count_i"], pair["count_j"], pair["co_count"]):
            if kind > 0:  # j fires with i more often than independence allows
                count_p.append(pol.count_p_value(co, count_j, count_i / n))
            else:  # j fires where i is off more often than independence allows
                count_p.append(pol.count_p_value(count_j - co, n - count_i, count_j / n))
        checks = (
            self.checks("C2", self.values[p.j[plan.pair_order].cpu()], count_p=count_p)
            if "C2" in plan.families else [None] * len(order)
        )
        rows: list[PairRow] = []
        mu = self.stats.mu.tolist()
        for rank in range(len(order)):
            i, j = pair["i"][rank], pair["j"][rank]
            check = checks[rank]
            count_j, co = pair["count_j"][rank], pair["co_count"][rank]
            margin = pair["margin"][rank]
            rows.append(PairRow(
                i=i, j=j, kind="hierarchy" if pair["kind"][rank] > 0 else "complementary",
                rho=pair["rho"][rank], bound=pair["bound"][rank], threshold=pair["threshold"][rank],
                margin=margin, relative_margin=margin / mu[j],
                count_i=pair["count_i"][rank], count_j=count_j, co_count=co,
                p_j_without_i_upper=pol.upper_rate(count_j - co, count_j),
                tier="violated" if check is None else check.tier, certificate=check,
            ))
            if check is not None and check.tier != "satisfied":
                for f in (i, j):
                    current = found[f].get("C2")
                    if current is None or pol.rank_key(check.tier, check.gain) < pol.rank_key(current.tier, current.gain):
                        found[f]["C2"] = check
            elif check is None:  # no lam: the exact violation stands, uncertified
                for f in (i, j):
                    found[f].setdefault("C2", _unmeasured("C2", 0.0))
        rows.sort(key=lambda r: pol.rank_key(r.tier, r.gain, (r.i, r.j)))
        self._attach_scatter(rows)
        return rows

    def _attach_scatter(self, rows: list[PairRow]) -> None:
        codes = self.stats.codes
        shown = rows[: self.opts.scatter_pairs]
        if not shown or codes is None or codes.n_tokens == 0:
            return
        feature_ids = sorted({f for r in shown for f in (r.i, r.j)})
        dense = codes.columns(feature_ids)  # (N, F) float64
        where = {f: c for c, f in enumerate(feature_ids)}
        for row in shown:
            zi, zj = dense[:, where[row.i]], dense[:, where[row.j]]
            keep = _scatter_rows(zi, zj, self.opts.scatter_points)
            row.sample_i, row.sample_j = zi[keep].tolist(), zj[keep].tolist()
            on_a_i = zj[zi == 0]  # z_j where i is off: A_i is non-empty for every C2 pair
            row.hull_min, row.hull_max = float(on_a_i.min()), float(on_a_i.max())

    # -- layer findings -------------------------------------------------------------------
    def _stationarity(self, name: str, check: Any) -> dict[str, Any]:
        """C5 (the bias) or C7 (a skip transcoder's W_skip): the gradient's size and norm, and the
        verdict of its certificate where one was tried."""
        out: dict[str, Any] = {"size": check.size, "norm": check.norm, "tier": "satisfied", "certificate": None}
        if name in self.plan.families:
            cert = self.checks(name, None, layer_finding=True)[0]
            out["certificate"], out["tier"] = cert, cert.tier
        return out

    def _c6(self) -> dict[str, Any]:
        spare, st, plan = self.plan.spare, self.stats, self.plan
        out: dict[str, Any] = {
            "n_dead": int(self.dead_latents.sum()),
            "dead": torch.nonzero(self.dead_latents).flatten().tolist(),
            "worst_tokens": st.worst_token.tolist(),
            "worst_rnorms": st.worst_rnorm.tolist(),  # w_n ||r_n||: ||r_n|| for an unweighted SAE
            "worst_weighted": bool((st.worst_weight != 1).any()),
            "tier": "satisfied",
            "certificate": None,
        }
        if spare is None:
            return out
        out.update(max_rnorm=spare.max_rnorm, threshold=spare.threshold, margin=spare.margin,
                   n_over_threshold=plan.lam_totals().n_over_half_lam)
        if "C6" in plan.families:
            cert = self.checks("C6", None, layer_finding=True)[0]
            out.update(certificate=cert, tier=cert.tier, resampled=plan.families["C6"].feature)
        return out

    def _objective(self) -> dict[str, Any]:
        state, n, lam = self.plan.state, self.n_held, self.plan.lam
        if n == 0:
            return {"L": None, "mse": None, "l1": None, "n_tokens": 0}
        # the inputs' (weighted) spread about their (weighted) mean: what explained variance compares with
        spread = float(state.x_sq_sum) - float((state.x_sum**2).sum()) / float(state.weight_sum)
        est = pol.clustered_estimate(state.loss_sum[None].cpu(), state.loss_cluster_sq[None].cpu(),
                                     state.loss_cluster_cross[None].cpu(), float(state.count_sq), n, int(state.n_windows))
        return {
            "L": self.loss, "se": finite_or_none(est.se[0]), "mse": float(state.mse_sum) / n,
            "l1": None if lam is None else lam * float(state.l1_sum) / n, "n_tokens": n,
            "l0": int(state.nnz) / n,
            "explained_variance": 1 - float(state.mse_sum) / spread if spread > 0 else None,
            "dead_share": float(self.dead_latents.double().mean()),
        }

    def _gaps(self, layer_conditions: dict[str, Any]) -> dict[str, Any]:
        gaps: dict[str, Any] = {"decoder": self._gap_entry(self.checks("decoder", None, layer_finding=True)[0])}
        bias = layer_conditions["C5"]["certificate"]
        none = {"gain": 0.0, "share": 0.0, "se": 0.0, "n_tokens": self.n_held, "p_value": None}
        gaps["bias"] = self._gap_entry(bias) if bias is not None else none
        if "C7" in layer_conditions:  # a skip transcoder: its W_skip step, as the bias step
            skip = layer_conditions["C7"]["certificate"]
            gaps["skip"] = self._gap_entry(skip) if skip is not None else dict(none)
        if self.plan.lam is not None:
            gaps["codes"] = self._code_gap()
        return gaps

    @staticmethod
    def _gap_entry(check: CertificateCheck) -> dict[str, Any]:
        return {"gain": check.gain, "share": check.share, "se": check.held_out_se, "n_tokens": check.n_held_out,
                "p_value": check.p_value, "step": check.step}

    def _code_gap(self) -> dict[str, Any] | None:
        sample, plan, opts = self.plan.state.sample, self.plan, self.opts
        if sample.x is None or len(sample.tokens) < 2:
            return None
        device = plan.atoms.device
        x, z = sample.x.to(device), sample.z.to_dense().to(device)
        atoms, bias = plan.atoms.double(), plan.bias.double()
        solve = exact_codes(x, atoms, bias, plan.lam, z, max_iter=opts.code_gap_max_iter, tol=opts.code_gap_tol,
                            weight=sample.weight.to(device))
        gains = (solve.loss_before - solve.loss_after).double().cpu()
        n = len(gains)
        windows = Clustered(1)  # SE over the sample's windows
        windows.update(gains[:, None], sample.window)
        est = pol.window_estimate(windows)
        return {  # a share of the layer's held-out L, as every gap (THEORY.md section 5)
            "gain": float(est.mean[0]), "se": finite_or_none(est.se[0]), "n_tokens": n, "n_windows": int(windows.n_windows),
            "share": float(est.mean[0]) / self.loss if self.loss > 0 else None,
            "l0_before": float((z > 0).sum(1).double().mean()), "l0_after": float((solve.z > 0).sum(1).double().mean()),
            "iterations": solve.iterations, "converged": solve.converged, "tol": opts.code_gap_tol,
        }

    # -- features -------------------------------------------------------------------------
    def _feature_rows(self, found: list[dict[str, CertificateCheck]], mapped: set[int]) -> list[FeatureRow]:
        """`mapped`: latents of the pair map, which carry top tokens (contexts) like flagged ones."""
        st, plan = self.stats, self.plan
        flagged = sorted({k for k, c in enumerate(found) if c} | mapped)
        top: dict[int, tuple[list[float], list[int]]] = {}
        if flagged and st.codes is not None and st.codes.n_tokens:
            values, tokens = (t.tolist() for t in st.codes.top_tokens(torch.tensor(flagged), self.opts.top_tokens))
            for k, row_values, row_tokens in zip(flagged, values, tokens):
                kept = [(v, t) for v, t in zip(row_values, row_tokens) if v > 0]
                top[k] = ([v for v, _ in kept], [t for _, t in kept])
        mu, floor = st.mu.tolist(), plan.floor.floor.tolist()
        sizes3 = plan.decoder.size
        if plan.signed:  # a latent's tied size, on the rows of both its signs
            sizes3 = torch.cat([sizes3, sizes3])
        counts, maxima, sizes3 = st.active_count.tolist(), st.max_z.tolist(), sizes3.tolist()
        g4, size4 = self._g4()
        worth = self.values.tolist()
        rows = []
        for k in range(len(mu)):
            checks = found[k]
            names = sorted(checks, key=lambda n: pol.rank_key(checks[n].tier, checks[n].gain, (n,)))
            best = checks[names[0]] if names else None
            values, tokens = top.get(k, ([], []))
            rows.append(FeatureRow(
                id=k, tier=best.tier if best else "satisfied", conditions=names, active_count=counts[k],
                mean_code=mu[k], max_code=maxima[k], min_code=floor[k], c3_size=sizes3[k],
                c4_gain=g4[k], c4_size=size4[k],
                gain=best.gain if best else None, gain_se=best.held_out_se if best else None,
                p_value=best.p_value if best else None, value=finite_or_none(worth[k]),
                share=best.share if best else None, certificates=dict(checks),
                top_tokens=tokens, top_values=values,
            ))
        return rows

    def _g4(self) -> tuple[list[float | None], list[float | None]]:
        """G4_i and its size (THEORY.md C4) per feature, None where not evaluated."""
        st, plan, n_features = self.stats, self.plan, self.plan.atoms.shape[0]
        totals = plan.lam_totals()
        if totals is None or st.codes is None or st.codes.aux is None:
            return [None] * n_features, [None] * n_features
        active = c4_codes.active_gain(st.codes, plan.lam)
        code = c4_codes.c4_codes(active.cpu(), totals.inactive_gain.cpu(), st.active_count.cpu(), st.n_tokens, plan.lam)
        live = (st.active_count > 0).cpu()
        gain = torch.where(live, code.gain, math.nan).tolist()
        size = torch.where(live, code.size, math.nan).tolist()
        return [finite_or_none(v) for v in gain], [finite_or_none(v) for v in size]


@contextlib.contextmanager
def python_gc_paused():
    """Python's cyclic garbage collector paused while a layer's records are built: they are
    acyclic (freed by reference counts alone), but building tens of thousands of them triggers
    full collections that scan every live object, which measured a third of the result stage at
    K = 24,576 (docs/BENCHMARKS.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _name_signs(layer: LayerResult) -> None:
    """A signed SAE's rows, built on its doubled dictionary's atoms, renamed to name the SAE's latent
    and the sign: atom a < d_sae is latent a's "+", atom d_sae + a latent a's "-" (theory/signed.py).
    The features keep their order: row d_sae + a is latent a's negative sign (`LayerResult.row`)."""
    n = layer.d_sae
    for f in layer.features:
        f.id, f.sign = latent_and_sign(f.id, n)
    for r in [*layer.pairs, *layer.duplicates, *layer.antipodal]:
        (r.i, r.sign_i), (r.j, r.sign_j) = latent_and_sign(r.i, n), latent_and_sign(r.j, n)
    for r in layer.absorption:
        (r.parent, r.parent_sign), (r.child, r.child_sign) = latent_and_sign(r.parent, n), latent_and_sign(r.child, n)


def _unmeasured(condition: str, step: float) -> CertificateCheck:
    """An exact violation of C1 or C2 without lam: its gain is lam times a margin, so unmeasurable."""
    return CertificateCheck(condition, step, None, None, tier="violated", reason="no lam to measure its gain")


def _scatter_rows(zi: Tensor, zj: Tensor, limit: int) -> Tensor:
    """A deterministic, evenly spaced sample of tokens where i or j fires, plus a few where neither does."""
    either = torch.nonzero((zi > 0) | (zj > 0)).flatten()
    neither = torch.nonzero((zi == 0) & (zj == 0)).flatten()
    take = lambda idx, n: idx[torch.linspace(0, len(idx) - 1, min(n, len(idx))).long()] if len(idx) else idx  # noqa: E731
    return torch.cat([take(either, limit - limit // 10), take(neither, limit // 10)])


def _window_groups(window: Tensor | None, n: int) -> list[Tensor] | None:
    """Row indices of each window in a batch, or None when every token is its own window."""
    if window is None:
        return None
    ids, slot = torch.unique(window, return_inverse=True)
    if len(ids) == n:
        return None
    order = torch.argsort(slot, stable=True)
    return list(torch.split(order, torch.bincount(slot, minlength=len(ids)).tolist()))


def rows_of(weight: Tensor | None, rows: Tensor) -> Tensor | None:
    """The token weights of the selected rows (None stays None: an unweighted SAE)."""
    return None if weight is None else weight[rows]


def _check_batch(x: Tensor, z: Tensor, atoms: Tensor, token_index: Tensor | None, weight: Tensor | None = None,
                 inputs: Tensor | None = None) -> None:
    n_features, d = atoms.shape
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must be (n, {d}) in the SAE's input space; got {tuple(x.shape)}")
    if z.ndim != 2 or z.shape != (x.shape[0], n_features):
        raise ValueError(f"z must be (n, {n_features}) codes for the same {x.shape[0]} tokens; got {tuple(z.shape)}")
    if token_index is not None and token_index.shape != (x.shape[0],):
        raise ValueError(f"token_index must be ({x.shape[0]},), one index per token; got {tuple(token_index.shape)}")
    z_min, z_max = z.aminmax() if z.numel() else (torch.zeros(()), torch.zeros(()))  # one pass; NaN propagates
    if not (torch.isfinite(x).all() and torch.isfinite(z_min) and torch.isfinite(z_max)):
        raise ValueError(
            "non-finite values (NaN or inf) in the SAE input or codes: no verdict can be computed "
            "from them; find the offending tokens or skip them (audit(..., nonfinite='skip'))"
        )
    if z_min < 0:
        raise ValueError("codes must be nonnegative (theory units: z = f * ||W_dec||)")
    if weight is not None:
        if weight.shape != (x.shape[0],):
            raise ValueError(f"weight must be ({x.shape[0]},), one token weight w_n per token; got {tuple(weight.shape)}")
        if not bool((torch.isfinite(weight) & (weight > 0)).all()):
            raise ValueError(
                "token weights must be finite and > 0 (w_n = s_n^2, the square of the token's normalising "
                "scale): a token with zero spread cannot be normalised; leave it out"
            )
    if inputs is not None and (inputs.ndim != 2 or inputs.shape[0] != x.shape[0]):
        raise ValueError(f"inputs must be (n, d_in), a skip transcoder's input for each of the {x.shape[0]} tokens; "
                         f"got {tuple(inputs.shape)}")
    if inputs is not None and not bool(torch.isfinite(inputs).all()):
        raise ValueError("non-finite values (NaN or inf) in the transcoder's inputs: no verdict can be computed from them")
