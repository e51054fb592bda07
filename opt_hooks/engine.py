"""The audit of one SAE layer, in theory units: pass 1 -> plan -> pass 2 -> LayerResult.

    audit = LayerAudit(atoms, bias, lam=...)
    for x, z in audit_batches:            # audit tokens only
        audit.update(x, z)
    plan = audit.plan()                   # C1-C6 margins, every certificate built and
                                          # measured on the audit tokens from pass 1's state
    for x, z, held in pass_two_batches:   # held-out tokens (and, when lam was estimated,
        plan.update(x, z, held_out=held)  # the audit tokens again: plan.needs_audit_tokens)
    layer = plan.result()                 # opt_hooks.result.LayerResult

Pass 1 keeps the sparse codes with each active <d_i, r_n>, so every certificate's exact
change on the audit tokens is a closed form of its state (see theory/certificates.py): the
data is streamed once, plus the held-out share. Only C4's inactive terms need lam on every
(token, feature), so they are summed in pass 1 when lam is known. The API estimates an unknown
lam beforehand on the first audit windows (`LamCalibration`); a LayerAudit given lam=None
estimates it on every audit token after pass 1 and its plan then needs the audit tokens again.

Both stages are mergeable (`merge`, `state_dict`), so batches, resumed runs and distributed
ranks combine exactly. Pure tensor code: no TransformerLens / SAE-Lens import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opt_hooks.result import CertificateCheck, FeatureRow, LayerResult, PairRow, TIER_RANK
from opt_hooks.theory import certificates as certs
from opt_hooks.theory import conditions as cond
from opt_hooks.theory.stats import LamStatistics, LamTotals, LayerStatistics, LayerStats, TokenBatch, residuals_at_entries


@dataclass
class AuditOptions:
    """Tolerances and sizes. Sizes are relative (dimensionless), see conditions.py."""

    pair_rel_tol: float = 1e-6  # C2 margin must exceed this share of mu_j
    c3_tol: float = 1e-5  # C3 size above which the decoder certificate is tried
    c4_tol: float = 1e-3  # C4 size above which the code certificate counts (lam may be estimated)
    c5_tol: float = 1e-5
    max_pairs: int | None = 50_000  # most severe C2 pairs given certificates (None: all)
    lam_calibration_tokens: int = 16_384  # audit tokens whose active <d_i, r_n> estimate an unknown lam
    worst_k: int = 16  # worst-residual tokens kept for C6
    top_tokens: int = 5  # top activations reported per flagged feature
    scatter_pairs: int = 64  # flagged pairs that carry a scatter sample
    scatter_points: int = 400


class LayerAudit:
    """Pass 1: lam-free statistics of one SAE over the audit tokens."""

    def __init__(
        self,
        atoms: Tensor,
        bias: Tensor,
        *,
        lam: float | None = None,
        lam_estimated: bool = False,
        hook_name: str = "sae",
        architecture: str = "standard",
        scope: str = "L1 objective (exact)",
        options: AuditOptions | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if lam is not None:
            cond.check_lam(lam)
        # lam None: estimated from every audit token once pass 1 is done (pass 2 then streams
        # them again); lam_estimated: lam was estimated beforehand (`LamCalibration`)
        self.lam_estimated = lam is None or lam_estimated
        if not (torch.isfinite(atoms).all() and torch.isfinite(bias).all()):
            raise ValueError(f"{hook_name}: non-finite values (NaN or inf) in the SAE's decoder or b_dec")
        self.atoms, self.bias, self.lam = atoms, bias, lam
        self.hook_name, self.architecture, self.scope = hook_name, architecture, scope
        self.options = options or AuditOptions()
        self.meta = dict(meta or {})
        self.stats = LayerStats(atoms, bias, lam=lam, worst_k=self.options.worst_k)

    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None) -> None:
        _check_batch(x, z, self.atoms, token_index)
        self.stats.update(x, z, token_index)

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
        try:
            return AuditPlan(self, self.stats.compute())
        except ValueError as error:  # e.g. lam cannot be estimated: say which SAE
            raise ValueError(f"{self.hook_name}: {error}") from error

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
    <d_i, r_n> over the active (n, i) of the calibration tokens, the first audit tokens.

    Known before pass 1, lam_hat lets C4's inactive terms be summed in pass 1 itself, so the
    audit tokens are streamed once. The calibration tokens are audit tokens like any other."""

    def __init__(self, atoms: Tensor, bias: Tensor, hook_name: str = "sae") -> None:
        self.atoms, self.bias, self.hook_name = atoms, bias, hook_name
        self.projections: list[Tensor] = []
        self.n_tokens = 0

    @property
    def n_codes(self) -> int:
        return sum(len(p) for p in self.projections)

    def update(self, x: Tensor, z: Tensor) -> None:
        _check_batch(x, z, self.atoms, None)
        self.projections.append(residuals_at_entries(x, z, self.atoms, self.bias)[3])
        self.n_tokens += x.shape[0]

    def compute(self) -> float:
        try:
            return cond.estimate_lam(torch.cat(self.projections) if self.projections else torch.zeros(0))
        except ValueError as error:
            raise ValueError(f"{self.hook_name}: {error}") from error


