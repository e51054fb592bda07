"""Inline SVG plots for report.html: plain strings, no plotting library, no external assets.

Every function returns one `<svg>` element sized in CSS pixels; colours come from the CSS
classes in report.css (tier-certified, tier-violated, ...) so the page has one palette. Hover
texts are `<title>`s; the histograms and the pair scatter also carry their plot frame and data
ranges (data-frame, data-lo, data-x-max, ...; points their data coordinates) so that report.js
can zoom them in the browser without a plotting library.
"""
from __future__ import annotations

import math
from html import escape

TIER_CLASSES = {"certified": "tier-certified", "violated": "tier-violated", "satisfied": "tier-satisfied"}


def fmt(value: float | int | None, digits: int = 3) -> str:
    """Short human form: integers with separators, floats with `digits` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        short = f"{value:.{digits}g}"
        # more integer digits than significant ones ('g' writes 100 as 1e+02): the integer instead
        return f"{value:.0f}" if "e" in short else short
    return f"{value:.{digits - 1}e}"


def _svg(width: int, height: int, body: list[str], label: str, attrs: str = "") -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}"{attrs}>'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def _frame(left: float, top: float, width: float, height: float) -> str:
    """The plot area, for report.js's zoom: ' data-frame="left top width height"'."""
    return f' data-frame="{left} {top} {width} {height}"'


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{cls_attr}>{escape(text)}</text>'


def tier_bars(rows: list[tuple[str, dict[str, int]]]) -> str:
    """One horizontal bar per layer, split into its tier counts (bar length = share of features)."""
    label_w, bar_w, row_h, top = 230, 420, 24, 26
    height = top + row_h * len(rows) + 8
    body = []
    x = label_w
    for tier, cls in TIER_CLASSES.items():  # legend
        body.append(f'<rect x="{x}" y="4" width="12" height="12" class="{cls}"/>')
        body.append(_text(x + 16, 14, tier, "legend"))
        x += 110
    for k, (name, counts) in enumerate(rows):
        y = top + k * row_h
        total = sum(counts.values()) or 1
        body.append(_text(label_w - 8, y + 15, name, "axis", "end"))
        x = float(label_w)
        for tier, cls in TIER_CLASSES.items():
            w = bar_w * counts.get(tier, 0) / total
            if w > 0:
                tip = f"{name}: {counts[tier]:,} {tier}"
                body.append(
                    f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" class="{cls}">'
                    f"<title>{escape(tip)}</title></rect>"
                )
            x += w
        certified = counts.get("certified", 0)
        body.append(_text(label_w + bar_w + 6, y + 15, f"{certified:,} certified / {total:,}", "axis"))
    return _svg(label_w + bar_w + 130, height, body, "features per tier, per layer")


def condition_grid(rows: list[tuple[str, dict[str, int]]], conditions: list[str]) -> str:
    """Heat map: layers x conditions, each cell a count of features (pairs for C2) from
    `LayerResult.condition_counts` (the report draws the certified ones)."""
    label_w, cell_w, cell_h, top = 230, 70, 24, 22
    height = top + cell_h * len(rows) + 6
    peak = {c: max([counts.get(c, 0) for _, counts in rows] + [1]) for c in conditions}
    body = [_text(label_w + cell_w * (k + 0.5), 15, c, "axis", "middle") for k, c in enumerate(conditions)]
    for r, (name, counts) in enumerate(rows):
        y = top + r * cell_h
        body.append(_text(label_w - 8, y + 16, name, "axis", "end"))
        for k, c in enumerate(conditions):
            n = counts.get(c, 0)
            opacity = 0.12 + 0.88 * n / peak[c] if n else 0.0
            x = label_w + k * cell_w
            body.append(
                f'<rect x="{x + 1}" y="{y + 1}" width="{cell_w - 2}" height="{cell_h - 2}" '
                f'class="heat" fill-opacity="{opacity:.2f}"><title>{escape(f"{name} {c}: {n:,}")}</title></rect>'
            )
            body.append(_text(x + cell_w / 2, y + 16, f"{n:,}", "cell on-dark" if opacity > 0.55 else "cell", "middle"))
    return _svg(label_w + cell_w * len(conditions) + 10, height, body, "certified counts per condition and layer")


