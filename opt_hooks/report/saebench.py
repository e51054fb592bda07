"""SAEBench-style results: one JSON file per audited SAE, in the layout of SAEBench's eval outputs,
so that an audit's results load beside SAEBench's own (docs/REPORT.md, "SAEBench-style JSON").

SAEBench's `BaseEvalOutput` holds `eval_type_id`, `eval_config`, `eval_id`, `datetime_epoch_millis`,
`eval_result_metrics` (categories, each a flat object of numbers), `eval_result_details` (a list
of flat objects), `sae_bench_commit_hash`, `sae_lens_id`, `sae_lens_release_id`,
`sae_lens_version`, `sae_cfg_dict` and `eval_result_unstructured`; its files are named
`<release>_<sae_id>_eval_results.json` ("/" replaced by "_"). `saebench_schema.json` describes
the files written here (JSON Schema 2020-12).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from opt_hooks.records import TIERS, AuditRecord, LayerResult, atomic_write_text, file_name, json_safe

EVAL_TYPE_ID = "opt_hooks"
SCHEMA_FILE = Path(__file__).resolve().parent / "saebench_schema.json"
SUFFIX = "_eval_results.json"
# the run facts of meta (and of meta["run"], from the CLI) that configure the audit
_RUN_CONFIG = ("model", "dataset", "n_tokens", "context_size", "batch_size", "held_out", "include_special_tokens",
               "device")
_PAIR_MAP_CONFIG = ("rho_min", "min_evidence", "max_parent_cv", "duplicate_rho", "antipodal_rho", "neighbours")
GAPS = ("codes", "decoder", "bias")  # THEORY.md section 5

__all__ = ["EVAL_TYPE_ID", "SUFFIX", "load_saebench_schema", "saebench_file_name", "saebench_output"]


def load_saebench_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the SAEBench-style files."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def saebench_file_name(record: AuditRecord, hook: str) -> str:
    """SAEBench's name for the SAE's results, `<release>_<sae_id>_eval_results.json`; the hook
    stands in for an SAE without a registry id, and a record without its release has none."""
    layer = record.layers[hook]
    key = "_".join(part for part in (_release(record), layer.sae_id or hook) if part)
    return file_name(key.replace("/", "_")) + SUFFIX


def saebench_output(record: AuditRecord, hook: str, *, epoch_millis: int | None = None) -> dict[str, Any]:
    """The SAEBench-style results of one audited SAE. `epoch_millis`: the time stamp
    (`datetime_epoch_millis`), by default now."""
    layer, meta = record.layers[hook], record.meta
    return json_safe({
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": _config(layer, meta),
        # the same record gives the same id: saving a report twice does not make two eval runs
        "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(
            [hook, meta, layer.objective, layer.n_tokens], sort_keys=True, default=str))),
        "datetime_epoch_millis": int(time.time() * 1000) if epoch_millis is None else epoch_millis,
        "eval_result_metrics": _metrics(layer, meta),
        "eval_result_details": [_detail(layer.features[k]) for k in layer.flagged()],
        # not run by SAEBench: its commit field names the program that wrote the file instead
        "sae_bench_commit_hash": f"opt_hooks {meta.get('opt_hooks_version', 'unknown')}",
        "sae_lens_id": layer.sae_id,
        "sae_lens_release_id": _release(record),
        "sae_lens_version": meta.get("sae_lens_version"),
        # what the record knows of the SAE's config, under SAE-Lens's keys (SAEBench's plots read
        # architecture and d_sae)
        "sae_cfg_dict": {"architecture": layer.architecture, "d_in": layer.d_in, "d_sae": layer.d_sae,
                         "metadata": {"hook_name": layer.hook_name, "model_name": meta.get("model"),
                                      **({"hook_name_out": layer.hook_name_out} if layer.hook_name_out else {})}},
        "eval_result_unstructured": {
            "scope": layer.scope,
            "skipped": layer.skipped,
            "notes": layer.notes,
            "absorption_trees": [{"parent": _latent(layer, parent),
                                  "children": [_latent(layer, layer.row(r.child, r.child_sign)) for r in rows]}
                                 for parent, rows in layer.absorption_trees().items()],
            "duplicate_groups": [[_latent(layer, row) for row in group] for group in layer.duplicate_groups()],
            "antipodal_pairs": [[_latent(layer, layer.row(r.i, r.sign_i)), _latent(layer, layer.row(r.j, r.sign_j))]
                                for r in layer.antipodal],
            "pairs": [{"i": _latent(layer, layer.row(p.i, p.sign_i)), "j": _latent(layer, layer.row(p.j, p.sign_j)),
                       "kind": p.kind, "tier": p.tier, "gain": p.gain} for p in layer.ranked_pairs()],
        },
    })


def write_saebench(record: AuditRecord, folders: dict[str, Path]) -> list[Path]:
    """Write each layer's file into its folder (`folders[hook]`), atomically; return the paths."""
    paths = []
    for hook, folder in folders.items():
        path = folder / saebench_file_name(record, hook)
        atomic_write_text(path, json.dumps(saebench_output(record, hook), separators=(",", ":"), allow_nan=False))
        paths.append(path)
    return paths