class AuditPlan:
    """The conditions evaluated on pass-1 statistics, and every certificate's exact change of
    L at each step of its ladder: on the audit tokens from pass 1's state, on the held-out
    tokens in pass 2."""

    def __init__(self, audit: LayerAudit, stats: LayerStatistics) -> None:
        self.audit, self.stats, self.options = audit, stats, audit.options
        self.atoms, self.bias = audit.atoms, audit.bias
        self.lam_estimated = audit.lam_estimated
        self.lam = cond.estimate_lam(stats.active_projections) if audit.lam is None else float(audit.lam)
        self.floor = cond.c1_floor(stats)
        self.pairs = cond.c2_pairs(stats, self.atoms, rel_tol=self.options.pair_rel_tol)
        self.pairs_total = len(self.pairs.i)
        self.decoder = cond.c3_decoder(stats, self.atoms)
        self.bias_check = cond.c5_bias(stats)
        self.spare = cond.c6_spare(stats, self.lam)
        self.families = self._build_certificates()
        # lam estimated: C4's inactive terms and the C6 count are summed over the audit tokens
        # in pass 2, with the estimate
        self.needs_audit_tokens = stats.lam_totals is None
        self.state = _Pass2State(self.families, self.atoms.shape[0], self.atoms.device, self.needs_audit_tokens)
        self._audit_changes: dict[str, tuple[Tensor, Tensor]] | None = None

    # -- certificates -----------------------------------------------------------------
    def _build_certificates(self) -> dict[str, Any]:
        st, dev, opts = self.stats, self.atoms.device, self.options
        idx = lambda mask: torch.nonzero(mask.to(dev)).flatten()  # noqa: E731
        families: dict[str, Any] = {}
        floor_ids = idx(self.floor.violated)
        families["C1"] = certs.FloorCertificates(floor_ids, self.floor.floor.to(dev)[floor_ids])
        order = torch.argsort(self.pairs.margin / self.stats.mu.to(self.pairs.margin.device)[self.pairs.j], descending=True)
        if opts.max_pairs is not None:
            order = order[: opts.max_pairs]
        self.pair_order = order
        p = self.pairs
        families["C2"] = certs.PairCertificates(
            p.i[order].to(dev), p.j[order].to(dev), p.kind[order].to(dev), p.bound[order].to(dev), p.rho[order].to(dev)
        )
        alive = st.active_count > 0
        decoder_ids = idx((self.decoder.size > opts.c3_tol) & alive)
        grads = self.decoder.gradient.to(dev)[decoder_ids]
        families["C3"] = certs.DecoderCertificates(
            decoder_ids, self.atoms[decoder_ids], grads / grads.norm(dim=-1, keepdim=True)
        )
        code_ids = idx(alive)
        scale = (st.sum_z / st.active_count.clamp(min=1)).to(dev)[code_ids]
        families["C4"] = certs.CodeCertificates(code_ids, scale)
        if self.bias_check.norm > 0:
            families["C5"] = certs.BiasCertificate(self.bias_check.mean_residual.to(dev) / self.bias_check.norm, self.bias_check.norm)
        dead_ids = idx(self.spare.dead)
        worst = st.worst_rnorm.to(dev)
        if len(dead_ids) and len(worst) and float(worst[0]) > 0:
            usable = int((worst > 0).sum())
            slot = torch.arange(len(dead_ids), device=dev) % usable  # dead feature t -> t-th worst token
            vectors = st.worst_residual.to(dev)[slot]
            families["C6"] = certs.SpareCertificates(dead_ids, vectors / worst[slot, None], worst[slot])
        return families

    # -- pass 2 -----------------------------------------------------------------------
    def update(self, x: Tensor, z: Tensor, token_index: Tensor | None = None, held_out: Tensor | None = None) -> None:
        """Add a batch of held-out tokens (held_out True) and, when `needs_audit_tokens`, audit
        tokens (False; otherwise they are ignored: pass 1's state already measured them)."""
        _check_batch(x, z, self.atoms, token_index)
        if held_out is None:
            held_out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if held_out.shape != (x.shape[0],) or held_out.dtype != torch.bool:
            raise ValueError(f"held_out must be a bool mask ({x.shape[0]},); got {held_out.dtype} {tuple(held_out.shape)}")
        rows = held_out if not self.needs_audit_tokens else torch.ones_like(held_out)
        if not bool(rows.any()):
            return
        x, z, held_out = x[rows], z[rows], held_out[rows]
        if bool(held_out.any()):
            tokens = TokenBatch.from_tokens(x[held_out], z[held_out], self.atoms, self.bias, self.lam)
            self.state.add_held_out(tokens.n_tokens)
            for name, family in self.families.items():
                self.state.add(name, family.token_change(tokens, self.lam)[0])
        audit = ~held_out
        if self.needs_audit_tokens and bool(audit.any()):
            tokens = TokenBatch.from_tokens(x[audit], z[audit], self.atoms, self.bias, self.lam)
            self.state.n_audit += tokens.n_tokens
            totals = tokens.totals
            self.state.add_lam_terms(totals.over_count, totals.over_excess, totals.n_over_half_lam)

    def merge(self, other: "AuditPlan") -> "AuditPlan":
        self.state.merge(other.state)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    # -- results ----------------------------------------------------------------------
    def lam_totals(self) -> LamTotals:
        """The lam statistics of the audit tokens: from pass 1 when lam was known, else pass 2's."""
        return self.stats.lam_totals if self.stats.lam_totals is not None else self.state.lam_totals()

    def audit_changes(self, name: str) -> tuple[Tensor, Tensor]:
        """A family's exact and first-order changes of sum_n loss_n on the audit tokens, (E, F)."""
        if self._audit_changes is None:
            totals = self.lam_totals()
            self._audit_changes = {
                key: family.audit_change(self.stats, totals, self.lam) for key, family in self.families.items()
            }
        return self._audit_changes[name]

    def checks(self, name: str) -> list[CertificateCheck]:
        """One CertificateCheck per certificate of a family: the largest step of its ladder
        that lowers L on the audit tokens (the smallest step when none does)."""
        family, st = self.families.get(name), self.state
        if family is None:
            return []
        n_audit, n_held = self.stats.n_tokens, int(st.n_held_out)
        change, first = self.audit_changes(name)
        held_change = getattr(st, f"{name}_change")
        descends = change < 0  # (E, F)
        chosen = torch.where(descends.any(0), descends.double().argmax(0), len(family.eps) - 1)
        cols = torch.arange(change.shape[-1], device=change.device)
        measured = (change[chosen, cols] / max(n_audit, 1)).tolist()
        predicted = (first[chosen, cols] / max(n_audit, 1)).tolist()
        held = (held_change[chosen, cols.to(held_change.device)] / n_held).tolist() if n_held else [None] * len(cols)
        eps = [family.eps[e] for e in chosen.tolist()]
        return [
            CertificateCheck(name, eps[k], predicted[k], measured[k], held[k], n_audit, n_held)
            for k in range(len(cols))
        ]

    def result(self) -> LayerResult:
        if self.needs_audit_tokens and int(self.state.n_audit) != self.stats.n_tokens:
            raise RuntimeError(
                f"pass 2 saw {int(self.state.n_audit)} audit tokens but pass 1 saw {self.stats.n_tokens}: "
                "with lam estimated, pass 2 must stream the same audit tokens again"
            )
        return _LayerAssembler(self).assemble()


