"""Several audits side by side: `compare(a, b, ...)` -> Comparison (compare.json, compare.html, terminal).

The reports compared are AuditResult / AuditRecord objects, RepairResult objects (their first audit
with the repair's before / after table, as `RepairResult.save` writes it) or saved report folders
(or their report.json). Layers are matched by hook name; where a report holds several SAEs at one
hook, by hook and SAE id. A layer that only some reports have is kept, marked missing in the others.

Per matched layer and report the comparison lists what the report says (scope, lam, tokens, the
held-out objective, the layer gaps, tier counts, certified counts per condition, the pair map's
counts, the repair's table) and, for every report after the first (the reference), the difference
of each measured quantity from the reference's. A difference gets an SE only where both values
have one: sqrt(se_a^2 + se_b^2), the SE of two independent estimates. That is exact when the two
were measured on different tokens; on the same tokens the two errors are, for two SAEs of one
activation stream, positively correlated and the paired SE smaller, which report files cannot give
(they keep no per-token values): the SE is then conservative. A difference is called significant
only with an SE, two-sided, Bonferroni over every difference of the comparison with an SE. Counts
(tiers, certified, absorption) get no SE and are never called significant: they also depend on how
many tokens each audit read. The settings the reports were run with (tokens, held-out share,
dataset, seed, versions) are compared too, and whether the held-out tokens were the same.

This module reads records only (records <- report <- comparison); `RepairResult` is recognised
without importing the repair code unless such an object is given.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_hooks.records import SCHEMA_VERSION, AuditRecord, LayerResult, atomic_write_text, json_safe
from opt_hooks.report import REPORT_JSON, check_out_dir
from opt_hooks.report.compare import render_compare_html, render_compare_summary

__all__ = ["COMPARE_HTML", "COMPARE_JSON", "Comparison", "compare"]

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"
COMPARE_VERSION = "1"
GAPS = ("codes", "decoder", "bias")  # first, in this order; any other gap of a layer (a transcoder's) after them
# meta keys (flattened, dotted) that fix which tokens an audit read: where any differs, the reports
# were measured on different tokens
TOKEN_KEYS = ("source", "model", "dataset", "n_tokens", "context_size", "held_out", "include_special_tokens",
              "run.data.dataset", "run.data.context_size", "run.data.prepend_bos", "run.data.split")
# sources whose tokens the record cannot name (the caller's own activations or forward passes)
UNNAMED_SOURCES = ("activations", "monitor")
DIFFERENCE_SE = ("sqrt(se_a^2 + se_b^2): exact for estimates on different tokens, conservative on the same tokens "
                 "(positively correlated errors; report files keep no per-token values for a paired SE)")


@dataclass
class Compared:
    """One report of a comparison: its name, where it came from and its record."""

    name: str
    source: str
    kind: str  # "audit", or "repair" when the record carries a repair's table
    record: AuditRecord


@dataclass
class Comparison:
    """Reports side by side (module docstring). `reports` in the order given, the first the reference;
    `alpha` the two-sided level of the differences, Bonferroni over those with an SE."""

    reports: list[Compared]
    alpha: float = 0.05
    _data: dict[str, Any] | None = field(default=None, init=False, repr=False)  # to_dict(), built once

    def to_dict(self) -> dict[str, Any]:
        """compare.json: the reports, the settings they differ in, and per matched layer every report's
        values (None where the report lacks the layer) and the differences from the first report."""
        if self._data is None:
            self._data = json_safe(_comparison_dict(self.reports, self.alpha))
        return self._data

    def summary(self) -> str:
        """The terminal table (what `opt-hooks compare` prints)."""
        return render_compare_summary(self.to_dict())

    def to_html(self) -> str:
        """compare.html: one self-contained page, works offline."""
        return render_compare_html(self.to_dict())

    def save(self, out: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write out/compare.json and out/compare.html, each atomically (temporary file, rename)."""
        out = check_out_dir(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / COMPARE_JSON, json.dumps(self.to_dict(), indent=1, allow_nan=False))
        atomic_write_text(out / COMPARE_HTML, self.to_html())
        return out

    def __repr__(self) -> str:
        return f"Comparison(reports=[{', '.join(r.name for r in self.reports)}])"


