"""Audit records: plain data, JSON round-trip, atomic saving.

Nothing here computes maths or renders anything: `engine.py` fills these records, `report/` and
the CLI only read them, and `result.AuditResult` is the record users hold (it adds the methods
that render it). This module imports nothing from either side.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_hooks.policy import TIER_RANK, TIERS, rank_key

SCHEMA_VERSION = "4.0"

__all__ = ["TIERS", "TIER_RANK", "CONDITIONS", "CertificateCheck", "FeatureRow", "PairRow", "AbsorptionRow",
           "DuplicateRow", "AntipodalRow", "LayerResult", "AuditRecord"]

# Human-readable names of the conditions of THEORY.md section 2.
CONDITIONS = {
    "C1": "floor: every feature must be off somewhere",
    "C2": "pair / hierarchy condition",
    "C3": "decoder stationarity",
    "C4": "code optimality (optimal shrinkage)",
    "C5": "bias stationarity",
    "C6": "dead features must not see large residuals",
    "C7": "skip stationarity (skip transcoders: residual uncorrelated with the input)",
}
# The conditions that are one finding per layer, not per feature or pair.
LAYER_CONDITIONS = ("C5", "C6", "C7")


def latent_label(latent: int, sign: str | None = None) -> str:
    """How text names a latent: "12"; one sign of a signed SAE's latent (THEORY.md section 9) as
    "12+" or "12−"."""
    return str(latent) if sign is None else f"{latent}{'+' if sign == '+' else '−'}"


@dataclass
class CertificateCheck:
    """A fixed change of the SAE, what it did to the objective L (per token), and its verdict.

    `step` was chosen by line search on the audit tokens; `predicted` is the first-order and
    `measured` the exact change of L there. `held_out` is the exact change of L on held-out
    tokens at that step, with its standard error and one-sided p-value (None without held-out
    tokens); `gain` = -held_out; `share` = gain over the scale it is judged against (the
    feature's value, or the layer's held-out L); `tier` and `reason` are the policy's verdict
    (opt_hooks/policy.py)."""

    condition: str
    step: float | None  # None only in a feature's non-certified check read back from report.json
    predicted: float | None  # None: not measurable (C1 and C2 without lam)
    measured: float | None
    held_out: float | None = None
    held_out_se: float | None = None
    p_value: float | None = None
    gain: float | None = None
    share: float | None = None
    tier: str = "satisfied"
    reason: str = ""
    n_audit: int = 0
    n_held_out: int = 0
    n_touched: int = 0  # held-out tokens whose loss the change moves
    count_p_value: float | None = None  # C2: co-activation against independence (Chernoff bound)

    @property
    def descends(self) -> bool:
        return self.measured is not None and self.measured < 0


@dataclass
class FeatureRow:
    """One feature of one SAE: its statistics, its findings and their verdicts.

    `gain`, `gain_se`, `p_value` and `share` are those of its best certificate (the first of
    `conditions`); `value` is v_i on the held-out tokens (THEORY.md 3.4).

    A signed SAE (AbsTopK, THEORY.md section 9) has two rows per latent `id`, one per `sign` of its
    codes: each row's statistics are those of that sign's codes (their sizes |z|, zeros where the
    latent is off or has the other sign), its conditions those of the atom d_i ("+") or -d_i ("-").
    C3 is the latent's (its decoder row serves both signs): the same check on both rows."""

    id: int
    tier: str
    conditions: list[str]  # conditions with a descent, best certificate first
    active_count: int
    mean_code: float  # mu_i, mean over all audit tokens, zeros included
    max_code: float
    min_code: float  # C1: must be 0
    c3_size: float  # ||g_i|| / ((1/N) sum z ||r||), in [0, 1]
    c4_gain: float | None  # G4_i (None without lam)
    c4_size: float | None  # G4_i / (lam * active share)
    gain: float | None = None
    gain_se: float | None = None
    p_value: float | None = None
    value: float | None = None
    share: float | None = None
    certificates: dict[str, CertificateCheck] = field(default_factory=dict)
    top_tokens: list[int] = field(default_factory=list)  # global token indices, strongest first
    top_values: list[float] = field(default_factory=list)
    # per top token with a context (AuditRecord.token_pieces), the feature's code at each of the
    # context's tokens, in top_values' units; [] where no context was kept
    top_context_values: list[list[float]] = field(default_factory=list)
    sign: str | None = None  # a signed SAE's row: "+" or "-", the sign of latent `id`'s codes; None otherwise

    @property
    def label(self) -> str:
        return latent_label(self.id, self.sign)


