"""report.html: one self-contained page for an AuditRecord (inline CSS, JS and SVG; no network).

Page layout: the top findings of every layer (certified features and layer findings ranked by
held-out gain, each feature with its strongest context), the overview (what the tiers mean, tier
and certified-condition counts per layer, run facts), then one section per layer: the held-out
objective and the layer gaps first (every gain needs a scale), facts and scope, size
distributions of C3 and C4, layer-wide conditions (C5, C6), the table of every feature ranked by
held-out gain (THEORY.md 3.5), the flagged pairs (table and the paper's scatter figure), the
label-free absorption map (THEORY.md section 6: absorption trees, duplicates, antipodal pairs)
and the top-activating contexts of the top-ranked features. A record that carries a repair
(`AuditRecord.repair`, THEORY.md section 7) gets a Repair section after the overview: per layer,
the objective before / after on the test tokens and the repair's steps, applied or not, with
their first items.

The feature table is not HTML rows: at 24,576 features a layer's rows would be tens of MB of DOM.
Each layer's features travel as one compact JSON block (`_feature_data`, numbers to 4
significant digits) that report.js pages, searches, filters and sorts in the browser; contexts
are rendered here once (`_context`) and shipped as HTML snippets. Other long lists are cut to the
top-ranked entries; report.json has everything.
"""
from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any

from opt_hooks.report import neuronpedia
from opt_hooks.report.svg import condition_grid, fmt, histogram, pair_scatter, split_bar, tier_bars
from opt_hooks.records import (
    CONDITIONS, TIER_RANK, AbsorptionRow, AntipodalRow, AuditRecord, CertificateCheck, DuplicateRow, FeatureRow,
    LayerResult, PairRow, latent_label,
)
from opt_hooks.report.terminal import (
    FLAGGED_TEXT, REPAIR_STEPS, ROWS_TEXT, SCORE_TEXT, gap_text, items_text, map_unavailable, objective_text, percent,
    repair_cells,
)

HERE = Path(__file__).resolve().parent
MAX_TOP_FINDINGS = 50  # certified findings of all layers, by held-out gain
MAX_QUICK_LIST = 25  # features per Neuronpedia quick list: each adds ~90 characters to its URL
FEATURE_PAGE = 50  # feature table rows per page (report.js pages the rest)
MAX_PAIR_ROWS = 500
MAX_SCATTERS = 12
MAX_CONTEXT_FEATURES = 12
MAX_LISTED_DEAD = 60
MAX_TREES = 100  # absorption trees per layer, in the map's order
MAX_MAP_ROWS = 500  # duplicates, antipodal pairs
MAX_STEP_ITEMS = 20  # items shown per repair step

TIER_TEXT = {
    "certified": "a certificate (a fixed change of the SAE, chosen on the audit tokens) lowers the objective "
    "on held-out tokens it was not chosen from, significantly (Bonferroni over the layer's certificates) and "
    "materially (a set share of the feature's own value, or of the layer's L): the feature is provably not "
    "optimal, by an amount that matters",
    "violated": "the certificate lowers the objective on the audit tokens, but held out its descent is not "
    "significant or not material (its numbers and the reason are listed)",
    "satisfied": "no certificate lowers the objective on the audit tokens",
}
NEW_TAB = ' target="_blank" rel="noopener"'
SURROGATE_NOTE = (
    "This SAE was not trained with an L1 penalty: C1, C2, C4 and C6 are the conditions of the L1 "
    "surrogate objective, not proofs about its own objective. C3 and C5 hold for every architecture."
)


def render_html(result: AuditRecord) -> str:
    layers = list(result.layers.values())
    contexts: dict[int, str] = {}  # the snippets the feature tables refer to, shipped once
    texts = Snippets(result.token_texts, result.token_pieces)
    sections = [_layer_section(k, layer, texts, contexts) for k, layer in enumerate(layers)]
    script = (HERE / "report.js").read_text(encoding="utf-8")
    return "\n".join(
        [
            *page_head(f"opt_hooks audit: {_model_name(result)}", (HERE / "report.css").read_text(encoding="utf-8")),
            _nav(layers, result.repair is not None),
            _top_findings(layers, texts),
            _overview(result, layers),
            "" if result.repair is None else _repair_section(result.repair, result.layers),
            *sections,
            _footer(),
            f'<script type="application/json" id="contexts">{_json(contexts)}</script>',
            f"<script>{script}</script>",
            "</body></html>",
        ]
    )