def _release(record: AuditRecord) -> str | None:
    return record.meta.get("run", {}).get("sae_release")


def _config(layer: LayerResult, meta: dict[str, Any]) -> dict[str, Any]:
    run = meta.get("run", {})
    config: dict[str, Any] = {name: meta.get(name) for name in _RUN_CONFIG}
    config.update({"seed": run.get("seed"), "command": run.get("command"), "hook_name": layer.hook_name,
                   "scope": layer.scope, "lam": layer.lam, "lam_estimated": layer.lam_estimated,
                   "alpha": layer.alpha})
    config.update({f"pair_map_{name}": layer.pair_map.get(name) for name in _PAIR_MAP_CONFIG})
    return config


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numeric entries of a record's dict (booleans and text left out), flat."""
    return {f"{prefix}{k}": v for k, v in values.items()
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def _metrics(layer: LayerResult, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # the objective's parts and the three gaps of THEORY.md section 5 are always there, null where unknown
    objective = {"L": None, "mse": None, "l1": None,
                 **_numbers({k: v for k, v in layer.objective.items() if k != "n_tokens"})}
    gaps: dict[str, Any] = {f"{name}_share": None for name in GAPS}
    for name, gap in layer.gaps.items():
        if gap:
            gaps.update(_numbers({k: v for k, v in gap.items() if k != "n_tokens"}, f"{name}_"))
    tiers = layer.tier_counts()
    certified, reached = layer.condition_counts("certified"), layer.condition_counts("violated")
    verdicts = {f"features_{tier}": tiers[tier] for tier in TIERS}
    verdicts.update({f"{c}_certified": n for c, n in certified.items()})
    verdicts.update({f"{c}_violated": reached[c] - n for c, n in certified.items()})  # violated, not certified
    verdicts.update({"pairs_flagged": len(layer.pairs), "n_tests": layer.n_tests,
                     "flagged_share": layer.flagged_share()})
    mapped = bool(layer.pair_map.get("available"))
    prices = [r.l1_price for r in layer.absorption if r.l1_price is not None]
    absorption = {
        "absorption_rows": len(layer.absorption), "absorption_trees": len(layer.absorption_trees()),
        "absorbed_children": len({r.child for r in layer.absorption}),
        "l1_price_total": sum(prices) if prices else None,
        "duplicate_pairs": len(layer.duplicates), "duplicate_groups": len(layer.duplicate_groups()),
        "antipodal_pairs": len(layer.antipodal),
        "absorption_score": layer.pair_map.get("absorption_score"),
        "absorption_score_se": layer.pair_map.get("absorption_score_se"),
    }
    if not mapped:  # not computed: no count means "none found"
        absorption = dict.fromkeys(absorption)
    tokens = {"n_tokens_streamed": meta.get("n_tokens"), "n_tokens_audit": layer.n_tokens,
              "n_tokens_held_out": layer.n_held_out, "dead_features": len(layer.dead_features)}
    return {"objective": objective, "gaps": gaps, "verdicts": verdicts, "absorption": absorption,
            "token_stats": tokens}


def _latent(layer: LayerResult, row: int) -> int | str:
    """A latent as the unstructured entries name it: its id; one sign of a signed SAE's latent as its
    label ("12+", "12−")."""
    return layer.row_label(row) if layer.signed else row


def _detail(f: Any) -> dict[str, Any]:
    sign = {} if f.sign is None else {"sign": f.sign}  # a signed SAE's row: which sign of latent `index`
    return {"index": f.id, **sign, "tier": f.tier, "conditions": ",".join(f.conditions), "gain": f.gain,
            "gain_se": f.gain_se, "p_value": f.p_value, "share": f.share, "value": f.value,
            "active_count": f.active_count}