@dataclass
class PairRow:
    """A flagged ordered pair (i, j) under C2.

    kind "hierarchy": M = max of z_j where i is off lies below (1 - rho) mu_j;
    kind "complementary": m = min of z_j where i is off lies above it.
    """

    i: int
    j: int
    kind: str
    rho: float
    bound: float  # M (hierarchy) or m (complementary)
    threshold: float  # (1 - rho) * mu_j
    margin: float  # distance past the threshold, >= 0
    relative_margin: float  # margin / mu_j
    count_i: int  # tokens where i is active
    count_j: int  # tokens where j is active
    co_count: int  # tokens where both are active
    p_j_without_i_upper: float  # 95% upper bound on P(j fires without i)
    tier: str
    certificate: CertificateCheck | None = None
    sample_i: list[float] = field(default_factory=list)  # responses for the scatter plot
    sample_j: list[float] = field(default_factory=list)
    # Exact [min, max] of z_j over A_i (tokens where i is off), the hull C2 compares with the
    # threshold; drawn in the report's pair plot. None where the engine kept no scatter sample.
    hull_min: float | None = None
    hull_max: float | None = None
    sign_i: str | None = None  # a signed SAE: the signs of i's and j's codes ("+" / "-"); None otherwise
    sign_j: str | None = None

    @property
    def gain(self) -> float | None:
        return None if self.certificate is None else self.certificate.gain


@dataclass
class AbsorptionRow:
    """A parent latent absorbed into a child latent (THEORY.md section 6), found without labels.

    The child's atom is split into its parent part and its own part,
    d_child = rho d_parent + sqrt(1 - rho^2) d_own; the parent is off on `fraction` of the
    child's audit tokens; on the held-out tokens where the child is on and the parent off, the
    input's component along d_parent is `evidence` times its mean where the parent fires."""

    parent: int
    child: int
    rho: float  # <d_parent, d_child>: the parent part of the child's decoder
    own_part: float  # sqrt(1 - rho^2): the child's own part
    count_parent: int  # audit tokens where the parent is active
    count_child: int  # audit tokens where the child is active
    co_count: int  # audit tokens where both are active
    fraction: float  # (count_child - co_count) / count_child: share of the child's tokens without the parent
    l1_price: float | None  # lam * mu_child * (rho + sqrt(1 - rho^2) - 1): the rise of L when split back
    evidence: float  # held out: mean <d_parent, x - b> with the child on and the parent off / with the parent on
    evidence_se: float
    evidence_p: float  # one-sided p-value of evidence >= min_evidence failing, before the multiplicity correction
    n_evidence: int  # held-out tokens with the child on and the parent off
    reverse_evidence: float | None  # the same share with the roles swapped (orientation check)
    parent_sign: str | None = None  # a signed SAE: the signs of the parent's and child's codes; None otherwise
    child_sign: str | None = None


@dataclass
class LatentPair:
    """Two latents of the pair map with their atoms' cosine and their audit-token counts."""

    i: int
    j: int
    rho: float
    count_i: int
    count_j: int
    co_count: int  # tokens where both are active


@dataclass
class DuplicateRow(LatentPair):
    """Two alive latents with nearly the same atom (rho >= duplicate_rho): one direction coded
    twice; merge them. Never an absorption pair."""

    jaccard: float  # co_count / (count_i + count_j - co_count): how often they fire together
    sign_i: str | None = None  # a signed SAE: the signs of i's and j's codes; None otherwise
    sign_j: str | None = None