class _Pass2State(LamStatistics):
    """Pass 2's sums: the certificates' changes on the held-out tokens and, with lam
    estimated, the lam statistics of the audit tokens."""

    def __init__(self, families: dict[str, Any], n_features: int, device: torch.device, audit_terms: bool) -> None:
        super().__init__()
        self.add_state("n_held_out", torch.zeros((), dtype=torch.int64, device=device), "sum")
        for name, family in families.items():
            self.add_state(f"{name}_change", torch.zeros(len(family.eps), len(family), dtype=torch.float64, device=device), "sum")
        if audit_terms:
            self.add_state("n_audit", torch.zeros((), dtype=torch.int64, device=device), "sum")
            self.add_lam_states(n_features, device)

    def add_held_out(self, n: int) -> None:
        self.n_held_out += n

    def add(self, name: str, change: Tensor) -> None:
        getattr(self, f"{name}_change").add_(change)


class _LayerAssembler:
    """Turns a finished plan into a LayerResult (rows, tiers, severities)."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan, self.stats, self.opts = plan, plan.stats, plan.options
        self.checks = {name: plan.checks(name) for name in plan.families}
        n_features = plan.atoms.shape[0]
        self.conditions: list[dict[str, CertificateCheck]] = [{} for _ in range(n_features)]
        self.severity = [0.0] * n_features

    def _flag(self, feature: int, name: str, check: CertificateCheck, severity: float) -> None:
        if check.tier == "satisfied":
            return
        current = self.conditions[feature].get(name)
        if current is None or TIER_RANK[check.tier] < TIER_RANK[current.tier] or (
            check.tier == current.tier and check.measured < current.measured
        ):
            self.conditions[feature][name] = check
        self.severity[feature] = max(self.severity[feature], severity)

    def assemble(self) -> LayerResult:
        plan, st = self.plan, self.stats
        mu = st.mu
        fam = plan.families
        for k, check in zip(fam["C1"].features.tolist(), self.checks["C1"]):
            self._flag(k, "C1", check, float(plan.floor.floor[k] / max(mu[k].item(), 1e-300)))
        for k, check in zip(fam["C3"].features.tolist(), self.checks["C3"]):
            self._flag(k, "C3", check, float(plan.decoder.size[k]))
        code_features = fam["C4"].features
        gain_active, gain_inactive = fam["C4"].audit_gain(st, plan.lam_totals(), plan.lam)
        code = cond.c4_codes(gain_active, gain_inactive, st.active_count.to(code_features.device)[code_features], st.n_tokens, plan.lam)
        # NaN (None in the rows): not evaluated. C4's certificates need an active feature's
        # mean code as their scale, so dead features are left to C6.
        c4_gain = torch.full((len(mu),), math.nan, dtype=torch.float64)
        c4_size = torch.full((len(mu),), math.nan, dtype=torch.float64)
        c4_gain[fam["C4"].features.cpu()] = code.gain.cpu()
        c4_size[fam["C4"].features.cpu()] = code.size.cpu()
        for k, check in zip(fam["C4"].features.tolist(), self.checks["C4"]):
            if c4_size[k] > self.opts.c4_tol:
                self._flag(k, "C4", check, float(c4_size[k]))
        layer_conditions = {"C5": self._c5(), "C6": self._c6()}
        pairs = self._pairs()
        rows = self._feature_rows(c4_gain, c4_size)
        notes = []
        if plan.pairs_total > len(plan.pair_order):
            notes.append(
                f"{plan.pairs_total} C2 pairs violated; certificates evaluated for the "
                f"{len(plan.pair_order)} most severe (AuditOptions.max_pairs)"
            )
        return LayerResult(
            hook_name=plan.audit.hook_name,
            architecture=plan.audit.architecture,
            scope=plan.audit.scope,
            lam=plan.lam,
            lam_estimated=plan.lam_estimated,
            d_in=int(plan.atoms.shape[1]),
            d_sae=int(plan.atoms.shape[0]),
            n_tokens=st.n_tokens,
            n_held_out=int(plan.state.n_held_out),
            features=rows,
            pairs=pairs,
            layer_conditions=layer_conditions,
            dead_features=torch.nonzero(st.dead).flatten().tolist(),
            notes=notes,
            **{k: plan.audit.meta.get(k) for k in ("sae_id", "neuronpedia_id")},
        )

    def _pairs(self) -> list[PairRow]:
        plan, st, p = self.plan, self.stats, self.plan.pairs
        order = plan.pair_order.cpu()
        rows: list[PairRow] = []
        checks = self.checks["C2"]
        mu = st.mu
        for rank, k in enumerate(order.tolist()):
            i, j = int(p.i[k]), int(p.j[k])
            check = checks[rank]
            count_i, count_j, co = int(p.count_i[k]), int(p.count_j[k]), int(p.co_count[k])
            margin = float(p.margin[k])
            row = PairRow(
                i=i, j=j, kind="hierarchy" if int(p.kind[k]) > 0 else "complementary",
                rho=float(p.rho[k]), bound=float(p.bound[k]), threshold=float(p.threshold[k]),
                margin=margin, relative_margin=margin / float(mu[j]),
                count_i=count_i, count_j=count_j, co_count=co,
                p_j_without_i_upper=_upper_rate(count_j - co, count_j),
                tier=check.tier, certificate=check,
            )
            rows.append(row)
            severity = row.relative_margin
            self._flag(i, "C2", check, severity)
            self._flag(j, "C2", check, severity)
        self._attach_scatter(rows)
        rows.sort(key=lambda r: (TIER_RANK[r.tier], -r.relative_margin, r.i, r.j))
        return rows

    def _attach_scatter(self, rows: list[PairRow]) -> None:
        codes = self.stats.codes
        shown = sorted(rows, key=lambda r: (TIER_RANK[r.tier], -r.relative_margin))[: self.opts.scatter_pairs]
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

    def _c5(self) -> dict[str, Any]:
        check = self.plan.bias_check
        out: dict[str, Any] = {"size": check.size, "norm": check.norm, "tier": "satisfied", "certificate": None}
        if "C5" in self.checks:
            cert = self.checks["C5"][0]
            out["certificate"] = cert
            if check.size > self.opts.c5_tol:
                out["tier"] = cert.tier
        return _jsonable(out)

    def _c6(self) -> dict[str, Any]:
        spare, st = self.plan.spare, self.stats
        out: dict[str, Any] = {
            "n_dead": int(spare.dead.sum()),
            "max_rnorm": spare.max_rnorm,
            "threshold": spare.threshold,
            "margin": spare.margin,
            "n_over_threshold": self.plan.lam_totals().n_over_half_lam,
            "worst_tokens": st.worst_token.tolist(),
            "worst_rnorms": st.worst_rnorm.tolist(),
            "tier": "satisfied",
            "certificate": None,
        }
        checks = self.checks.get("C6", [])
        if checks and spare.violated:
            best = min(checks, key=lambda c: (TIER_RANK[c.tier], c.measured))
            out["certificate"], out["tier"] = best, best.tier
            for k, check in zip(self.plan.families["C6"].features.tolist(), checks):
                self._flag(k, "C6", check, spare.margin / max(spare.threshold, 1e-300))
        return _jsonable(out)

    def _feature_rows(self, c4_gain: Tensor, c4_size: Tensor) -> list[FeatureRow]:
        st, plan = self.stats, self.plan
        flagged = [k for k, c in enumerate(self.conditions) if c]
        top: dict[int, tuple[list[float], list[int]]] = {}
        if flagged and st.codes is not None and st.codes.n_tokens:
            values, tokens = st.codes.top_tokens(torch.tensor(flagged), self.opts.top_tokens)
            for row, k in enumerate(flagged):
                keep = values[row] > 0
                top[k] = (values[row][keep].tolist(), tokens[row][keep].tolist())
        mu, floor = st.mu.tolist(), plan.floor.floor.tolist()
        counts, maxima, sizes3 = st.active_count.tolist(), st.max_z.tolist(), plan.decoder.size.tolist()
        gains, sizes4 = ([None if math.isnan(v) else v for v in t.tolist()] for t in (c4_gain, c4_size))
        rows = []
        for k in range(len(mu)):
            found = self.conditions[k]
            names = sorted(found, key=lambda n: (TIER_RANK[found[n].tier], found[n].measured))
            tier = found[names[0]].tier if names else "satisfied"
            values, tokens = top.get(k, ([], []))
            rows.append(
                FeatureRow(
                    id=k, tier=tier, conditions=names, active_count=counts[k], mean_code=mu[k],
                    max_code=maxima[k], min_code=floor[k], c3_size=sizes3[k], c4_gain=gains[k],
                    c4_size=sizes4[k], severity=self.severity[k], certificates=dict(found),
                    top_tokens=tokens, top_values=values,
                )
            )
        return rows


def _scatter_rows(zi: Tensor, zj: Tensor, limit: int) -> Tensor:
    """A deterministic, evenly spaced sample of tokens where i or j fires, plus a few where neither does."""
    either = torch.nonzero((zi > 0) | (zj > 0)).flatten()
    neither = torch.nonzero((zi == 0) & (zj == 0)).flatten()
    take = lambda idx, n: idx[torch.linspace(0, len(idx) - 1, min(n, len(idx))).long()] if len(idx) else idx  # noqa: E731
    return torch.cat([take(either, limit - limit // 10), take(neither, limit // 10)])


def _upper_rate(failures: int, trials: int) -> float:
    """95% upper bound on a rate: the rule of three when nothing failed, else Wilson's bound."""
    if trials <= 0:
        return 1.0
    if failures == 0:
        return min(1.0, 3.0 / trials)
    z, p = 1.6448536269514722, failures / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z * z / trials))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    return {k: (dataclasses.asdict(v) if isinstance(v, CertificateCheck) else v) for k, v in d.items()}


def _check_batch(x: Tensor, z: Tensor, atoms: Tensor, token_index: Tensor | None) -> None:
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
