"""Renderers of a comparison (`opt_hooks.comparison.Comparison.to_dict()`, compare.json's content):
the terminal table (`render_compare_summary`) and compare.html (`render_compare_html`).

Both show the same table per matched layer: one column per report, the first the reference, then
one column per later report with its differences from the reference for the measured quantities
(held-out objective, layer gaps, the repair's change of L). A difference with an SE reads
"diff ± SE (p)", marked significant only as compare.json says (Bonferroni over the comparison);
one without an SE is printed bare, never marked. Counts are shown side by side, without differences:
they depend on how many tokens each audit read.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from opt_hooks.records import CONDITIONS, LAYER_CONDITIONS
from opt_hooks.report.html import page_head
from opt_hooks.report.svg import fmt
from opt_hooks.report.terminal import WIDTH, percent, signed, with_se

HERE = Path(__file__).resolve().parent
MISSING = "missing"
SIGNIFICANT = "*"
# quantities of compare.json's differences shown as percentage points (shares of L)
SHARE_QUANTITIES = ("explained_variance", "dead_share", "flagged share")  # and every "<name> gap"
KIND_TEXT = {"audit": "audit", "repair": "repair: the audit of the SAEs before it, and its before / after table"}
COMPARE_CSS = """
table.compare td { white-space: nowrap; }
table.compare td.label { text-align: left; color: var(--muted); }
table.compare td.missing { color: var(--muted); font-style: italic; text-align: center; }
table.compare td.diff { border-left: 1px solid var(--rule); }
table.compare td.significant { font-weight: 700; color: var(--certified); }
table.compare tr.group td { border-bottom: 2px solid var(--rule); }
table.settings td, table.settings th { text-align: left; }
.table-scroll { overflow-x: auto; }  /* a column per report: wide tables scroll, not the page */
table.compare th { top: 0; }
"""
# the page's status, as report.js sets it: "ready" when the script ran without an error
COMPARE_JS = """(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (event) {
    body.setAttribute("data-report-status", "error");
    document.getElementById("js-errors").textContent += "script error: " + event.message + "\\n";
  });
  if (body.getAttribute("data-report-status") === "loading") body.setAttribute("data-report-status", "ready");
})();"""


@dataclass
class Line:
    """One line of a layer's table: a label, a cell per report (None: the report lacks the layer),
    and per later report its difference from the reference (None: none shown) and whether it is
    significant."""

    label: str
    cells: list[str | None]
    diffs: list[str | None]
    significant: list[bool]
    ends_group: bool = False


# ---- the table, shared by both renderers -----------------------------------------------------


def layer_lines(data: dict[str, Any], row: dict[str, Any]) -> list[Line]:
    names = [r["name"] for r in data["reports"]]
    diffs = {(d["quantity"], d["report"]): d for d in row["differences"]}
    entries = row["entries"]
    lines: list[Line] = []

    def add(label: str, cell: Any, quantity: str | None = None, ends_group: bool = False) -> None:
        found = [diffs.get((quantity, name)) for name in names[1:]] if quantity else [None] * (len(names) - 1)
        lines.append(Line(label, [None if e is None else cell(e) for e in entries],
                          [None if d is None else difference_text(d) for d in found],
                          [bool(d and d.get("significant")) for d in found], ends_group))

    add("SAE", _sae_text)
    if any(e is not None and e["hook_name_out"] for e in entries):
        add("predicts", lambda e: e["hook_name_out"] or "-")
    add("scope", lambda e: e["scope"])
    add("lam", _lam_text)
    add("tokens", lambda e: f"{e['n_tokens']:,} audit + {e['n_held_out']:,} held-out")
    add("tests", lambda e: f"{e['n_tests']:,} at alpha {fmt(e['alpha'])}", ends_group=True)
    add("L", lambda e: with_se(e["objective"]["L"], e["objective"]["se"]), "L")
    add("mse", lambda e: fmt(e["objective"]["mse"], 4), "mse")
    add("lam * l1", lambda e: fmt(e["objective"]["l1"], 4), "l1")
    add("l0", lambda e: fmt(e["objective"]["l0"], 4), "l0")
    add("expl. var.", lambda e: fmt(e["objective"]["explained_variance"], 4), "explained_variance")
    add("dead share", lambda e: percent(e["objective"]["dead_share"]), "dead_share", ends_group=True)
    gaps = list(dict.fromkeys(name for e in entries if e is not None for name in e["gaps"]))
    for name in gaps:
        add(f"{name} gap", lambda e, name=name: _gap_text(e, name), f"{name} gap", ends_group=name == gaps[-1])
    for tier in ("certified", "violated", "satisfied"):
        add(tier, lambda e, tier=tier: f"{e['tiers'][tier]:,}")
    add("dead", lambda e: f"{e['dead']:,}")
    add("flagged", lambda e: percent(e["flagged_share"]), "flagged share", ends_group=True)
    # a layer-wide condition that no compared layer has (C7: skip transcoders only) is left out
    shown = [c for c in CONDITIONS if c not in LAYER_CONDITIONS
             or any(e is not None and c in e["layer_conditions"] for e in entries)]
    for c in shown:
        add(f"certified {c}", lambda e, c=c: _condition_text(e, c), ends_group=c == shown[-1])
    add("absorption score", lambda e: _map_text(e, lambda m: with_se(m.get("absorption_score"),
                                                                     m.get("absorption_score_se"))),
        "absorption score")
    add("absorption", lambda e: _map_text(e, lambda m: f"{m['trees']:,} tree(s), {m['absorbed']:,} child(ren)"))
    add("duplicates", lambda e: _map_text(e, lambda m: f"{m['duplicates']:,} pair(s), {m['duplicate_groups']:,} "
                                               "group(s)"))
    add("antipodal", lambda e: _map_text(e, lambda m: f"{m['antipodal']:,} pair(s)"), ends_group=True)
    if any(e is not None and e["repair"] is not None for e in entries):
        add("repair test", lambda e: _repair(e, lambda r: f"{_count(r['n_tokens'])} tokens"))
        add("L before", lambda e: _repair(e, lambda r: _side(r.get("before"))))
        add("L after", lambda e: _repair(e, lambda r: _side(r.get("after"))))
        add("change of L", lambda e: _repair(e, _change_text), "repair change of L")
        add("steps", lambda e: _repair(e, lambda r: f"{r['applied']:,} of {r['steps']:,} applied"), ends_group=True)
    return lines


def difference_text(d: dict[str, Any]) -> str:
    """later - reference: with ± SE and p where there is an SE; shares in percentage points."""
    share = d["quantity"] in SHARE_QUANTITIES or d["quantity"].endswith(" gap")
    scale, unit = (100, " pp") if share else (1, "")
    value = signed(d["difference"] * scale)
    if d["se"] is None:
        return f"{value}{unit}"
    mark = f" {SIGNIFICANT}" if d.get("significant") else ""
    return f"{value} ± {fmt(d['se'] * scale)}{unit} (p {fmt(d['p_value'])}){mark}"


def _sae_text(e: dict[str, Any]) -> str:
    return f"{e['sae_id'] or '-'} [{e['architecture']}, {e['d_sae']:,} features, d_in {e['d_in']:,}]"


def _lam_text(e: dict[str, Any]) -> str:
    if e["lam"] is None:
        return "unknown"
    return f"{fmt(e['lam'], 4)} ({'estimated' if e['lam_estimated'] else 'training l1 coefficient'})"


def _gap_text(e: dict[str, Any], name: str) -> str:
    gap = e["gaps"].get(name)
    if gap is None:
        return "skipped" if name in e["skipped"] else "n/a"
    return f"{percent(gap['share'])} ± {percent(gap['share_se'])} of L"


def _condition_text(e: dict[str, Any], c: str) -> str:
    count = e["certified"][c]
    return ("yes" if count else "no") if c in LAYER_CONDITIONS else f"{count:,}"


def _map_text(e: dict[str, Any], text: Any) -> str:
    return text(e["pair_map"]) if e["pair_map"]["available"] else "not computed"


def _repair(e: dict[str, Any], text: Any) -> str:
    return "no repair" if e["repair"] is None else text(e["repair"])


def _side(side: dict[str, Any] | None) -> str:
    return "n/a" if not side else with_se(side.get("L"), side.get("L_se"))


def _change_text(r: dict[str, Any]) -> str:
    change = r.get("change") or {}
    return f"{signed(change.get('L'))} ± {fmt(change.get('se'))} (p {fmt(change.get('p_value'))})"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def tokens_text(data: dict[str, Any]) -> str:
    settings = data["settings"]
    if settings["same_tokens"] is True:
        return "the same tokens: model, data, token count and held-out share agree"
    if settings["same_tokens"] is None:
        return ("cannot tell whether the tokens are the same: activations given by the caller; the SEs of the "
                "differences treat them as independent")
    keys = ", ".join(settings["token_keys_differ"])
    return f"different tokens ({keys} differ): each difference compares two samples"


def legend_text(data: dict[str, Any]) -> list[str]:
    return [f"differences: each report minus {data['reference']}; {SIGNIFICANT} significant at alpha "
            f"{fmt(data['alpha'])} two-sided, Bonferroni over {data['n_tested']:,} difference(s) with an SE; "
            "one without an SE is not tested", f"SE of a difference: {data['difference_se']}"]


def _settings_rows(data: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(key, [_plain(v) for v in values]) for key, values in data["settings"]["differ"].items()]


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value, 4)
    return str(value)


def _row_title(row: dict[str, Any]) -> str:
    return row["hook"] + (f" [{row['sae_id']}]" if row["sae_id"] else "")


def _row_notes(data: dict[str, Any], row: dict[str, Any]) -> list[str]:
    notes = []
    if row["missing"]:
        notes.append(f"not in {', '.join(row['missing'])}")
    if row["entries"][0] is None:
        notes.append(f"no differences: the reference {data['reference']} lacks this layer")
    elif data["settings"]["same_tokens"] and row["same_held_out_tokens"] is False:
        notes.append("held-out token counts differ")
    return notes


# ---- terminal --------------------------------------------------------------------------------


def render_compare_summary(data: dict[str, Any]) -> str:
    reports = data["reports"]
    names = [r["name"] for r in reports]
    width = max(map(len, names))
    lines = [f"opt_hooks compare: {len(reports)} report(s), {len(data['rows']):,} layer(s); reference {names[0]}"]
    for r in reports:
        lines.append(f"  {r['name']:<{width}}  {r['source']} ({KIND_TEXT[r['kind']]}; model {r['model'] or 'n/a'}; "
                     f"{len(r['layers']):,} layer(s))")
    lines.append(f"  tokens: {tokens_text(data)}")
    settings = _settings_rows(data)
    if settings:
        lines.append("  settings that differ:")
        lines += [f"    {key}: " + " | ".join(f"{name} {value}" for name, value in zip(names, values))
                  for key, values in settings]
    lines += [f"  {text}" for text in legend_text(data)]
    for row in data["rows"]:
        lines.append(_terminal_block(data, row, names))
    return "\n".join(lines)


def _terminal_block(data: dict[str, Any], row: dict[str, Any], names: list[str]) -> str:
    title = _row_title(row)
    table = layer_lines(data, row)
    header = ["", *names, *[f"{name} - {names[0]}" for name in names[1:]]]
    body = [[line.label, *[MISSING if c is None else c for c in line.cells], *[d or "" for d in line.diffs]]
            for line in table]
    widths = [max(len(cells[k]) for cells in [header, *body]) for k in range(len(header))]
    out = [f"-- {title} " + "-" * max(2, WIDTH - len(title) - 4)]
    out += [f"  {note}" for note in _row_notes(data, row)]
    out += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
    return "\n".join(out)


# ---- HTML ------------------------------------------------------------------------------------


def render_compare_html(data: dict[str, Any]) -> str:
    names = [r["name"] for r in data["reports"]]
    title = "opt_hooks compare: " + " vs ".join(names)
    style = (HERE / "report.css").read_text(encoding="utf-8") + COMPARE_CSS
    links = ['<a href="#overview">overview</a>']
    links += [f'<a href="#row-{k}">{escape(_row_title(row))}</a>' for k, row in enumerate(data["rows"])]
    return "\n".join([
        *page_head(title, style),
        f"<nav>{' '.join(links)}</nav>",
        _overview(data, names),
        *[_row_section(data, row, names, k) for k, row in enumerate(data["rows"])],
        '<footer class="muted"><p>compare.json has every value shown here.</p></footer>',
        f"<script>{COMPARE_JS}</script>",
        "</body></html>",
    ])


def _overview(data: dict[str, Any], names: list[str]) -> str:
    reports = "".join(
        f'<tr data-report="{escape(r["name"])}"><td class="text">{escape(r["name"])}</td>'
        f'<td class="text mono">{escape(r["source"])}</td><td class="text">{escape(KIND_TEXT[r["kind"]])}</td>'
        f'<td class="text">{escape(str(r["model"] or "n/a"))}</td>'
        f'<td class="text">{escape(", ".join(layer["hook"] for layer in r["layers"]))}</td></tr>'
        for r in data["reports"]
    )
    settings = _settings_rows(data)
    if settings:
        head = "".join(f"<th>{escape(name)}</th>" for name in names)
        body = "".join(f'<tr><td class="mono">{escape(key)}</td>' + "".join(f"<td>{escape(v)}</td>" for v in values)
                       + "</tr>" for key, values in settings)
        settings_html = (f'<h3>Settings that differ</h3><table class="settings"><thead><tr><th class="text">setting'
                         f"</th>{head}</tr></thead><tbody>{body}</tbody></table>")
    else:
        settings_html = "<p>The reports' settings agree.</p>"
    note = "" if data["settings"]["same_tokens"] is True else " note"
    return (
        '<section id="overview"><h2>Reports</h2>'
        '<table class="reports"><thead><tr><th class="text">name</th><th class="text">source</th>'
        '<th class="text">kind</th><th class="text">model</th><th class="text">layers</th></tr></thead>'
        f"<tbody>{reports}</tbody></table>"
        f'<p class="tokens{note}">Tokens: {escape(tokens_text(data))}.</p>{settings_html}'
        + "".join(f'<p class="muted">{escape(text)}.</p>' for text in legend_text(data)) + "</section>"
    )


def _row_section(data: dict[str, Any], row: dict[str, Any], names: list[str], k: int) -> str:
    head = "".join(f"<th>{escape(name)}</th>" for name in names)
    head += "".join(f'<th class="diff">{escape(name)} - {escape(names[0])}</th>' for name in names[1:])
    body = "".join(_html_line(line) for line in layer_lines(data, row))
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in _row_notes(data, row))
    return (f'<section class="layer" id="row-{k}" data-hook="{escape(row["hook"])}">'
            f"<h2>{escape(_row_title(row))}</h2>{notes}"
            f'<div class="table-scroll"><table class="compare"><thead><tr><th class="text"></th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div></section>")


def _html_line(line: Line) -> str:
    cells = "".join(f'<td class="missing">{MISSING}</td>' if c is None else f"<td>{escape(c)}</td>"
                    for c in line.cells)
    cells += "".join(f'<td class="diff{" significant" if sig else ""}">{escape(d or "")}</td>'
                     for d, sig in zip(line.diffs, line.significant))
    group = ' class="group"' if line.ends_group else ""
    return f'<tr{group}><td class="label">{escape(line.label)}</td>{cells}</tr>'