@dataclass
class AntipodalRow(LatentPair):
    """Two dense latents with nearly opposite atoms (rho <= -antipodal_rho) that rarely fire
    together: a nonnegative code for one dense direction, `direction` = normalise(d_i - d_j)."""

    share: float  # (count_i + count_j - co_count) / audit tokens: the tokens the pair covers
    direction: list[float] = field(default_factory=list)
    sign_i: str | None = None  # a signed SAE: the signs of i's and j's codes; None otherwise
    sign_j: str | None = None


@dataclass
class LayerResult:
    """Everything audited for one SAE at one hook point."""

    hook_name: str
    architecture: str
    scope: str  # "L1 objective (exact)" or "L1 surrogate (<architecture>)"
    lam: float | None  # None: neither known nor estimable (C4, C6 skipped)
    lam_estimated: bool
    d_in: int
    d_sae: int
    n_tokens: int  # audit tokens
    n_held_out: int
    features: list[FeatureRow]
    pairs: list[PairRow]
    layer_conditions: dict[str, dict[str, Any]]  # "C5", "C6": margins, verdicts, certificates
    objective: dict[str, Any] = field(default_factory=dict)  # held-out L per token and its parts
    gaps: dict[str, Any] = field(default_factory=dict)  # THEORY.md section 5: codes, decoder, bias
    skipped: dict[str, str] = field(default_factory=dict)  # condition -> why it was not audited
    n_tests: int = 0  # certificates tested in the layer (the multiplicity correction's m)
    alpha: float = 0.05
    sae_id: str | None = None
    neuronpedia_id: str | None = None
    hook_name_out: str | None = None  # a transcoder's output hook (THEORY.md section 8); None for an SAE
    dead_features: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the label-free pair map (THEORY.md section 6), ordered by L1 price (trees by their total)
    absorption: list[AbsorptionRow] = field(default_factory=list)
    duplicates: list[DuplicateRow] = field(default_factory=list)
    antipodal: list[AntipodalRow] = field(default_factory=list)
    pair_map: dict[str, Any] = field(default_factory=dict)  # its thresholds and candidate counts
    # a signed SAE (AbsTopK, THEORY.md section 9): two feature rows per latent, row k its latent k's
    # positive sign and row d_sae + k its negative sign (`row`); rows, pairs and map rows carry signs
    signed: bool = False

    TABLES = ("features", "pairs", "absorption", "duplicates", "antipodal")

    def to_pandas(self, table: str = "features", certificates: bool = False) -> Any:
        """One of the layer's row lists (`TABLES`) as a pandas DataFrame, one row per row of
        report.json with its scalar and list fields. A feature's `conditions` are joined with ",".
        Nested records (a feature's certificates, a pair's certificate) and a feature's per-context codes
        (`top_context_values`, lists of lists) are left out; the records, unless
        `certificates`: then each becomes columns `<condition>_<field>` (features) or
        `certificate_<field>` (pairs), empty where there is none."""
        import pandas as pd

        if table not in self.TABLES:
            raise ValueError(f"unknown table {table!r}; choose one of {', '.join(self.TABLES)}")
        rows = [_flat_row(row, certificates) for row in getattr(self, table)]
        columns = [f.name for f in dataclasses.fields(_ROW_TYPES[table]) if f.name not in _NESTED]
        if certificates and table in ("features", "pairs"):
            prefixes = list(CONDITIONS) if table == "features" else ["certificate"]
            columns += [f"{prefix}_{name}" for prefix in prefixes for name in CERTIFICATE_COLUMNS]
        return pd.DataFrame(rows, columns=columns)

    def duplicate_groups(self) -> list[list[int]]:
        """Latents joined by duplicate pairs (connected components), largest group first: each
        group codes one direction several times and merges into one latent. Each latent by its row
        in `features` (`row`): its id, except for a signed SAE's negative signs."""
        parent: dict[int, int] = {}

        def root(k: int) -> int:
            while parent.setdefault(k, k) != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for row in self.duplicates:
            parent[root(self.row(row.i, row.sign_i))] = root(self.row(row.j, row.sign_j))
        groups: dict[int, list[int]] = {}
        for k in sorted(parent):
            groups.setdefault(root(k), []).append(k)
        return sorted(groups.values(), key=lambda g: (-len(g), g[0]))

    def absorption_trees(self) -> dict[int, list[AbsorptionRow]]:
        """Parent -> its absorption rows (siblings together), in the map's order; the parent by its
        row in `features` (`row`): its latent id, except for a signed SAE's negative signs."""
        trees: dict[int, list[AbsorptionRow]] = {}
        for row in self.absorption:
            trees.setdefault(self.row(row.parent, row.parent_sign), []).append(row)
        return trees

    def flagged_latents(self) -> set[int]:
        """Latents the audit names in any of its tables: a certified finding (C1, C3, C4), a duplicate
        pair, an absorption row (parent or child), or dead (a signed SAE's latent counts once)."""
        named = {f.id for f in self.features if f.tier == "certified"} | set(self.dead_features)
        named |= {k for r in self.duplicates for k in (r.i, r.j)}
        return named | {k for r in self.absorption for k in (r.parent, r.child)}

    def flagged_share(self) -> float | None:
        """`flagged_latents` as a share of the SAE's latents: on SynthSAEBench-recipe worlds the audit
        number that ranked SAEs by ground-truth feature recovery best (docs/VALIDATION.md, section Q)."""
        return len(self.flagged_latents()) / self.d_sae if self.d_sae else None

    def row(self, latent: int, sign: str | None = None) -> int:
        """The index in `features` of latent `latent`'s row: the latent itself, except for a signed
        SAE's negative sign (sign "-"), whose rows follow the positive ones."""
        return latent + self.d_sae if sign == "-" else latent

    def row_label(self, row: int) -> str:
        """How text names the latent of row `row` of `features`: its id ("12"), or with a signed SAE's
        sign ("12+", "12−")."""
        return self.features[row].label if self.signed else str(row)

    def flagged(self) -> list[int]:
        """Rows of `features` with a descent, certified first, then by held-out gain (THEORY.md 3.5):
        their feature ids, except for a signed SAE's negative signs (`row`)."""
        rows = [k for k, f in enumerate(self.features) if f.tier != "satisfied"]
        rows.sort(key=lambda k: rank_key(self.features[k].tier, self.features[k].gain, (k,)))
        return rows

    def ranked_pairs(self) -> list[PairRow]:
        rows = lambda p: (self.row(p.i, p.sign_i), self.row(p.j, p.sign_j))  # noqa: E731
        return sorted(self.pairs, key=lambda p: rank_key(p.tier, p.gain, rows(p)))

    def feature(self, feature_id: int, sign: str | None = None) -> FeatureRow:
        """The row of `feature_id` (a row index, as `flagged` gives; or a latent and its sign)."""
        return self.features[self.row(feature_id, sign)]

    def tier_counts(self) -> dict[str, int]:
        counts = {t: 0 for t in TIERS}
        for f in self.features:
            counts[f.tier] += 1
        return counts

    def condition_counts(self, tier: str = "certified") -> dict[str, int]:
        """Per condition: features (C1, C3, C4; a signed SAE: sign rows, C3 per latent) or pairs (C2)
        whose certificate reached `tier` (or better), and 0/1 for the layer-wide C5 and C6."""
        worst = TIER_RANK[tier]
        counts = {c: 0 for c in CONDITIONS}
        for f in self.features:
            for c, check in f.certificates.items():
                # a signed SAE's C3 is its latent's, on both sign rows: counted once
                tied_twice = c == "C3" and f.sign == "-" and "C3" in self.features[f.id].certificates
                if c != "C2" and TIER_RANK[check.tier] <= worst and not tied_twice:
                    counts[c] += 1
        counts["C2"] = sum(1 for p in self.pairs if TIER_RANK[p.tier] <= worst)
        for c in LAYER_CONDITIONS:
            counts[c] = int(TIER_RANK[self.layer_conditions.get(c, {}).get("tier", "satisfied")] <= worst)
        return counts


