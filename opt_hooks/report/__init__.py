"""Reports of an audit's record (`records.AuditRecord`; users hold it as an AuditResult).

- report.json: `AuditRecord.to_dict()`, described by `schema.json` (JSON Schema 2020-12);
- report.html: one self-contained page, works offline (`html.render_html`);
- tables/<hook>/<table>.parquet: every row of the layer's tables, certificates as columns;
- tables/<hook>/<release>_<sae_id>_eval_results.json: the SAE's results in SAEBench's layout
  (`saebench.saebench_output`, described by `saebench_schema.json`);
- terminal summary: `terminal.render_summary`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opt_hooks.report.html import render_html
from opt_hooks.report.saebench import load_saebench_schema, saebench_file_name, saebench_output, write_saebench
from opt_hooks.report.terminal import render_summary
from opt_hooks.records import AuditRecord, atomic_write_text, dumps, file_name

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
TABLES_DIR = "tables"  # per layer: features, pairs, absorption, duplicates, antipodal as parquet, SAEBench-style JSON
SCHEMA_FILE = Path(__file__).resolve().parent / "schema.json"

__all__ = [
    "REPORT_HTML", "REPORT_JSON", "TABLES_DIR", "check_out_dir", "load_saebench_schema", "load_schema", "render_html",
    "render_summary", "saebench_file_name", "saebench_output", "write_report",
]


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of report.json."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that holds anything unless `overwrite`; return it as a Path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} is not empty; pass overwrite=True (CLI: --overwrite) to replace its report"
        )
    return out_dir


def write_report(result: AuditRecord, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write out_dir/report.json, out_dir/report.html, the layers' tables
    (out_dir/tables/<hook>/<table>.parquet, `LayerResult.to_pandas(table, certificates=True)`) and
    each SAE's SAEBench-style JSON (out_dir/tables/<hook>/`saebench_file_name`), each atomically;
    return out_dir.

    Other files in out_dir are left alone; with overwrite=False the folder must be empty or absent.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / REPORT_JSON, dumps(result))
    atomic_write_text(out_dir / REPORT_HTML, render_html(result))
    folders = {hook: out_dir / TABLES_DIR / file_name(hook) for hook in result.layers}
    for hook, layer in result.layers.items():
        folder = folders[hook]
        folder.mkdir(parents=True, exist_ok=True)
        for table in layer.TABLES:
            path = folder / f"{table}.parquet"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            layer.to_pandas(table, certificates=True).to_parquet(tmp, index=False)
            os.replace(tmp, path)
    write_saebench(result, folders)
    return out_dir