def histogram(values: list[float], title: str, bins: int = 24, lo: float = 0.0, hi: float | None = None,
              attrs: str = "") -> str:
    """Counts of `values` in equal bins on [lo, hi] (hi: the largest value); count axis is sqrt.
    `attrs` are extra attributes of the <svg> (report.js: where to find the values to re-bin)."""
    width, height, left, bottom, top = 300, 150, 40, 30, 20
    finite = [v for v in values if v is not None and math.isfinite(v)]
    hi = max(finite + [lo]) if hi is None else hi
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, max(0, int((v - lo) / span * bins)))] += 1
    # sqrt keeps the long tail (the features that matter) visible next to the bulk near zero
    peak = math.sqrt(max(counts + [1]))
    plot_w, plot_h = width - left - 10, height - top - bottom
    body = [_text(left, 13, title, "plot-title")]
    for k, n in enumerate(counts):
        h = plot_h * math.sqrt(n) / peak
        x = left + plot_w * k / bins
        edges = (lo + span * k / bins, lo + span * (k + 1) / bins)
        tip = f"[{fmt(edges[0])}, {fmt(edges[1])}): {n:,}"
        body.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{plot_w / bins - 1:.1f}" height="{h:.1f}" '
            f'class="bar"><title>{escape(tip)}</title></rect>'
        )
    base = top + plot_h
    body.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" class="axis-line"/>')
    body.append(_text(left, base + 14, fmt(lo), "axis x-lo", "middle"))
    body.append(_text(left + plot_w, base + 14, fmt(hi), "axis x-hi", "end"))
    body.append(_text(left - 4, top + 8, f"{max(counts):,}", "axis y-hi", "end"))
    note = f"{len(finite):,} features (count axis: square root)"
    body.append(_text(left + plot_w / 2, height - 3, note, "axis", "middle"))
    frame = f'{_frame(left, top, plot_w, plot_h)} data-lo="{lo!r}" data-hi="{hi!r}"'
    return _svg(width, height, body, title, f' class="histogram"{frame}{attrs}')


def pair_scatter(
    xs: list[float],
    ys: list[float],
    threshold: float,
    hull: tuple[float, float],
    rho: float,
    labels: tuple[str, str],
    kind: str,
) -> str:
    """The paper's pair figure: responses of i (x) against j (y), tokens with i off on the y axis.

    The thick bar on x = 0 is the hull [min, max] of z_j over A_i (tokens where i is off); C2
    holds when the dashed threshold (1 - rho) mu_j crosses it, and fails when it passes above
    (hierarchy) or below (complementary pair).
    """
    width, height, left, bottom, top, right = 300, 230, 46, 34, 26, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    x_hi = max(xs + [1e-12]) * 1.05
    y_hi = max(ys + [threshold, hull[1], 1e-12]) * 1.08

    def px(v: float) -> float:
        return left + plot_w * v / x_hi

    def py(v: float) -> float:
        return top + plot_h * (1 - v / y_hi)

    body = [_text(left, 14, f"{kind}: ρ = {fmt(rho)}", "plot-title")]
    body.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for x, y in zip(xs, ys):
        cls = "pt-off" if x == 0 else "pt"  # exact zero: i is off on this token (a point of A_i)
        body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" class="{cls}" data-x="{x:.4g}" data-y="{y:.4g}"/>')
    lo, hi = hull
    body.append(
        f'<line x1="{left}" y1="{py(lo):.1f}" x2="{left}" y2="{py(hi):.1f}" class="hull" data-lo="{lo!r}" '
        f'data-hi="{hi!r}"><title>{escape(f"hull of z_j on A_i: [{fmt(lo)}, {fmt(hi)}]")}</title></line>'
    )
    body.append(
        f'<line x1="{left}" y1="{py(threshold):.1f}" x2="{left + plot_w}" y2="{py(threshold):.1f}" class="threshold" '
        f'data-y="{threshold!r}"><title>{escape(f"(1 − ρ) μ_j = {fmt(threshold)}")}</title></line>'
    )
    body.append(_text(left + plot_w - 2, py(threshold) - 4, f"(1 − ρ) μ_j = {fmt(threshold)}", "annot full-only", "end"))
    label_y = py(hi) + (12 if kind == "complementary" else -4)  # beside the bar's end, away from the line
    body.append(_text(left + 6, label_y, f"[{fmt(lo)}, {fmt(hi)}]", "annot hull-label full-only"))
    base = top + plot_h
    body.append(_text(left, base + 13, "0", "axis x-lo", "middle"))
    body.append(_text(left + plot_w, base + 13, fmt(x_hi), "axis x-hi", "end"))
    body.append(_text(left - 4, top + 8, fmt(y_hi), "axis y-hi", "end"))
    body.append(_text(left - 4, base, "", "axis y-lo", "end"))  # written by report.js when zoomed
    body.append(_text(left + plot_w / 2, height - 4, f"z_i  (feature {labels[0]})", "axis", "middle"))
    body.append(
        f'<text transform="translate(12 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" class="axis">'
        f"z_j  (feature {escape(labels[1])})</text>"
    )
    ranges = f'{_frame(left, top, plot_w, plot_h)} data-x-max="{x_hi!r}" data-y-max="{y_hi!r}"'
    return _svg(width, height, body, f"pair {labels[0]} -> {labels[1]}: {kind}", f' class="scatter"{ranges}')


def split_bar(rho: float, own_part: float, width: int = 120, height: int = 12) -> str:
    """A child's decoder row split as d_child = rho d_parent + own_part d_own: one bar, its two
    parts as long as their shares of the unit norm, rho^2 and own_part^2 (they sum to 1)."""
    parent_w = width * rho**2 / (rho**2 + own_part**2)
    label = f"decoder split: parent part ρ = {fmt(rho)}, own part √(1 − ρ²) = {fmt(own_part)}"
    body = [
        f'<rect x="0" y="0" width="{parent_w:.1f}" height="{height}" class="split-parent"/>',
        f'<rect x="{parent_w:.1f}" y="0" width="{width - parent_w:.1f}" height="{height}" class="split-own"/>',
    ]
    return _svg(width, height, body, label)