@dataclass
class AuditRecord:
    """An audit's layers, run metadata and the context snippets of its top tokens."""

    layers: dict[str, LayerResult]
    meta: dict[str, Any] = field(default_factory=dict)
    token_texts: dict[int, str] = field(default_factory=dict)  # context snippets of top tokens
    # the same contexts token by token: {token: (the window's tokens around it, decoded one by one,
    # the position of the token among them)}, what FeatureRow.top_context_values shade
    token_pieces: dict[int, tuple[list[str], int]] = field(default_factory=dict)
    # a repair of these SAEs (opt_hooks.repair_run.RepairResult.to_dict()): {"meta", "table", "changes"}
    repair: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": SCHEMA_VERSION,
            "meta": json_safe(self.meta),
            "layers": {name: _layer_to_dict(layer) for name, layer in self.layers.items()},
            "token_texts": {str(k): v for k, v in self.token_texts.items()},
            "token_pieces": {str(k): {"pieces": pieces, "at": at} for k, (pieces, at) in self.token_pieces.items()},
        }
        if self.repair is not None:
            out["repair"] = json_safe(self.repair)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditRecord":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"report schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION!r}; "
                "re-run the audit with this version of opt_hooks"
            )
        layers = {name: _layer_from_dict(d) for name, d in data["layers"].items()}
        texts = {int(k): v for k, v in data.get("token_texts", {}).items()}
        pieces = {int(k): (v["pieces"], v["at"]) for k, v in data.get("token_pieces", {}).items()}
        return cls(layers=layers, meta=data.get("meta", {}), token_texts=texts, token_pieces=pieces,
                   repair=data.get("repair"))

    def to_pandas(self, table: str = "features") -> Any:
        """Every layer's `table` (LayerResult.TABLES) in one DataFrame, with `hook` and `sae_id` first."""
        import pandas as pd

        frames = []
        for hook, layer in self.layers.items():
            frame = layer.to_pandas(table)
            frame.insert(0, "sae_id", layer.sae_id)
            frame.insert(0, "hook", hook)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def __repr__(self) -> str:
        names = ", ".join(self.layers)
        return f"{type(self).__name__}(layers=[{names}])"


