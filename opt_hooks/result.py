"""The result of an audit as users hold it: its record (`records.py`), able to render itself.

`AuditResult` adds to `records.AuditRecord` the two methods that need the report package;
the records themselves import nothing from `report/`, which reads them without an import
circle: records <- report <- result.
"""
from __future__ import annotations

import os
from pathlib import Path

from opt_hooks.records import AuditRecord
from opt_hooks.report import write_report
from opt_hooks.report.terminal import render_summary

__all__ = ["AuditResult"]


class AuditResult(AuditRecord):
    """`layers` ({hook_name: LayerResult}), `meta`, `token_texts`; see docs/API.md."""

    def save(self, out: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write out/report.json and out/report.html, each atomically (temporary file, rename)."""
        return write_report(self, Path(out), overwrite=overwrite)

    def summary(self) -> str:
        """The terminal summary (what `opt-hooks report` prints)."""
        return render_summary(self)