def compare(*results: Any, names: list[str] | None = None, alpha: float = 0.05) -> Comparison:
    """Compare two or more audits (module docstring). Each of `results` is an AuditResult or
    AuditRecord, a RepairResult, or a report folder / report.json path; `names` label them (default:
    the folder's name for a path, "audit <k>" / "repair <k>" for an object)."""
    if len(results) < 2:
        raise ValueError(f"compare needs at least two reports, got {len(results)}")
    if names is not None and len(names) != len(results):
        raise ValueError(f"{len(names)} name(s) for {len(results)} reports")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    loaded = [_load(result, k) for k, result in enumerate(results)]
    labels = list(names) if names is not None else _unique([name for name, _, _, _ in loaded])
    if len(set(labels)) != len(labels):
        raise ValueError(f"report names must differ, got {', '.join(labels)}")
    return Comparison([Compared(label, source, kind, record) for label, (_, source, kind, record) in zip(labels, loaded)],
                      alpha)


# ---- loading ---------------------------------------------------------------------------------


def load_report(path: str | os.PathLike) -> AuditRecord:
    """The record of a report folder (its report.json) or of a report.json file, with one-line errors
    for a folder without report.json and a report of another schema version."""
    path = Path(path)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        where = f"folder {path} has no {REPORT_JSON}" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"{where}: give a folder written by opt-hooks report or repair, or its {REPORT_JSON}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not JSON: {error}") from None
    if not isinstance(data, dict) or "layers" not in data:
        raise ValueError(f"{file} is not an opt_hooks report (no layers)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{file}: report schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION!r}, "
                         "the version this opt_hooks reads; re-run the audit with this version")
    return AuditRecord.from_dict(data)


def _load(result: Any, k: int) -> tuple[str, str, str, AuditRecord]:
    """(default name, source, kind, record) of one input."""
    if isinstance(result, (str, os.PathLike)):
        path = Path(result)
        record = load_report(path)
        folder = path if path.is_dir() else path.parent
        return folder.resolve().name or str(path), str(path), _kind(record), record
    if isinstance(result, AuditRecord):
        return f"{_kind(result)} {k + 1}", "object", _kind(result), result
    from opt_hooks.repair_run import RepairResult

    if isinstance(result, RepairResult):
        audit = result.audits[0]  # as RepairResult.save: the first round's audit, with the repair
        record = AuditRecord(layers=audit.layers, meta=audit.meta, token_texts=audit.token_texts,
                             repair=result.to_dict())
        return f"repair {k + 1}", "object", "repair", record
    raise TypeError(f"cannot compare a {type(result).__name__}: give AuditResult, AuditRecord, RepairResult objects "
                    "or report folders")


def _kind(record: AuditRecord) -> str:
    return "audit" if record.repair is None else "repair"


def _unique(names: list[str]) -> list[str]:
    """Names made distinct by their position where two are equal (two folders both named "report")."""
    return [f"{name} ({k + 1})" if names.count(name) > 1 else name for k, name in enumerate(names)]


# ---- the comparison --------------------------------------------------------------------------


def _comparison_dict(reports: list[Compared], alpha: float) -> dict[str, Any]:
    settings = _settings(reports)
    rows = [_row(hook, sae_id, layers, reports, settings["same_tokens"]) for hook, sae_id, layers in _match(reports)]
    tested = [d for row in rows for d in row["differences"] if d["se"] is not None]
    for d in tested:  # Bonferroni over every difference with an SE
        d["significant"] = d["p_value"] is not None and d["p_value"] < alpha / len(tested)
    return {
        "compare_version": COMPARE_VERSION,
        "reference": reports[0].name,
        "alpha": alpha,
        "n_tested": len(tested),
        "difference_se": DIFFERENCE_SE,
        "reports": [_report_entry(r) for r in reports],
        "settings": settings,
        "rows": rows,
    }