def finite_or_none(value: Any) -> float | None:
    """A finite float of a real number or 0-d tensor, or None (strict JSON has no NaN or inf)."""
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN or inf)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _certificate(d: dict[str, Any] | None) -> CertificateCheck | None:
    return None if d is None else CertificateCheck(**d)


# What report.json keeps of a feature's certificate that is not certified (THEORY.md 3.6: a descent
# on the audit tokens that the held-out tokens do not confirm). Nearly every live feature has one
# under C3 and C4, so writing each in full would make report.json grow by ~0.8 KB per feature; the
# rest of the check (step, predicted, measured, held-out change, counts) is in the layer's
# tables/<hook>/features.parquet as <condition>_<field> columns.
VERDICT_FIELDS = ("tier", "reason")


def _layer_to_dict(layer: LayerResult) -> dict[str, Any]:
    """The layer as report.json holds it. Its tables hold up to one row per feature, so their rows
    are copied as `_row_dict` (`dataclasses.asdict` and `json_safe` on every number took seconds
    per layer of 24,576 features)."""
    out = json_safe(dataclasses.asdict(dataclasses.replace(layer, **{table: [] for table in layer.TABLES})))
    for table in layer.TABLES:
        out[table] = [_row_dict(row) for row in getattr(layer, table)]
    return out


def _row_dict(row: Any) -> dict[str, Any]:
    names, get = _fields_of(type(row))
    out = dict(zip(names, get(row)))
    for name, value in out.items():
        kind = value.__class__
        if kind is float:
            if value - value != 0.0:  # NaN or an infinity
                out[name] = None
        elif name == "certificates":  # a FeatureRow's checks
            out[name] = {condition: _feature_check(check) for condition, check in value.items()}
        elif not (kind is int or kind is str or kind is bool or value is None):
            out[name] = _row_value(value)
    return out


