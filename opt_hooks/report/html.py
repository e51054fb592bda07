"""report.html: one self-contained page for an AuditRecord (inline CSS, JS and SVG; no network).

Page layout: overview (what the tiers mean, tier and certified-condition counts per layer, run
facts), then one section per layer: the held-out objective and the layer gaps first (every gain
needs a scale), facts and scope, size distributions of C3 and C4, layer-wide conditions (C5,
C6), a sortable table of features with a descent ranked by held-out gain (THEORY.md 3.5), the
flagged pairs (table and the paper's scatter figure), the label-free absorption map (THEORY.md
section 6: absorption trees, duplicates, antipodal pairs) and the top-activating contexts of the
top-ranked features. A record that carries a repair (`AuditRecord.repair`, THEORY.md section 7)
gets a Repair section after the overview: per layer, the objective before / after on the test
tokens and the repair's steps, applied or not, with their first items. Long lists are cut to the
top-ranked entries; report.json has everything.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from opt_hooks.report import neuronpedia
from opt_hooks.report.svg import condition_grid, fmt, histogram, pair_scatter, split_bar, tier_bars
from opt_hooks.records import (
    CONDITIONS, TIER_RANK, AbsorptionRow, AntipodalRow, AuditRecord, CertificateCheck, DuplicateRow, FeatureRow,
    LayerResult, PairRow,
)
from opt_hooks.report.terminal import (
    REPAIR_STEPS, gap_text, items_text, map_unavailable, objective_text, percent, repair_cells,
)

HERE = Path(__file__).resolve().parent
MAX_FEATURE_ROWS = 500  # per layer, top-ranked first
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
    sections = [_layer_section(k, layer, result.token_texts) for k, layer in enumerate(layers)]
    style = (HERE / "report.css").read_text(encoding="utf-8")
    script = (HERE / "report.js").read_text(encoding="utf-8")
    title = f"opt_hooks audit: {_model_name(result)}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title><style>{style}</style></head>",
            '<body data-report-status="loading">',
            '<pre id="js-errors"></pre>',
            f"<h1>{escape(title)}</h1>",
            _nav(layers, result.repair is not None),
            _overview(result, layers),
            "" if result.repair is None else _repair_section(result.repair, result.layers),
            *sections,
            _footer(),
            f"<script>{script}</script>",
            "</body></html>",
        ]
    )


def _model_name(result: AuditRecord) -> str:
    return str(result.meta.get("model") or "SAE optimality report")


def _nav(layers: list[LayerResult], repair: bool = False) -> str:
    links = ['<a href="#overview">overview</a>']
    if repair:
        links.append('<a href="#repair">repair</a>')
    links += [f'<a href="#layer-{k}">{escape(layer.hook_name)}</a>' for k, layer in enumerate(layers)]
    return f"<nav>{' '.join(links)}</nav>"


def _overview(result: AuditRecord, layers: list[LayerResult]) -> str:
    names = [layer.hook_name for layer in layers]
    tiers = tier_bars(list(zip(names, (layer.tier_counts() for layer in layers))))
    grid = condition_grid(list(zip(names, (layer.condition_counts() for layer in layers))), list(CONDITIONS))
    tier_items = "".join(
        f'<li><span class="badge {t}">{t}</span> {escape(text)}</li>' for t, text in TIER_TEXT.items()
    )
    condition_items = "".join(f"<li><b>{c}</b> {escape(text)}</li>" for c, text in CONDITIONS.items())
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


def _context(text: str) -> str:
    """A token's context snippet with the token itself highlighted.

    The API marks the token as "left[[token]]right"; the left part is longer (more tokens)
    and more likely to contain a literal "[[" (code), so the last "[[" is taken as the marker.
    """
    left, marker, rest = text.rpartition("[[")
    token, closing, right = rest.partition("]]")
    if not (marker and closing):
        return escape(text)
    return f"{escape(left)}<mark>{escape(token)}</mark>{escape(right)}"


def _facts(rows: list[tuple[str, str]]) -> str:
    """A definition list of (label, value as HTML) rows."""
    items = "".join(f"<dt>{escape(label)}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<dl class="facts">{items}</dl>'


def _layer_section(k: int, layer: LayerResult, texts: dict[int, str]) -> str:
    dead = set(layer.dead_features)
    live = [f for f in layer.features if f.id not in dead]
    histograms = histogram([f.c3_size for f in live], "C3 size (decoder stationarity)", lo=0.0, hi=1.0)
    histograms += histogram([f.c4_size for f in live if f.c4_size is not None], "C4 size (code optimality)")
    parts = [
        f'<section class="layer" id="layer-{k}"><h2>{escape(layer.hook_name)}</h2>',
        f'<p class="scope">Scope: {escape(layer.scope)}</p>',
        "" if layer.scope.startswith("L1 objective") else f'<p class="note">{escape(SURROGATE_NOTE)}</p>',
        _facts(_layer_summary(layer)),
        _facts(_layer_facts(layer)),
        *[f'<p class="note">{escape(note)}</p>' for note in layer.notes],
        f'<div class="plots"><div class="card">{histograms}</div></div>',
        _layer_conditions(layer, texts),
        _feature_table(layer),
        _pair_section(layer),
        _absorption_section(layer, texts),
        _contexts(layer, texts),
        "</section>",
    ]
    return "\n".join(parts)


def _layer_summary(layer: LayerResult) -> list[tuple[str, str]]:
    """The held-out objective and the layer gaps: the scale of every gain below."""
    rows = [("held-out objective", escape(objective_text(layer)))]
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


def _feature_link(layer: LayerResult, feature: int) -> str:
    """The feature's id, linked to its Neuronpedia dashboard when the layer has one (new tab:
    the report stays open)."""
    if not layer.neuronpedia_id:
        return str(feature)
    return f'<a href="{escape(neuronpedia.feature_url(layer.neuronpedia_id, feature))}"{NEW_TAB}>{feature}</a>'


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


def _feature_table(layer: LayerResult) -> str:
    flagged = layer.flagged()
    shown = [layer.feature(i) for i in flagged[:MAX_FEATURE_ROWS]]
    header = _header(
        "feature", ("tier", "badge"), ("conditions", "text"), "held-out gain", "± SE", "p", "value v_i",
        "share", "active tokens", "mean z (μ)", "C3 size", "C4 size", ("why not certified", "text"),
    )
    rows = "".join(_feature_row(layer, f) for f in shown)
    more = _more(len(flagged) - len(shown), "features with a descent")
    return (
        f"<h3>Features with a descent ({len(flagged):,} of {layer.d_sae:,}), by held-out gain</h3>"
        f'<table class="sortable features"><thead>{header}</thead><tbody>{rows}</tbody></table>{more}'
    )


def _feature_row(layer: LayerResult, f: FeatureRow) -> str:
    certificates = "\n".join(_certificate_text(c) for c in f.certificates.values())
    best = f.certificates.get(f.conditions[0]) if f.conditions else None
    return (
        f'<tr><td data-v="{f.id}">{_feature_link(layer, f.id)}</td>{_badge(f.tier)}'
        f'<td class="text">{escape(" ".join(f.conditions))}</td>{_num(f.gain, certificates)}{_num(f.gain_se)}'
        f"{_num(f.p_value)}{_num(f.value)}{_num(f.share)}{_num(f.active_count)}{_num(f.mean_code)}"
        f"{_num(f.c3_size)}{_num(f.c4_size)}<td class=\"text\">{escape(best.reason if best else '')}</td></tr>"
    )


def _pair_section(layer: LayerResult) -> str:
    if not layer.pairs:
        return "<h3>Flagged pairs (C2)</h3><p>No pair breaks C2.</p>"
    pairs = layer.ranked_pairs()
    header = _header(
        "i", "j", ("kind", "text"), "ρ", "bound (M or m)", "(1 − ρ) μ_j", "margin / μ_j", "i active", "j active",
        "both", "P(j without i) &le;", "co-activation p &le;", ("tier", "badge"), "held-out gain", "± SE",
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
        f'<tr><td data-v="{p.i}">{_feature_link(layer, p.i)}</td><td data-v="{p.j}">{_feature_link(layer, p.j)}</td>'
        f'<td class="text">{p.kind}</td>{_num(p.rho)}{_num(p.bound)}{_num(p.threshold)}{_num(p.relative_margin)}'
        f"{_num(p.count_i)}{_num(p.count_j)}{_num(p.co_count)}{_num(p.p_j_without_i_upper)}"
        f"{_num(check.count_p_value if check else None)}{_badge(p.tier)}"
        f"{_num(p.gain, _certificate_text(check))}{_num(check.held_out_se if check else None)}</tr>"
    )


def _pair_figure(p: PairRow) -> str:
    hull = (p.hull_min, p.hull_max)
    plot = pair_scatter(p.sample_i, p.sample_j, p.threshold, hull, p.rho, (str(p.i), str(p.j)), p.kind)
    if p.kind == "hierarchy":
        finding = f"max z_j where i is off = {fmt(p.bound)} &lt; (1 − ρ) μ_j = {fmt(p.threshold)}"
    else:
        finding = f"min z_j where i is off = {fmt(p.bound)} &gt; (1 − ρ) μ_j = {fmt(p.threshold)}"
    evidence = (
        f"j = {p.j} active on {p.count_j:,} tokens, i = {p.i} on {p.co_count:,} of them; "
        f"P(j fires without i) &le; {fmt(p.p_j_without_i_upper)} (95%)"
    )
    return (
        f"<figure>{plot}<figcaption><span class=\"badge {p.tier}\">{p.tier}</span> {finding}. {evidence}. "
        f"{escape(_certificate_text(p.certificate))}</figcaption></figure>"
    )


def _context_lines(f: FeatureRow, texts: dict[int, str]) -> str:
    """The feature's top-activating contexts, strongest first, each with its code."""
    return "".join(
        f'<div class="context"><b>{fmt(value)}</b>  {_context(texts.get(token, f"token #{token}"))}</div>'
        for token, value in zip(f.top_tokens, f.top_values)
    )