def page_head(title: str, style: str) -> list[str]:
    """The opening lines of a self-contained page, to its <h1>: the scripts mark the body
    data-report-status "ready" (or list their errors in #js-errors), which the browser tests read."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{style}</style></head>",
        '<body data-report-status="loading">',
        '<pre id="js-errors"></pre>',
        f"<h1>{escape(title)}</h1>",
    ]


def _model_name(result: AuditRecord) -> str:
    return str(result.meta.get("model") or "SAE optimality report")


def _nav(layers: list[LayerResult], repair: bool = False) -> str:
    links = ['<a href="#findings">top findings</a>', '<a href="#overview">overview</a>']
    if repair:
        links.append('<a href="#repair">repair</a>')
    links += [f'<a href="#layer-{k}">{escape(layer.hook_name)}</a>' for k, layer in enumerate(layers)]
    return f"<nav>{' '.join(links)}</nav>"


def _top_findings(layers: list[LayerResult], texts: dict[int, str]) -> str:
    """Certified findings of every layer, by held-out gain (per held-out token, each on its own
    layer's objective): features with their strongest context, and the layer-wide findings (C5, C6, ...)."""
    findings: list[tuple[float, int, FeatureRow | None, str, CertificateCheck | None]] = []
    for k, layer in enumerate(layers):
        for f in layer.features:
            if f.tier == "certified":
                findings.append((f.gain if f.gain is not None else -math.inf, k, f, "", None))
        for name, entry in layer.layer_conditions.items():
            check = entry.get("certificate")
            if entry.get("tier") == "certified" and check is not None:
                findings.append((check.gain if check.gain is not None else -math.inf, k, None, name, check))
    findings.sort(key=lambda item: -item[0])
    head = '<section id="findings"><h2>Top findings</h2>'
    if not findings:
        return (f"{head}<p>No certified finding in any layer: the layer tables below list the features whose "
                "descent is not certified (violated) and why.</p></section>")
    rows = []
    for rank, (_, k, f, name, check) in enumerate(findings[:MAX_TOP_FINDINGS], 1):
        layer = layers[k]
        where = f'<td class="text"><a href="#layer-{k}">{escape(layer.hook_name)}</a></td>'
        if f is not None:
            certificates = "\n".join(_certificate_text(c) for c in f.certificates.values())
            context = ""
            if f.top_tokens and f.top_tokens[0] in texts:
                context = _feature_context(f, 0, texts)
            rows.append(
                f"<tr>{_num(rank)}{where}<td class=\"text\">feature {_feature_link(layer, f.id, f.sign)}</td>"
                f'<td class="text">{escape(" ".join(f.conditions))}</td>{_num(f.gain, certificates)}'
                f'{_num(f.gain_se)}{_num(f.p_value)}{_num(f.share)}<td class="text context-cell">{context}</td></tr>'
            )
        else:
            rows.append(
                f"<tr>{_num(rank)}{where}<td class=\"text\">layer: {escape(name)} {escape(CONDITIONS.get(name, ''))}</td>"
                f'<td class="text">{escape(name)}</td>{_num(check.gain, _certificate_text(check))}'
                f'{_num(check.held_out_se)}{_num(check.p_value)}{_num(check.share)}<td class="text"></td></tr>'
            )
    header = _header("#", ("layer", "text"), ("finding", "text"), ("conditions", "text"), "held-out gain", "± SE",
                     "p", "share", ("strongest context (token shaded by its activation)", "text"))
    lists = _quick_lists(layers, [(k, f.id) for _, k, f, _, _ in findings if f is not None])
    more = len(findings) - MAX_TOP_FINDINGS
    return (
        f"{head}<p class=\"muted\">{len(findings):,} certified finding(s) in {len(layers):,} layer(s), by held-out "
        "gain per token (each on its own layer's objective); the layer sections below have every feature."
        f"{f' The first {MAX_TOP_FINDINGS:,} are listed.' if more > 0 else ''}</p>{lists}"
        f'<div class="scroll"><table class="sortable top-findings"><thead>{header}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _quick_lists(layers: list[LayerResult], features: list[tuple[int, int]]) -> str:
    """One Neuronpedia quick list per layer with dashboards: its first MAX_QUICK_LIST of `features`
    ((layer index, feature id), in order)."""
    links = []
    for k, layer in enumerate(layers):
        ids = [feature for j, feature in features if j == k][:MAX_QUICK_LIST]
        if layer.neuronpedia_id and ids:
            url = neuronpedia.quick_list_url(f"{layer.hook_name}: top certified", [(layer.neuronpedia_id, i) for i in ids])
            links.append(f'<a href="{escape(url)}"{NEW_TAB}>{escape(layer.hook_name)} ({len(ids):,})</a>')
    return f'<p class="quick-lists">Neuronpedia quick lists: {" ".join(links)}</p>' if links else ""


def _quick_list_link(layer: LayerResult, name: str, features: list[int], label: str) -> str:
    """A link to Neuronpedia's quick list of `features` (one page with each dashboard), or ""
    when the layer has no dashboards. report.js writes its href (as neuronpedia.quick_list_url
    does) from the data attributes: a pair's URL is ~500 characters, and a layer lists up to 1,500
    pairs and 100 trees."""
    if not layer.neuronpedia_id:
        return ""
    return (f'<a class="quick-list" data-np="{escape(layer.neuronpedia_id)}" data-name="{escape(layer.hook_name)}: '
            f'{escape(name)}" data-features="{" ".join(map(str, features))}"{NEW_TAB}>{escape(label)}</a>')


def _overview(result: AuditRecord, layers: list[LayerResult]) -> str:
    names = [layer.hook_name for layer in layers]
    tiers = tier_bars(list(zip(names, (layer.tier_counts() for layer in layers))))
    # C7 exists for skip transcoders only: shown where one of the layers is one
    shown = [c for c in CONDITIONS if c != "C7" or any("C7" in layer.layer_conditions for layer in layers)]
    grid = condition_grid(list(zip(names, (layer.condition_counts() for layer in layers))), shown)
    tier_items = "".join(
        f'<li><span class="badge {t}">{t}</span> {escape(text)}</li>' for t, text in TIER_TEXT.items()
    )
    condition_items = "".join(f"<li><b>{c}</b> {escape(CONDITIONS[c])}</li>" for c in shown)
    return (
        '<section id="overview"><h2>Overview</h2>'
        "<p>Each SAE feature is checked against first-order optimality conditions of the sparse "
        "dictionary-learning objective. A broken condition comes with a certificate: a fixed change "
        "of the SAE that lowers the objective, chosen on the audit tokens and measured on held-out "
        "tokens, with its standard error. Findings are ranked by held-out gain per token.</p>"
        f'<ul class="tiers">{tier_items}</ul>'
        f'<div class="plots"><div class="card"><h3>Features per tier</h3>{tiers}</div>'
        f'<div class="card"><h3>Certified per condition (C2: pairs; C5, C6: 0 or 1)</h3>{grid}'
        f'<ul class="muted">{condition_items}</ul></div></div>'
        f"<h3>Run</h3>{_facts(_flatten(result.meta))}</section>"
    )


def _flatten(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in meta.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", _plain(v)) for k, v in value.items()]
        else:
            rows.append((key, _plain(value)))
    return rows


def _plain(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value, 4)
    return escape(value if isinstance(value, str) else json.dumps(value))


SPECIAL_PREFIX = re.compile(r"^(?:<\|[^|<>]*\|>)+")  # "<|endoftext|>": a document starts after it
CUT = '<span class="cut">…</span>'


def _whole_words(left: str, right: str) -> tuple[str, str, bool, bool]:
    """The snippet's sides without the words its window may have cut: (left, right, cut_left,
    cut_right).

    A snippet is a fixed number of tokens either side of the token (run.py), so its first and
    last words may be pieces of longer ones, and nothing in the text says which. A word is kept
    only when whitespace or punctuation proves where it starts (left) or ends (right): the left
    side loses what comes before its first whitespace unless it starts with whitespace or a special
    token, the right side loses what follows its last whitespace when it ends inside a word. The
    token's own word (no whitespace between it and the edge) is always kept whole."""
    cut_left = cut_right = False
    special = SPECIAL_PREFIX.match(left)
    if left and not left[0].isspace() and special is None:
        first = re.search(r"\s", left)
        if first is not None:
            left, cut_left = left[first.start():], True
    if right and (right[-1].isalnum() or right[-1] == "_"):
        last = max(right.rfind(c) for c in " \n\t")
        if last >= 0:
            right, cut_right = right[:last], True
    return left, right, cut_left, cut_right


class Snippets(dict):
    """The record's context snippets, {token: "left[[token]]right"}, with `pieces`: {token: (the same
    window token by token, the token's position)} (`AuditRecord.token_pieces`), which let a feature's
    code shade every token of its contexts (`FeatureRow.top_context_values`)."""

    def __init__(self, texts: dict[int, str], pieces: dict[int, tuple[list[str], int]]) -> None:
        super().__init__(texts)
        self.pieces = pieces


def _shaded(pieces: list[str], at: int, codes: list[float], scale: float | None) -> str:
    """A context token by token, each token shaded by the feature's code on it (its share of the
    feature's largest code, `scale`), the top token marked; whole words only, as `_whole_words`."""
    first, last = 0, len(pieces)
    starts = [k for k in range(at) if pieces[k][:1].isspace() or SPECIAL_PREFIX.match(pieces[k])]
    if at and not (pieces[0][:1].isspace() or SPECIAL_PREFIX.match(pieces[0])) and starts:
        first = starts[0]
    tail = pieces[-1] if last > at + 1 else ""
    if tail and (tail[-1].isalnum() or tail[-1] == "_"):
        breaks = [k for k in range(at + 1, last) if pieces[k][:1].isspace()]
        if breaks:
            last = breaks[-1]
    out = [CUT] if first else []
    for k in range(first, last):
        value = codes[k] if k < len(codes) else 0.0
        share = min(1.0, max(0.0, value / scale)) if scale else 0.0
        tip = f' title="activation {fmt(value)}"' if value else ""
        if k == at:
            out.append(f'<mark class="act" style="--act:{share:.2f}"{tip}>{_visible(pieces[k])}</mark>')
        elif value > 0:
            out.append(f'<span class="act" style="--act:{share:.2f}"{tip}>{_visible(pieces[k])}</span>')
        else:
            out.append(_visible(pieces[k]))
    if last < len(pieces):
        out.append(CUT)
    return "".join(out)


def _visible(text: str) -> str:
    """Escaped text with line breaks shown as ↵, so a snippet stays one line."""
    return escape(text).replace("\n", '<span class="nl">↵</span>')


def _context(text: str, value: float | None = None, scale: float | None = None) -> str:
    """A token's context snippet in whole words, the token marked.

    The run marks the token as "left[[token]]right"; the left part is longer (more tokens) and
    more likely to contain a literal "[[" (code), so the last "[[" is taken as the marker. With
    the feature's activation `value` on the token and its largest activation `scale`, the mark is
    shaded by value / scale (the record keeps the activation of the top token only, not of its
    neighbours, so they stay unshaded)."""
    left, marker, rest = text.rpartition("[[")
    token, closing, right = rest.partition("]]")
    if not (marker and closing):
        return escape(text)
    left, right, cut_left, cut_right = _whole_words(left, right)
    mark = "<mark>"
    if value is not None:
        share = min(1.0, max(0.0, value / scale)) if scale else 1.0
        tip = f"activation {fmt(value)}: {share:.0%} of the feature's largest ({fmt(scale)})"
        mark = f'<mark class="act" style="--act:{share:.2f}" title="{escape(tip)}">'
    return (f"{CUT if cut_left else ''}{_visible(left)}{mark}{_visible(token)}</mark>{_visible(right)}"
            f"{CUT if cut_right else ''}")


def _facts(rows: list[tuple[str, str]]) -> str:
    """A definition list of (label, value as HTML) rows."""
    items = "".join(f"<dt>{escape(label)}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<dl class="facts">{items}</dl>'


def _layer_section(k: int, layer: LayerResult, texts: dict[int, str], contexts: dict[int, str]) -> str:
    dead = set(layer.dead_features)
    live = [f for f in layer.features if f.id not in dead]
    # data-column: where report.js finds the sizes in the feature table's rows, to re-bin a zoomed range
    histograms = histogram([f.c3_size for f in live], "C3 size (decoder stationarity)", lo=0.0, hi=1.0,
                           attrs=f' data-layer="{k}" data-column="10"')
    histograms += histogram([f.c4_size for f in live if f.c4_size is not None], "C4 size (code optimality)",
                            attrs=f' data-layer="{k}" data-column="11"')
    parts = [
        f'<section class="layer" id="layer-{k}"><h2>{escape(layer.hook_name)}</h2>',
        f'<p class="scope">Scope: {escape(layer.scope)}</p>',
        "" if layer.scope.startswith("L1 objective") else f'<p class="note">{escape(SURROGATE_NOTE)}</p>',
        _facts(_layer_summary(layer)),
        _facts(_layer_facts(layer)),
        *[f'<p class="note">{escape(note)}</p>' for note in layer.notes],
        f'<div class="plots"><div class="card">{histograms}</div></div>',
        _layer_conditions(layer, texts),
        _feature_table(k, layer, texts, contexts),
        _pair_section(layer),
        _absorption_section(layer, texts),
        _contexts(layer, texts),
        "</section>",
    ]
    return "\n".join(parts)


def _layer_summary(layer: LayerResult) -> list[tuple[str, str]]:
    """The held-out objective and the layer gaps: the scale of every gain below."""
    rows = [("held-out objective", escape(objective_text(layer))),
            ("flagged", f"{percent(layer.flagged_share())} of latents: {escape(FLAGGED_TEXT)}")]
    rows += [(f"{name} gap", escape(text)) for name, text in gap_text(layer)]
    # the pair map's reason stands in its own section
    rows += [(f"{name} skipped", escape(reason)) for name, reason in layer.skipped.items() if name != "absorption"]
    return rows


def _layer_facts(layer: LayerResult) -> list[tuple[str, str]]:
    if layer.lam_estimated:
        lam_source = "estimated from the data (2 x median of &lt;d_i, r_n&gt; over active codes)"
    else:
        lam_source = "the SAE's training l1 coefficient"
    dead = layer.dead_features
    dead_text = f"{len(dead):,}" + (f": {', '.join(map(str, dead[:MAX_LISTED_DEAD]))}" if dead else "")
    if len(dead) > MAX_LISTED_DEAD:
        dead_text += f" ... (+{len(dead) - MAX_LISTED_DEAD:,})"
    rows = [
        ("architecture", escape(layer.architecture)),
        ("features", f"{layer.d_sae:,} on d_in = {layer.d_in:,}"),
        ("lam", f"{fmt(layer.lam, 4)}: {lam_source}" if layer.lam is not None else "unknown (C4, C6 skipped)"),
        ("tokens", f"{layer.n_tokens:,} audit + {layer.n_held_out:,} held-out"),
        ("tests", f"{layer.n_tests:,} certificates, alpha {fmt(layer.alpha)} (Bonferroni)"),
        ("dead features", dead_text),
    ]
    if layer.sae_id:
        rows.append(("SAE id", escape(layer.sae_id)))
    if layer.neuronpedia_id:
        url = neuronpedia.sae_url(layer.neuronpedia_id)
        rows.append(("Neuronpedia", f'<a href="{escape(url)}"{NEW_TAB}>{escape(layer.neuronpedia_id)}</a>'))
    return rows


def _certificate_text(check: CertificateCheck | None) -> str:
    if check is None:
        return "none"
    if check.held_out is None:
        held = "no held-out tokens"
    else:
        held = (f"{fmt(check.held_out)} ± {fmt(check.held_out_se)} on {check.n_held_out:,} held-out "
                f"(p {fmt(check.p_value)}, {check.n_touched:,} changed)")
    reason = f"; {check.reason}" if check.reason else ""
    return (
        f"{check.condition} step {fmt(check.step)}: predicted {fmt(check.predicted)}, "
        f"measured {fmt(check.measured)} on {check.n_audit:,} audit, {held}{reason}"
    )


def _badge(tier: str) -> str:
    return f'<td class="text" data-v="{TIER_RANK[tier]}"><span class="badge {tier}">{tier}</span></td>'


def _num(value: float | int | None, tooltip: str | None = None) -> str:
    """A numeric cell sorted by its exact value; `tooltip` shows on hover (dotted underline)."""
    key = "" if value is None else repr(value)
    shown = f'<abbr title="{escape(tooltip)}">{fmt(value)}</abbr>' if tooltip else fmt(value)
    return f'<td data-v="{key}">{shown}</td>'


def _header(*columns: str | tuple[str, str]) -> str:
    """A sortable table's header row. A column is a label (numbers) or (label, kind): "text"
    sorts alphabetically, "badge" is a tier sorted by rank."""
    cells = []
    for column in columns:
        label, kind = column if isinstance(column, tuple) else (column, "num")
        if kind == "text":
            cells.append(f'<th class="text">{label}</th>')
        else:
            cells.append(f'<th class="{"text" if kind == "badge" else "num"}" data-type="num">{label}</th>')
    return f"<tr>{''.join(cells)}</tr>"


def _more(hidden: int, what: str) -> str:
    return f'<p class="muted">{hidden:,} more {what} in report.json.</p>' if hidden > 0 else ""


def _feature_link(layer: LayerResult, feature: int, sign: str | None = None) -> str:
    """The feature's id (a signed SAE's: with the sign, "12−"), linked to its latent's Neuronpedia
    dashboard when the layer has one (new tab: the report stays open)."""
    label = escape(latent_label(feature, sign))
    if not layer.neuronpedia_id:
        return label
    return f'<a href="{escape(neuronpedia.feature_url(layer.neuronpedia_id, feature))}"{NEW_TAB}>{label}</a>'


def _layer_conditions(layer: LayerResult, texts: dict[int, str]) -> str:
    rows = []
    for name, entry in layer.layer_conditions.items():
        details = ", ".join(
            f"{key} {fmt(value) if isinstance(value, (int, float)) else escape(str(value))}"
            for key, value in entry.items()
            if key not in ("tier", "certificate") and not isinstance(value, list)
        )
        check = entry.get("certificate")
        rows.append(
            f'<tr><td class="text"><b>{escape(name)}</b> {escape(CONDITIONS.get(name, ""))}</td>'
            f'{_badge(entry.get("tier", "satisfied"))}<td class="text">{details}</td>'
            f'<td class="text">{escape(_certificate_text(check))}</td></tr>'
        )
    worst = _worst_tokens(layer.layer_conditions.get("C6", {}), texts)
    header = "".join(f'<th class="text">{name}</th>' for name in ("condition", "tier", "values", "certificate"))
    return (
        f"<h3>Layer conditions</h3><table><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{worst}"
    )


def _worst_tokens(c6: dict[str, Any], texts: dict[int, str]) -> str:
    """C6 names the tokens with the largest residuals: where a dead feature's atom should go."""
    tokens, norms = c6.get("worst_tokens", []), c6.get("worst_rnorms", [])
    if not tokens:
        return ""
    measure = "w ||r||" if c6.get("worst_weighted") else "||r||"  # token-weighted SAEs rank by w_n ||r_n||
    items = "".join(
        f'<div class="context"><b>{measure} = {fmt(norm)}</b>  {_context(texts.get(token, f"token #{token}"))}</div>'
        for token, norm in zip(tokens, norms)
    )
    summary = "Largest residuals (C6: where a dead atom would lower the objective)"
    return f"<details><summary>{summary}</summary>{items}</details>"


TIER_FILTERS = {"descent": "with a descent", "certified": "certified", "violated": "violated",
                "satisfied": "satisfied", "all": "all tiers"}
# The feature table's columns: (label, kind, what the row array holds there); report.js reads
# the same list from the table's data-columns and formats each cell by its kind.
FEATURE_COLUMNS = (
    ("feature", "id"), ("tier", "tier"), ("conditions", "text"), ("held-out gain", "gain"), ("± SE", "num"),
    ("p", "num"), ("value v_i", "num"), ("share", "num"), ("active tokens", "int"), ("mean z (μ)", "num"),
    ("C3 size", "num"), ("C4 size", "num"), ("why not certified", "text"),
)


def _compact(value: float | int | None) -> float | int | None:
    """A number for the page's JSON: 4 significant digits (the page shows 3; the fourth keeps
    the sort order of values that print alike), None for missing or non-finite values."""
    if value.__class__ is float:  # one test per number: a layer's data has ~10 numbers per feature
        return float("%.4g" % value) if value - value == 0.0 else None  # NaN and infinities give NaN
    return value


def _json(data: Any) -> str:
    """JSON for a <script type="application/json"> block: no "<" in it, so no text can close
    the block or open a comment."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _feature_data(layer: LayerResult, texts: dict[int, str], contexts: dict[int, str]) -> dict[str, Any]:
    """Every feature of the layer as compact rows, in the ranking's order (features with a descent
    first, by tier then held-out gain; the others by id), for report.js.

    A row is [id, tier rank, conditions, gain, gain SE, p, value, share, active tokens, mean code,
    C3 size, C4 size, reason, max code, certificates, top, sign]: sign a signed SAE's row's ("+" or "-",
    null otherwise: report.js shows "12−"), reason an index into `reasons` (-1:
    none), certificates per condition: a certified one [condition, tier rank, step, predicted,
    measured, held-out change, its SE, p, audit tokens, held-out tokens, tokens changed, reason],
    any other its verdict [condition, tier rank, reason] (what report.json keeps of it: nearly
    every live feature has two, and their held-out numbers are the row's own for the best one;
    the rest is in tables/<hook>/features.parquet), top [token, value]
    for the top tokens that have a snippet (added to `contexts`, rendered once for every table);
    `dead` lists the dead features, which the size histograms leave out."""
    reasons: dict[str, int] = {}

    def reason(text: str) -> int:
        return reasons.setdefault(text, len(reasons)) if text else -1

    flagged = layer.flagged()  # rows of layer.features
    seen = set(flagged)
    order = flagged + [k for k in range(len(layer.features)) if k not in seen]
    rows = []
    c_ = _compact
    for feature_id in order:
        f = layer.features[feature_id]
        best = f.certificates.get(f.conditions[0]) if f.conditions else None
        checks = [
            [c.condition, TIER_RANK[c.tier], c_(c.step), c_(c.predicted), c_(c.measured), c_(c.held_out),
             c_(c.held_out_se), c_(c.p_value), c.n_audit, c.n_held_out, c.n_touched, reason(c.reason)]
            if c.tier == "certified" else [c.condition, TIER_RANK[c.tier], reason(c.reason)]
            for c in f.certificates.values()
        ]
        top = []
        for token, value in zip(f.top_tokens, f.top_values):
            if token in texts:
                if token not in contexts:
                    contexts[token] = _context(texts[token])
                top.append([token, c_(value)])
        rows.append([
            f.id, TIER_RANK[f.tier], " ".join(f.conditions), c_(f.gain), c_(f.gain_se), c_(f.p_value), c_(f.value),
            c_(f.share), f.active_count, c_(f.mean_code), c_(f.c3_size), c_(f.c4_size),
            reason(best.reason if best else ""), c_(f.max_code), checks, top, f.sign,
        ])
    return {"reasons": list(reasons), "dead": layer.dead_features, "rows": rows}


def _feature_table(k: int, layer: LayerResult, texts: dict[int, str], contexts: dict[int, str]) -> str:
    """The layer's feature table: controls, an empty table and its data; report.js renders one
    page of rows at a time from the data (a page of FEATURE_PAGE rows, not d_sae rows of DOM)."""
    data = _feature_data(layer, texts, contexts)
    n_flagged = sum(1 for row in data["rows"] if row[1] < TIER_RANK["satisfied"])
    header = "".join(
        f'<th class="{"text" if kind in ("text", "tier") else "num"}" data-kind="{kind}">{label}</th>'
        for label, kind in FEATURE_COLUMNS
    )
    tiers = "".join(f'<option value="{value}">{label}</option>' for value, label in TIER_FILTERS.items())
    found = {c for f in layer.features for c in f.conditions}  # the per-feature conditions this layer has
    conditions = "".join(f'<option value="{c}">{c}</option>' for c in CONDITIONS if c in found)
    sizes = "".join(f'<option{" selected" if n == FEATURE_PAGE else ""}>{n}</option>' for n in (25, 50, 100, 500))
    np_attr = f' data-np="{escape(layer.neuronpedia_id)}"' if layer.neuronpedia_id else ""
    # a signed SAE's rows are its latents' signs (two per latent)
    total = f"{len(layer.features):,} latent signs" if layer.signed else f"{layer.d_sae:,}"
    return (
        f"<h3>Features ({n_flagged:,} of {total} with a descent), by held-out gain</h3>"
        '<p class="muted">Certified first, then by held-out gain. Search feature ids ("12, 40-60"), filter by '
        "tier and condition, click a header to sort (again to reverse), a row for its certificates and "
        "contexts; hover a gain for its certificates.</p>"
        f'<div class="table-controls" data-layer="{k}">'
        f'<label>ids <input type="search" class="feature-search" placeholder="e.g. 12, 40-60" size="16"></label> '
        f'<label>tier <select class="tier-filter">{tiers}</select></label> '
        f'<label>condition <select class="condition-filter"><option value="">any</option>{conditions}</select></label> '
        f'<label>rows <select class="page-size">{sizes}</select></label> '
        '<button type="button" class="page-first">&laquo;</button><button type="button" class="page-prev">&lsaquo;</button>'
        '<span class="page-status"></span>'
        '<button type="button" class="page-next">&rsaquo;</button><button type="button" class="page-last">&raquo;</button>'
        '<a class="page-quick-list" hidden target="_blank" rel="noopener">this page on Neuronpedia</a></div>'
        f'<table class="sortable features paged" data-layer="{k}"{np_attr}><thead><tr>{header}</tr></thead>'
        "<tbody></tbody></table>"
        f'<script type="application/json" class="feature-data" data-layer="{k}">{_json(data)}</script>'
    )


def _pair_section(layer: LayerResult) -> str:
    if not layer.pairs:
        return "<h3>Flagged pairs (C2)</h3><p>No pair breaks C2.</p>"
    pairs = layer.ranked_pairs()
    header = _header(
        "i", "j", ("kind", "text"), "ρ", "bound (M or m)", "(1 − ρ) μ_j", "margin / μ_j", "i active", "j active",
        "both", "P(j without i) &le;", "co-activation p &le;", ("tier", "badge"), "held-out gain", "± SE",
        *_np_column(layer),
    )
    rows = "".join(_pair_row(layer, p) for p in pairs[:MAX_PAIR_ROWS])
    more = _more(len(pairs) - MAX_PAIR_ROWS, "pairs")
    plotted = [p for p in pairs if p.sample_i and p.hull_min is not None and p.hull_max is not None]
    figures = "".join(_pair_figure(p) for p in plotted[:MAX_SCATTERS])
    return (
        f"<h3>Flagged pairs (C2): {len(pairs):,}</h3>"
        '<p class="muted">hierarchy: j (child) essentially never fires without i (parent): the maximum M '
        "of z_j where i is off lies below (1 − ρ) μ_j. complementary: the minimum m of z_j where i is off "
        "lies above it.</p>"
        f'<table class="sortable pairs"><thead>{header}</thead><tbody>{rows}</tbody></table>{more}'
        f'<div class="pairs-grid">{figures}</div>'
    )


def _pair_row(layer: LayerResult, p: PairRow) -> str:
    check = p.certificate
    return (
        f'<tr><td data-v="{p.i}">{_feature_link(layer, p.i, p.sign_i)}</td>'
        f'<td data-v="{p.j}">{_feature_link(layer, p.j, p.sign_j)}</td>'
        f'<td class="text">{p.kind}</td>{_num(p.rho)}{_num(p.bound)}{_num(p.threshold)}{_num(p.relative_margin)}'
        f"{_num(p.count_i)}{_num(p.count_j)}{_num(p.co_count)}{_num(p.p_j_without_i_upper)}"
        f"{_num(check.count_p_value if check else None)}{_badge(p.tier)}"
        f"{_num(p.gain, _certificate_text(check))}{_num(check.held_out_se if check else None)}"
        f"{_np_cell(layer, f'{p.kind} pair {_labels(p)[0]} -> {_labels(p)[1]}', [p.i, p.j])}</tr>"
    )


def _np_column(layer: LayerResult) -> tuple[tuple[str, str], ...]:
    """The quick-list column of a table of latent pairs, where the layer has dashboards."""
    return (("Neuronpedia", "text"),) if layer.neuronpedia_id else ()


def _np_cell(layer: LayerResult, name: str, features: list[int]) -> str:
    if not layer.neuronpedia_id:
        return ""
    return f'<td class="text">{_quick_list_link(layer, name, features, "both")}</td>'


def _labels(r: PairRow | DuplicateRow | AntipodalRow) -> tuple[str, str]:
    """The pair's latents as text ("12", a signed SAE's "12−")."""
    return latent_label(r.i, r.sign_i), latent_label(r.j, r.sign_j)


def _pair_figure(p: PairRow) -> str:
    hull = (p.hull_min, p.hull_max)
    i, j = _labels(p)
    plot = pair_scatter(p.sample_i, p.sample_j, p.threshold, hull, p.rho, (i, j), p.kind)
    if p.kind == "hierarchy":
        finding = f"max z_j where i is off = {fmt(p.bound)} &lt; (1 − ρ) μ_j = {fmt(p.threshold)}"
    else:
        finding = f"min z_j where i is off = {fmt(p.bound)} &gt; (1 − ρ) μ_j = {fmt(p.threshold)}"
    evidence = (
        f"j = {escape(j)} active on {p.count_j:,} tokens, i = {escape(i)} on {p.co_count:,} of them; "
        f"P(j fires without i) &le; {fmt(p.p_j_without_i_upper)} (95%)"
    )
    return (
        f"<figure>{plot}<figcaption><span class=\"badge {p.tier}\">{p.tier}</span> {finding}. {evidence}. "
        f"{escape(_certificate_text(p.certificate))}</figcaption></figure>"
    )


def _context_lines(f: FeatureRow, texts: dict[int, str]) -> str:
    """The feature's top-activating contexts, strongest first, each with its code: every token
    shaded by the feature's code on it where the record has them (`Snippets`), else the top token
    alone, against the feature's largest code."""
    lines = []
    for k, (token, value) in enumerate(zip(f.top_tokens, f.top_values)):
        lines.append(f'<div class="context"><b>{fmt(value)}</b>  {_feature_context(f, k, texts)}</div>')
    return "".join(lines)


def _feature_context(f: FeatureRow, k: int, texts: dict[int, str]) -> str:
    """The k-th top context of feature f, shaded token by token where the record allows."""
    token = f.top_tokens[k]
    pieces = texts.pieces.get(token) if isinstance(texts, Snippets) else None
    if pieces is not None and k < len(f.top_context_values) and f.top_context_values[k]:
        return _shaded(*pieces, f.top_context_values[k], f.max_code)
    return _context(texts.get(token, f"token #{token}"), f.top_values[k], f.max_code)


def _contexts(layer: LayerResult, texts: dict[int, str]) -> str:
    blocks = []
    for feature_id in layer.flagged()[:MAX_CONTEXT_FEATURES]:
        f = layer.feature(feature_id)
        if not f.top_tokens:
            continue
        blocks.append(
            f"<h4>feature {_feature_link(layer, f.id, f.sign)} <span class=\"badge {f.tier}\">{f.tier}</span> "
            f"{escape(' '.join(f.conditions))}</h4>{_context_lines(f, texts)}"
        )
    if not blocks:
        return ""
    return "<h3>Top-activating contexts of the top-ranked features</h3>" + "".join(blocks)


MAP_INTRO = (
    "Label-free (THEORY.md section 6): found from the SAE's decoder and its codes alone, with no concept labels. "
    "It shows what C2 cannot: once a hierarchy is absorbed the child fires without its parent and C2 is silent."
)
MAP_FINDINGS = {
    "absorption": "a child latent's atom took in its parent's direction (ρ well above unrelated atom pairs) and "
    "the parent is off on most of the child's tokens, although the held-out input there carries the parent's "
    "direction (evidence: its size there as a share of its size where the parent fires; about 1 when absorbed, "
    "about ρ² in the reverse orientation). Siblings that absorbed the same parent sit under it; the L1 price is "
    "the rise of L per token if the child were split back, what keeps the absorption stable.",
    "duplicates": "two latents with nearly the same atom code one direction twice; merge them.",
    "antipodal": "two dense latents with nearly opposite atoms that rarely fire together code one dense "
    "direction (d_i − d_j) as a nonnegative pair.",
}


def _absorption_section(layer: LayerResult, texts: dict[int, str]) -> str:
    head = "<h3>Absorption map</h3>"
    why_not = map_unavailable(layer)
    if why_not is not None:
        return f"{head}<p>Not computed: {escape(why_not)}</p>"
    caption = _map_caption(layer.pair_map)
    if not (layer.absorption or layer.duplicates or layer.antipodal):
        return f"{head}<p>No absorption, duplicate or antipodal pair found.</p>{caption}"
    findings = "".join(f"<li><b>{name}</b>: {escape(text)}</li>" for name, text in MAP_FINDINGS.items())
    return (
        f'{head}<p class="muted">{escape(MAP_INTRO)}</p><ul class="muted">{findings}</ul>{caption}'
        + (f'<p class="muted">{escape(ROWS_TEXT)}</p>' if layer.absorption else "")
        + f"{_absorption_trees(layer, texts)}{_duplicate_table(layer)}{_antipodal_table(layer)}"
    )


def _map_caption(m: dict[str, Any]) -> str:
    return (
        f'<p><b>Absorption score {fmt(m.get("absorption_score"))} ± {fmt(m.get("absorption_score_se"))}</b> '
        f'over {fmt(m.get("scored_latents"))} leaning latents: {escape(SCORE_TEXT)}</p>'
        f'<p class="muted caption">Thresholds: absorption ρ &ge; {fmt(m.get("rho_min"))} (spread of unrelated '
        f'atom pairs {fmt(m.get("rho_spread"))}), evidence &ge; {fmt(m.get("min_evidence"))} and the '
        f'parent\'s own size steady (sd / mean of its direction on its own tokens &le; '
        f'{fmt(m.get("max_parent_cv"))}); duplicates '
        f'ρ &ge; {fmt(m.get("duplicate_rho"))}; antipodal ρ &le; −{fmt(m.get("antipodal_rho"))}; '
        f'{fmt(m.get("measured_pairs"))} candidate pairs measured ({fmt(m.get("neighbours"))} nearest atoms '
        "per latent).</p>"
    )


def _latent_contexts(f: FeatureRow, role: str, texts: dict[int, str]) -> str:
    """The latent's top contexts, folded: a tree stays a few lines until a reader opens them."""
    label = escape(f.label)
    if not f.top_tokens:
        return f'<span class="muted">no contexts kept for {role} {label}</span>'
    return (f'<details class="contexts"><summary>top contexts of {role} {label} ({len(f.top_tokens):,})</summary>'
            f"{_context_lines(f, texts)}</details>")


def _absorption_trees(layer: LayerResult, texts: dict[int, str]) -> str:
    trees = list(layer.absorption_trees().items())
    if not trees:
        return "<h4>Absorption trees</h4><p>None found.</p>"
    forest = "".join(_absorption_tree(layer, parent, rows, texts) for parent, rows in trees[:MAX_TREES])
    return (
        f"<h4>Absorption trees: {len(trees):,} parent(s), {len(layer.absorption):,} absorbed child(ren)</h4>"
        f"{forest}{_more(len(trees) - MAX_TREES, 'absorption trees')}"
    )


def _absorption_tree(layer: LayerResult, parent: int, rows: list[AbsorptionRow], texts: dict[int, str]) -> str:
    header = _header(
        ("child", "text"), ("decoder: parent part ρ | own part √(1 − ρ²)", "text"), "parent off on its tokens",
        "evidence ± SE (n)", "reverse evidence", "L1 price", "child active", "both active",
    )
    children = "".join(_absorption_row(layer, r, texts) for r in rows)
    latent = layer.feature(parent)  # the parent's row
    tree = _quick_list_link(layer, f"absorption tree of {latent.label}", [latent.id, *(r.child for r in rows)],
                            "tree on Neuronpedia")
    return (
        f'<div class="tree" data-parent="{parent}"><div class="tree-parent">parent latent '
        f"<b>{_feature_link(layer, latent.id, latent.sign)}</b>: active on {rows[0].count_parent:,} audit tokens, "
        f"absorbed into {len(rows):,} child(ren), total L1 price {fmt(_total_price(rows))} {tree}"
        f"{_latent_contexts(latent, 'parent', texts)}</div>"
        f'<table class="children"><thead>{header}</thead><tbody>{children}</tbody></table></div>'
    )


def _total_price(rows: list[AbsorptionRow]) -> float | None:
    prices = [r.l1_price for r in rows]
    return None if None in prices else sum(prices)


def _absorption_row(layer: LayerResult, r: AbsorptionRow, texts: dict[int, str]) -> str:
    evidence = f"{fmt(r.evidence)} ± {fmt(r.evidence_se)} (n {r.n_evidence:,})"
    p_text = f"one-sided p-value of evidence >= min_evidence failing (before correction): {fmt(r.evidence_p)}"
    return (
        f'<tr data-child="{r.child}"><td class="text">{_feature_link(layer, r.child, r.child_sign)}</td>'
        f'<td class="text split">{split_bar(r.rho, r.own_part)} ρ {fmt(r.rho)} | own {fmt(r.own_part)}</td>'
        f'<td>{percent(r.fraction)}</td><td><abbr title="{escape(p_text)}">{evidence}</abbr></td>'
        f"<td>{fmt(r.reverse_evidence)}</td><td>{fmt(r.l1_price)}</td><td>{r.count_child:,}</td>"
        f"<td>{r.co_count:,}</td></tr>"
        # the child's contexts span the table: a snippet needs the width
        f'<tr class="contexts-row"><td class="text" colspan="8">'
        f"{_latent_contexts(layer.feature(r.child, r.child_sign), 'child', texts)}</td></tr>"
    )


def _duplicate_table(layer: LayerResult) -> str:
    if not layer.duplicates:
        return "<h4>Duplicates to merge</h4><p>None found.</p>"
    header = _header("i", "j", "ρ", "i active", "j active", "both", "jaccard", *_np_column(layer))
    rows = "".join(_duplicate_row(layer, d) for d in layer.duplicates[:MAX_MAP_ROWS])
    groups = layer.duplicate_groups()
    sizes = ", ".join(str(len(g)) for g in groups[:20]) + (", ..." if len(groups) > 20 else "")
    return (
        f"<h4>Duplicates to merge: {len(layer.duplicates):,}</h4>"
        f"<p>{len(groups):,} group(s) of {sum(map(len, groups)):,} latents, each group one direction coded "
        f"several times (sizes {sizes}).</p>"
        f'<table class="sortable duplicates"><thead>{header}</thead><tbody>{rows}</tbody></table>'
        f"{_more(len(layer.duplicates) - MAX_MAP_ROWS, 'duplicates')}"
    )


def _duplicate_row(layer: LayerResult, d: DuplicateRow) -> str:
    i, j = _labels(d)
    return (
        f"{_latent_cells(layer, d)}{_num(d.rho)}{_num(d.count_i)}{_num(d.count_j)}{_num(d.co_count)}{_num(d.jaccard)}"
        f"{_np_cell(layer, f'duplicates {i} = {j}', [d.i, d.j])}</tr>"
    )


def _latent_cells(layer: LayerResult, r: DuplicateRow | AntipodalRow) -> str:
    """A map pair's row opened with its two latents' cells (sorted by id)."""
    return (f'<tr><td data-v="{r.i}">{_feature_link(layer, r.i, r.sign_i)}</td>'
            f'<td data-v="{r.j}">{_feature_link(layer, r.j, r.sign_j)}</td>')


def _antipodal_table(layer: LayerResult) -> str:
    if not layer.antipodal:
        return "<h4>Antipodal dense pairs</h4><p>None found.</p>"
    header = _header("i", "j", "ρ", "share of tokens covered", "i active", "j active", "both", *_np_column(layer))
    rows = "".join(_antipodal_row(layer, a) for a in layer.antipodal[:MAX_MAP_ROWS])
    return (
        f"<h4>Antipodal dense pairs: {len(layer.antipodal):,}</h4>"
        f'<table class="sortable antipodal"><thead>{header}</thead><tbody>{rows}</tbody></table>'
        f"{_more(len(layer.antipodal) - MAX_MAP_ROWS, 'antipodal pairs')}"
    )


def _antipodal_row(layer: LayerResult, a: AntipodalRow) -> str:
    i, j = _labels(a)
    return (
        f"{_latent_cells(layer, a)}{_num(a.rho)}{_num(a.share)}{_num(a.count_i)}{_num(a.count_j)}{_num(a.co_count)}"
        f"{_np_cell(layer, f'antipodal {i} / {j}', [a.i, a.j])}</tr>"
    )


REPAIR_INTRO = (
    "The audit's certified changes written into the SAE (THEORY.md section 7). The tokens fall in three "
    "parts: the audit tokens, where every certificate was chosen; the validation tokens (the audit's "
    "held-out part), where every step of the repair was measured against the SAE it was built from and kept "
    "only when it lowered L significantly (Bonferroni over the layer's steps); and the test tokens, which "
    "neither the audit nor the repair read, where the table below compares the SAE before and after, with "
    "the SAEs' own encode and decode."
)


def _repair_section(repair: dict[str, Any], layers: dict[str, LayerResult]) -> str:
    table, changes = repair.get("table") or {}, repair.get("changes") or {}
    hooks = list(table) + [hook for hook in changes if hook not in table]
    steps = [step for hook in hooks for step in changes.get(hook, [])]
    rounds = max([int(step.get("round") or 1) for step in steps], default=1) > 1
    blocks = "".join(_repair_layer(hook, table.get(hook), changes.get(hook, []), layers.get(hook), rounds)
                     for hook in hooks)
    meta = repair.get("meta") or {}
    facts = f"<details><summary>Repair run</summary>{_facts(_flatten(meta))}</details>" if meta else ""
    return (
        f'<section id="repair"><h2>Repair</h2><p class="muted">{escape(REPAIR_INTRO)}</p>{facts}'
        f"{blocks or '<p>No layer was repaired.</p>'}</section>"
    )


def _repair_layer(hook: str, row: dict[str, Any] | None, steps: list[dict[str, Any]], layer: LayerResult | None,
                  rounds: bool) -> str:
    parts = [f'<div class="repair-layer" data-hook="{escape(hook)}"><h3>{escape(hook)}</h3>']
    if row is None:
        parts.append("<p>Not measured on the test tokens.</p>")
    else:
        lam = f" (lam {fmt(row['lam'], 4)})" if row.get("lam") is not None else ""
        n = row.get("n_tokens")
        parts.append(
            f"<p>On {f'{n:,}' if isinstance(n, int) else 'n/a'} test tokens; objective "
            f"{escape(str(row.get('objective') or 'n/a'))}{lam}; values per token, ± their SE; the change of L "
            "is paired (the same tokens on both sides).</p>"
        )
        cells = "".join(
            f'<tr><td class="text"><b>{escape(label)}</b></td><td>{escape(before)}</td><td>{escape(after)}</td>'
            f"<td>{escape(change)}</td></tr>"
            for label, before, after, change in repair_cells(row)
        )
        header = "".join(f"<th>{name}</th>" for name in ("before", "after", "change"))
        parts.append(f'<table class="repair-table"><thead><tr><th class="text">test tokens</th>{header}</tr>'
                     f"</thead><tbody>{cells}</tbody></table>")
    parts.append(_repair_steps(steps, layer, rounds))
    parts.append("</div>")
    return "".join(parts)


def _repair_steps(steps: list[dict[str, Any]], layer: LayerResult | None, rounds: bool) -> str:
    head = "<h4>Steps (gain per token on the validation tokens)</h4>"
    if not steps:
        return f"{head}<p>None: the audit certified nothing the repair could write.</p>"
    columns = (["round"] if rounds else []) + ["step", "condition", "applied", "gain", "± SE", "p", "tokens",
                                                 "items", "reason"]
    header = "".join(
        f'<th class="{"num" if name in ("round", "gain", "± SE", "p", "tokens") else "text"}">{name}</th>'
        for name in columns
    )
    rows = []
    for step in steps:
        applied = bool(step.get("applied"))
        badge = f'<span class="badge {"applied" if applied else "not-applied"}">{"yes" if applied else "no"}</span>'
        name = str(step.get("step"))
        reason = str(step.get("reason") or "")
        if step.get("merge_only_gain") is not None:
            merged = f"merges alone: gain {fmt(step['merge_only_gain'])} ± {fmt(step.get('merge_only_se'))}"
            reason = f"{reason}; {merged}" if reason else merged
        rows.append(
            "<tr>" + (_num(step.get("round")) if rounds else "")
            + f'<td class="text"><abbr title="{escape(REPAIR_STEPS.get(name, name))}">{escape(name)}</abbr></td>'
            f'<td class="text">{escape(str(step.get("condition") or ""))}</td><td class="text">{badge}</td>'
            f'{_num(step.get("gain"))}{_num(step.get("se"))}{_num(step.get("p_value"))}{_num(step.get("n_tokens"))}'
            f'<td class="text">{escape(items_text(step))}</td><td class="text">{escape(reason)}</td></tr>'
        )
        items = step.get("items") or []
        if items:
            rows.append(f'<tr class="items-row"><td class="text" colspan="{len(columns)}">'
                        f"{_step_items(items, layer)}</td></tr>")
    return f'{head}<table class="repair-steps"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


LATENT_KEYS = ("feature", "keep", "drop")  # item fields that name a latent


def _step_items(items: list[dict[str, Any]], layer: LayerResult | None) -> str:
    """The first MAX_STEP_ITEMS items of a step in a folded table, one column per field."""
    shown = items[:MAX_STEP_ITEMS]
    keys: list[str] = []
    for item in shown:
        keys += [key for key in item if key not in keys]
    header = "".join(f'<th class="{"text" if key in LATENT_KEYS else "num"}">{escape(key)}</th>' for key in keys)
    rows = "".join(
        "<tr>" + "".join(_item_cell(key, item.get(key), layer, item.get("sign")) for key in keys) + "</tr>"
        for item in shown
    )
    what = f"first {len(shown):,} of {len(items):,} items" if len(items) > len(shown) else f"{len(items):,} item(s)"
    return (f'<details class="items"><summary>{what}</summary><table class="items"><thead><tr>{header}</tr>'
            f"</thead><tbody>{rows}</tbody></table>{_more(len(items) - len(shown), 'items')}</details>")


def _item_cell(key: str, value: Any, layer: LayerResult | None, sign: str | None = None) -> str:
    """`sign`: the item's (a signed SAE's step on one sign of its "feature")."""
    if key in LATENT_KEYS and isinstance(value, int) and not isinstance(value, bool):
        sign = sign if key == "feature" else None
        shown = _feature_link(layer, value, sign) if layer is not None else escape(latent_label(value, sign))
        return f'<td class="text">{shown}</td>'
    if isinstance(value, bool):
        return f'<td class="text">{"yes" if value else "no"}</td>'
    if value is None or isinstance(value, (int, float)):
        return _num(value)
    return f'<td class="text">{escape(value if isinstance(value, str) else json.dumps(value))}</td>'


def _footer() -> str:
    return (
        '<footer class="muted"><p>Generated by opt_hooks. The conditions and certificates are those '
        "of THEORY.md (first-order optimality of the L1 dictionary-learning objective). Sizes are "
        "dimensionless; a gain is minus the exact change of the mean objective per held-out token when a "
        "certificate is applied; share is that gain over the feature's value (or the layer's L).</p></footer>"
    )