@functools.cache
def _fields_of(kind: type) -> tuple[tuple[str, ...], operator.attrgetter]:
    """A row dataclass's field names and one getter of all of them (a tuple, in C: rows have several fields)."""
    names = tuple(f.name for f in dataclasses.fields(kind))
    return names, operator.attrgetter(*names)


def _row_value(value: Any) -> Any:
    """json_safe for a row's field that is not a plain scalar, without a call per number of a list."""
    if value.__class__ is list and all(x.__class__ is int or (x.__class__ is float and x - x == 0.0) for x in value):
        return list(value)
    if isinstance(value, CertificateCheck):
        return _row_dict(value)
    return json_safe(value)


def _feature_check(check: CertificateCheck | None) -> dict[str, Any] | None:
    """A feature's certified check in full; any other as its verdict (`VERDICT_FIELDS`)."""
    if check is None:
        return None
    if check.tier == "certified":
        return _row_dict(check)
    return {name: getattr(check, name) for name in VERDICT_FIELDS}  # strings


def _feature_from_dict(f: dict[str, Any], n_audit: int, n_held_out: int) -> FeatureRow:
    best = f["conditions"][0] if f["conditions"] else None
    checks = {}
    for name, c in f["certificates"].items():
        if c is None or "condition" in c:
            checks[name] = _certificate(c)
            continue
        # a verdict: the row holds the held-out numbers of its best check (FeatureRow's docstring);
        # what only the parquet tables keep stays None
        held = {"held_out": None if f["gain"] is None else -f["gain"], "held_out_se": f["gain_se"],
                "p_value": f["p_value"], "gain": f["gain"], "share": f["share"]} if name == best else {}
        checks[name] = CertificateCheck(name, step=None, predicted=None, measured=None, tier=c["tier"],
                                        reason=c["reason"], n_audit=n_audit, n_held_out=n_held_out, **held)
    return FeatureRow(**{**f, "certificates": checks})


def _layer_conditions(d: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {**c, "certificate": _certificate(c.get("certificate"))} for name, c in d.items()}


def _layer_from_dict(d: dict[str, Any]) -> LayerResult:
    d = dict(d)
    d["features"] = [_feature_from_dict(f, d["n_tokens"], d["n_held_out"]) for f in d["features"]]
    d["pairs"] = [PairRow(**{**p, "certificate": _certificate(p["certificate"])}) for p in d["pairs"]]
    d["layer_conditions"] = _layer_conditions(d["layer_conditions"])
    for name, row in (("absorption", AbsorptionRow), ("duplicates", DuplicateRow), ("antipodal", AntipodalRow)):
        d[name] = [row(**r) for r in d.get(name, [])]
    return LayerResult(**d)


_NESTED = ("certificates", "certificate", "top_context_values")  # records and lists of lists: not DataFrame columns
_ROW_TYPES = {"features": FeatureRow, "pairs": PairRow, "absorption": AbsorptionRow,
              "duplicates": DuplicateRow, "antipodal": AntipodalRow}


# the CertificateCheck fields a DataFrame carries, as <condition>_<field> columns
CERTIFICATE_COLUMNS = ("step", "predicted", "measured", "held_out", "held_out_se", "p_value", "gain", "share",
                       "tier", "n_touched", "count_p_value")


def _flat_row(row: Any, certificates: bool = False) -> dict[str, Any]:
    values = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name not in _NESTED}
    if isinstance(values.get("conditions"), list):
        values["conditions"] = ",".join(values["conditions"])
    if certificates:
        nested = getattr(row, "certificates", None)
        checks = nested if nested is not None else {"certificate": getattr(row, "certificate", None)}
        for prefix, check in checks.items():
            if check is not None:
                values.update({f"{prefix}_{name}": getattr(check, name) for name in CERTIFICATE_COLUMNS})
    return values


def file_name(key: str) -> str:
    """A hook name (or any key) as a file or folder name: dots kept, anything else unusual replaced."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dumps(result: AuditRecord) -> str:
    """report.json's text: compact (no indentation, no spaces), the size docs/REPORT.md budgets."""
    return json.dumps(result.to_dict(), separators=(",", ":"), allow_nan=False)