def _contexts(layer: LayerResult, texts: dict[int, str]) -> str:
    blocks = []
    for feature_id in layer.flagged()[:MAX_CONTEXT_FEATURES]:
        f = layer.feature(feature_id)
        if not f.top_tokens:
            continue
        blocks.append(
            f"<h4>feature {_feature_link(layer, f.id)} <span class=\"badge {f.tier}\">{f.tier}</span> "
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
        f"{_absorption_trees(layer, texts)}{_duplicate_table(layer)}{_antipodal_table(layer)}"
    )


def _map_caption(m: dict[str, Any]) -> str:
    return (
        f'<p class="muted caption">Thresholds: absorption ρ &ge; {fmt(m.get("rho_min"))} (spread of unrelated '
        f'atom pairs {fmt(m.get("rho_spread"))}) and evidence &ge; {fmt(m.get("min_evidence"))}; duplicates '
        f'ρ &ge; {fmt(m.get("duplicate_rho"))}; antipodal ρ &le; −{fmt(m.get("antipodal_rho"))}; '
        f'{fmt(m.get("measured_pairs"))} candidate pairs measured ({fmt(m.get("neighbours"))} nearest atoms '
        "per latent).</p>"
    )


def _latent_contexts(f: FeatureRow, role: str, texts: dict[int, str]) -> str:
    """The latent's top contexts, folded: a tree stays a few lines until a reader opens them."""
    if not f.top_tokens:
        return f'<span class="muted">no contexts kept for {role} {f.id}</span>'
    return (f'<details class="contexts"><summary>top contexts of {role} {f.id} ({len(f.top_tokens):,})</summary>'
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
    return (
        f'<div class="tree" data-parent="{parent}"><div class="tree-parent">parent latent '
        f"<b>{_feature_link(layer, parent)}</b>: active on {rows[0].count_parent:,} audit tokens, absorbed into "
        f"{len(rows):,} child(ren), total L1 price {fmt(_total_price(rows))} "
        f"{_latent_contexts(layer.feature(parent), 'parent', texts)}</div>"
        f'<table class="children"><thead>{header}</thead><tbody>{children}</tbody></table></div>'
    )


def _total_price(rows: list[AbsorptionRow]) -> float | None:
    prices = [r.l1_price for r in rows]
    return None if None in prices else sum(prices)


def _absorption_row(layer: LayerResult, r: AbsorptionRow, texts: dict[int, str]) -> str:
    evidence = f"{fmt(r.evidence)} ± {fmt(r.evidence_se)} (n {r.n_evidence:,})"
    p_text = f"one-sided p-value of evidence >= min_evidence failing (before correction): {fmt(r.evidence_p)}"
    return (
        f'<tr data-child="{r.child}"><td class="text">{_feature_link(layer, r.child)}</td>'
        f'<td class="text split">{split_bar(r.rho, r.own_part)} ρ {fmt(r.rho)} | own {fmt(r.own_part)}</td>'
        f'<td>{percent(r.fraction)}</td><td><abbr title="{escape(p_text)}">{evidence}</abbr></td>'
        f"<td>{fmt(r.reverse_evidence)}</td><td>{fmt(r.l1_price)}</td><td>{r.count_child:,}</td>"
        f"<td>{r.co_count:,}</td></tr>"
        # the child's contexts span the table: a snippet needs the width
        f'<tr class="contexts-row"><td class="text" colspan="8">'
        f"{_latent_contexts(layer.feature(r.child), 'child', texts)}</td></tr>"
    )


def _duplicate_table(layer: LayerResult) -> str:
    if not layer.duplicates:
        return "<h4>Duplicates to merge</h4><p>None found.</p>"
    header = _header("i", "j", "ρ", "i active", "j active", "both", "jaccard")
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
    return (
        f'<tr><td data-v="{d.i}">{_feature_link(layer, d.i)}</td><td data-v="{d.j}">{_feature_link(layer, d.j)}</td>'
        f"{_num(d.rho)}{_num(d.count_i)}{_num(d.count_j)}{_num(d.co_count)}{_num(d.jaccard)}</tr>"
    )


def _antipodal_table(layer: LayerResult) -> str:
    if not layer.antipodal:
        return "<h4>Antipodal dense pairs</h4><p>None found.</p>"
    header = _header("i", "j", "ρ", "share of tokens covered", "i active", "j active", "both")
    rows = "".join(_antipodal_row(layer, a) for a in layer.antipodal[:MAX_MAP_ROWS])
    return (
        f"<h4>Antipodal dense pairs: {len(layer.antipodal):,}</h4>"
        f'<table class="sortable antipodal"><thead>{header}</thead><tbody>{rows}</tbody></table>'
        f"{_more(len(layer.antipodal) - MAX_MAP_ROWS, 'antipodal pairs')}"
    )


def _antipodal_row(layer: LayerResult, a: AntipodalRow) -> str:
    return (
        f'<tr><td data-v="{a.i}">{_feature_link(layer, a.i)}</td><td data-v="{a.j}">{_feature_link(layer, a.j)}</td>'
        f"{_num(a.rho)}{_num(a.share)}{_num(a.count_i)}{_num(a.count_j)}{_num(a.co_count)}</tr>"
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
        "<tr>" + "".join(_item_cell(key, item.get(key), layer) for key in keys) + "</tr>" for item in shown
    )
    what = f"first {len(shown):,} of {len(items):,} items" if len(items) > len(shown) else f"{len(items):,} item(s)"
    return (f'<details class="items"><summary>{what}</summary><table class="items"><thead><tr>{header}</tr>'
            f"</thead><tbody>{rows}</tbody></table>{_more(len(items) - len(shown), 'items')}</details>")


def _item_cell(key: str, value: Any, layer: LayerResult | None) -> str:
    if key in LATENT_KEYS and isinstance(value, int) and not isinstance(value, bool):
        shown = _feature_link(layer, value) if layer is not None else str(value)
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