def _report_entry(r: Compared) -> dict[str, Any]:
    layers = [{"hook": layer.hook_name, "sae_id": layer.sae_id, "architecture": layer.architecture,
               "d_in": layer.d_in, "d_sae": layer.d_sae} for layer in r.record.layers.values()]
    return {"name": r.name, "source": r.source, "kind": r.kind, "schema_version": SCHEMA_VERSION,
            "model": r.record.meta.get("model"), "layers": layers, "meta": r.record.meta,
            "repair_meta": None if r.record.repair is None else r.record.repair.get("meta")}


def _match(reports: list[Compared]) -> list[tuple[str, str | None, list[LayerResult | None]]]:
    """(hook, SAE id or None, each report's layer or None) per row, hooks in order of first appearance.
    A hook where some report holds several SAEs gets one row per SAE id instead."""
    by_hook: list[dict[str, list[LayerResult]]] = []
    for r in reports:
        hooks: dict[str, list[LayerResult]] = {}
        for layer in r.record.layers.values():
            hooks.setdefault(layer.hook_name, []).append(layer)
        by_hook.append(hooks)
    order = list(dict.fromkeys(hook for hooks in by_hook for hook in hooks))
    rows = []
    for hook in order:
        held = [hooks.get(hook, []) for hooks in by_hook]
        if max(map(len, held)) <= 1:
            rows.append((hook, None, [layers[0] if layers else None for layers in held]))
            continue
        for sae_id in dict.fromkeys(layer.sae_id for layers in held for layer in layers):
            rows.append((hook, sae_id, [next((x for x in layers if x.sae_id == sae_id), None) for layers in held]))
    return rows


def flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"run": {"seed": 0}} -> {"run.seed": 0}."""
    out = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _settings(reports: list[Compared]) -> dict[str, Any]:
    """The run settings that differ between the reports (timings and the command line left out), and
    whether the reports read the same tokens: True, False, or None where the records cannot say
    (activations the caller gave)."""
    flat = [flatten(r.record.meta) for r in reports]
    keys = list(dict.fromkeys(key for f in flat for key in f if "seconds" not in key.split(".")
                              and key != "run.command"))
    differ = {key: [f.get(key) for f in flat] for key in keys if len({json.dumps(f.get(key)) for f in flat}) > 1}
    token_keys = [key for key in TOKEN_KEYS if key in differ]
    if token_keys:
        same: bool | None = False
    elif any(f.get("source") in UNNAMED_SOURCES for f in flat):
        same = None
    else:
        same = True
    return {"differ": differ, "token_keys_differ": token_keys, "same_tokens": same}


def _row(hook: str, sae_id: str | None, layers: list[LayerResult | None], reports: list[Compared],
         same_tokens: bool | None) -> dict[str, Any]:
    entries = [None if layer is None else _entry(layer, r.record) for layer, r in zip(layers, reports)]
    held = {e["n_held_out"] for e in entries if e is not None}
    return {
        "hook": hook,
        "sae_id": sae_id,
        "missing": [r.name for r, e in zip(reports, entries) if e is None],
        "same_held_out_tokens": same_tokens if len(held) <= 1 else False,
        "entries": entries,
        "differences": _differences(entries, reports),
    }


def _entry(layer: LayerResult, record: AuditRecord) -> dict[str, Any]:
    """What one report says about one layer."""
    o = layer.objective
    objective = {key: o.get(key) for key in ("L", "se", "mse", "l1", "l0", "explained_variance", "dead_share",
                                            "n_tokens")}
    gaps = {}
    for name in [*GAPS, *(name for name in layer.gaps if name not in GAPS)]:
        gap = layer.gaps.get(name)
        if gap is None:
            gaps[name] = None
            continue
        share_se = gap["se"] / o["L"] if gap.get("se") is not None and o.get("L") else None
        gaps[name] = {"share": gap.get("share"), "share_se": share_se, "gain": gap.get("gain"), "se": gap.get("se"),
                      "p_value": gap.get("p_value"), "n_tokens": gap.get("n_tokens")}
        if name == "codes":
            gaps[name].update(l0_before=gap.get("l0_before"), l0_after=gap.get("l0_after"))
    trees = layer.absorption_trees()
    return {
        "sae_id": layer.sae_id,
        "architecture": layer.architecture,
        "d_in": layer.d_in,
        "d_sae": layer.d_sae,
        "hook_name_out": layer.hook_name_out,
        "scope": layer.scope,
        "lam": layer.lam,
        "lam_estimated": layer.lam_estimated,
        "n_tokens": layer.n_tokens,
        "n_held_out": layer.n_held_out,
        "n_tests": layer.n_tests,
        "alpha": layer.alpha,
        "objective": objective,
        "gaps": gaps,
        "skipped": dict(layer.skipped),
        "tiers": layer.tier_counts(),
        "certified": layer.condition_counts("certified"),
        "layer_conditions": list(layer.layer_conditions),  # the layer-wide conditions audited here
        "dead": len(layer.dead_features),
        "flagged_share": layer.flagged_share(),
        "pair_map": {
            "available": bool(layer.pair_map.get("available")),
            "trees": len(trees),
            "absorbed": len(layer.absorption),
            "duplicates": len(layer.duplicates),
            "duplicate_groups": len(layer.duplicate_groups()),
            "antipodal": len(layer.antipodal),
            "absorption_score": layer.pair_map.get("absorption_score"),
            "absorption_score_se": layer.pair_map.get("absorption_score_se"),
        },
        "repair": _repair_entry(layer.hook_name, record.repair),
    }


def _repair_entry(hook: str, repair: dict[str, Any] | None) -> dict[str, Any] | None:
    """The repair's before / after on the test tokens and its steps' counts, for one hook."""
    if repair is None:
        return None
    row = (repair.get("table") or {}).get(hook)
    steps = (repair.get("changes") or {}).get(hook, [])
    if row is None and not steps:
        return None
    row = row or {}
    return {"n_tokens": row.get("n_tokens"), "before": row.get("before"), "after": row.get("after"),
            "change": row.get("change"), "steps": len(steps), "applied": sum(1 for s in steps if s.get("applied"))}


# The measured quantities compared with the reference: (name, value, SE) read from an entry.
def _quantities(entry: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    o = entry["objective"]
    out = [("L", o["L"], o["se"])]
    out += [(key, o[key], None) for key in ("mse", "l1", "l0", "explained_variance", "dead_share")]
    for name, gap in entry["gaps"].items():
        out.append((f"{name} gap", None if gap is None else gap["share"], None if gap is None else gap["share_se"]))
    out.append(("flagged share", entry["flagged_share"], None))
    m = entry["pair_map"]
    out.append(("absorption score", m.get("absorption_score"), m.get("absorption_score_se")))
    change = ((entry["repair"] or {}).get("change") or {})
    out.append(("repair change of L", change.get("L"), change.get("se")))
    return out


def _differences(entries: list[dict[str, Any] | None], reports: list[Compared]) -> list[dict[str, Any]]:
    """Each later report's quantities minus the reference's, with an SE where both have one."""
    reference = entries[0]
    if reference is None:
        return []
    out = []
    base = _quantities(reference)
    for r, entry in zip(reports[1:], entries[1:]):
        if entry is None:
            continue
        values = {name: (value, se) for name, value, se in _quantities(entry)}
        for name, a, se_a in base:
            b, se_b = values.get(name, (None, None))
            if a is None or b is None:
                continue
            se = math.sqrt(se_a**2 + se_b**2) if se_a is not None and se_b is not None else None
            out.append({"quantity": name, "report": r.name, "reference": reports[0].name, "difference": b - a,
                        "se": se, "p_value": _two_sided_p(b - a, se), "significant": None})
    return out


def _two_sided_p(difference: float, se: float | None) -> float | None:
    """P(|N(0, se^2)| >= |difference|); None without an SE."""
    if se is None:
        return None
    if se == 0:  # both values exact
        return 1.0 if difference == 0 else 0.0
    return math.erfc(abs(difference) / se / math.sqrt(2))
