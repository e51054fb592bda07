"""Plain-text summary of an AuditRecord: one block per layer, for terminals and logs.

Each block leads with the scale every gain is judged against (the held-out objective and the
layer gaps), then the verdict counts and the top findings in the policy's order (held-out gain
per token within each tier, THEORY.md 3.5), then the label-free pair map (THEORY.md section 6):
absorption trees, duplicates to merge, antipodal dense pairs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from opt_hooks.report.svg import fmt
from opt_hooks.records import (
    CONDITIONS, AbsorptionRow, AntipodalRow, AuditRecord, CertificateCheck, DuplicateRow, FeatureRow, LayerResult,
    PairRow,
)

TOP_FEATURES = 5
TOP_PAIRS = 3
TOP_TREES = 2  # absorption trees, in the map's order (total L1 price)
TOP_CHILDREN = 3  # per tree
TOP_MAP_PAIRS = 3  # duplicates, antipodal pairs
MapPair = TypeVar("MapPair", DuplicateRow, AntipodalRow)
WIDTH = 78

# How each condition's certificate changes the SAE, for the finding lines.
CHANGES = {
    "C1": "move the floor into b_dec",
    "C2": "absorb the pair",
    "C3": "rotate the decoder row",
    "C4": "scale the codes",
    "C5": "shift b_dec",
    "C6": "resample a dead feature",
}


def render_summary(result: AuditRecord) -> str:
    layers = list(result.layers.values())
    certified = sum(layer.tier_counts()["certified"] for layer in layers)
    pairs = sum(1 for layer in layers for p in layer.pairs if p.tier == "certified")
    layer_findings = sum(layer.condition_counts()[c] for layer in layers for c in ("C5", "C6"))
    head = (
        f"opt_hooks audit: {len(layers)} layer(s); certified: {certified:,} feature(s), {pairs:,} pair(s), "
        f"{layer_findings:,} layer finding(s) (held-out descent, significant and material)"
    )
    return "\n".join([head, *(_layer_block(layer) for layer in layers)])


def objective_text(layer: LayerResult) -> str:
    o = layer.objective
    if not o.get("n_tokens"):
        return "no held-out tokens"
    l1 = f", L1 {fmt(o['l1'])}" if o.get("l1") is not None else " (no lam: L is the MSE)"
    return (
        f"L {fmt(o['L'])} ± {fmt(o.get('se'))} per token: MSE {fmt(o['mse'])}{l1}; L0 {fmt(o.get('l0'))}; "
        f"explained variance {fmt(o.get('explained_variance'))}; dead {percent(o.get('dead_share'))}"
    )


def gap_text(layer: LayerResult) -> list[tuple[str, str]]:
    """(name, text) per layer gap: its held-out gain as a share of L, with its SE."""
    out = []
    for name in ("codes", "decoder", "bias"):
        gap = layer.gaps.get(name)
        if gap is None:
            continue
        se_share = gap["se"] / layer.objective["L"] if gap.get("se") is not None and layer.objective.get("L") else None
        text = f"{percent(gap.get('share'))} of L (± {percent(se_share)}; gain {fmt(gap.get('gain'))} per token)"
        if name == "codes":
            text += (f", L0 {fmt(gap['l0_before'])} -> {fmt(gap['l0_after'])} with exact codes "
                     f"on {gap['n_tokens']:,} held-out tokens")
        out.append((name, text))
    return out


def _layer_block(layer: LayerResult) -> str:
    tiers = layer.tier_counts()
    certified = layer.condition_counts("certified")
    if layer.lam is None:
        lam_line = "unknown: C4, C6 and the code gap skipped"
    else:
        lam_line = f"{fmt(layer.lam, 4)} ({'estimated from the data' if layer.lam_estimated else 'training l1 coefficient'})"
    conditions = "  ".join(
        f"{c} {'yes' if certified[c] else 'no'}" if c in ("C5", "C6") else f"{c} {certified[c]:,}" for c in CONDITIONS
    )
    gaps = gap_text(layer)
    lines = [
        f"-- {layer.hook_name} " + "-" * max(2, WIDTH - len(layer.hook_name) - 4),
        f"  scope       {layer.scope}  [{layer.architecture}, {layer.d_sae:,} features, d_in {layer.d_in:,}]",
        f"  lam         {lam_line}",
        f"  tokens      {layer.n_tokens:,} audit + {layer.n_held_out:,} held-out; "
        f"{layer.n_tests:,} certificates tested at alpha {fmt(layer.alpha)} "
        f"(Bonferroni: p < {fmt(layer.alpha / max(layer.n_tests, 1))} each)",
        f"  objective   {objective_text(layer)}",
        *[f"  {name + ' gap':<11} {text}" for name, text in gaps],
        f"  features    certified {tiers['certified']:,}  violated {tiers['violated']:,}  "
        f"satisfied {tiers['satisfied']:,}  (dead {len(layer.dead_features):,})",
        f"  certified   {conditions}",
    ]
    for name in ("C5", "C6"):
        check = layer.layer_conditions.get(name, {}).get("certificate")
        if check is not None and check.tier != "satisfied":
            lines.append(f"  {name:<11} {_finding(check, CHANGES[name], 'of L')}")
    flagged = [layer.feature(i) for i in layer.flagged()[:TOP_FEATURES]]
    if flagged:
        lines.append("  top features (held-out gain per token; share of the feature's value)")
        lines += [f"    {_feature_line(f)}" for f in flagged]
    pairs = layer.ranked_pairs()[:TOP_PAIRS]
    if pairs:
        lines.append("  top pairs")
        lines += [f"    {_pair_line(p)}" for p in pairs]
    lines += pair_map_lines(layer)
    # the code gap's reason is on its own line above, the pair map's in its lines
    lines += [f"  {condition} skipped: {reason}" for condition, reason in layer.skipped.items()
              if condition not in ("codes", "absorption")]
    lines += [f"  note: {note}" for note in layer.notes]
    return "\n".join(lines)


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{fmt(100 * share, 2)}%"


def _finding(check: CertificateCheck, change: str, scale: str) -> str:
    if check.gain is None:
        return f"{check.tier}: {change}: {check.reason}"
    text = (f"{check.tier}: {change}: gain {fmt(check.gain)} ± {fmt(check.held_out_se)} (p {fmt(check.p_value)}), "
            f"{percent(check.share)} {scale}")
    return text + (f"; {check.reason}" if check.reason else "")


def _feature_line(f: FeatureRow) -> str:
    best = f.certificates[f.conditions[0]]
    return (
        f"#{f.id:<6} {','.join(f.conditions):<10} {_finding(best, CHANGES[f.conditions[0]], 'of its value')}"
        f"; active on {f.active_count:,} tokens"
    )


def _pair_line(p: PairRow) -> str:
    if p.kind == "hierarchy":
        finding = f"max z_j off i {fmt(p.bound)} < (1-rho)mu_j {fmt(p.threshold)}"
    else:
        finding = f"min z_j off i {fmt(p.bound)} > (1-rho)mu_j {fmt(p.threshold)}"
    verdict = f" gain {fmt(p.gain)}" if p.gain is not None else ""
    reason = f"; {p.certificate.reason}" if p.certificate is not None and p.certificate.reason else ""
    return (
        f"{p.i} -> {p.j} {p.kind} ({p.tier}{verdict}): {finding}, rho {fmt(p.rho)}; "
        f"j on {p.count_j:,} tokens, i on {p.co_count:,} of them{reason}"
    )


def map_unavailable(layer: LayerResult) -> str | None:
    """Why the layer has no pair map (None when it has one)."""
    if layer.pair_map.get("available"):
        return None
    return layer.skipped.get("absorption", "the record carries no pair map")


def pair_map_lines(layer: LayerResult) -> list[str]:
    """The pair map: absorption trees (each parent with its absorbed children), then the
    duplicates and antipodal pairs, "none found" where the map is empty."""
    why_not = map_unavailable(layer)
    if why_not is not None:
        return [f"  {'absorption':<11} not computed: {why_not}"]
    m = layer.pair_map
    trees = layer.absorption_trees()
    found = f"{len(trees):,} tree(s), {len(layer.absorption):,} absorbed child(ren)" if trees else "none found"
    lines = [f"  {'absorption':<11} {found} (label-free: rho >= {fmt(m.get('rho_min'))}, "
             f"evidence >= {fmt(m.get('min_evidence'))})"]
    for parent, rows in list(trees.items())[:TOP_TREES]:
        shown = f", top {TOP_CHILDREN}" if len(rows) > TOP_CHILDREN else ""
        lines.append(f"    parent {parent} (on {rows[0].count_parent:,} tokens) absorbed into {len(rows):,} "
                     f"child(ren){shown}:")
        lines += [f"      {_absorption_line(r)}" for r in rows[:TOP_CHILDREN]]
    lines.append(f"  {'duplicates':<11} " + _map_pairs(layer.duplicates, f"rho >= {fmt(m.get('duplicate_rho'))}",
                                                        "to merge", _duplicate_text))
    groups = layer.duplicate_groups()
    if groups:
        lines.append(f"    in {len(groups):,} group(s) of {sum(map(len, groups)):,} latents, each one direction "
                     f"coded several times; largest: {_group_text(groups[0])}")
    lines.append(f"  {'antipodal':<11} " + _map_pairs(layer.antipodal, f"rho <= -{fmt(m.get('antipodal_rho'))}",
                                                       "of dense latents", _antipodal_text))
    return lines


def _absorption_line(r: AbsorptionRow) -> str:
    return (f"child {r.child}: rho {fmt(r.rho)} / own {fmt(r.own_part)}, parent off on {percent(r.fraction)} "
            f"of {r.count_child:,} tokens, evidence {fmt(r.evidence)} ± {fmt(r.evidence_se)}, "
            f"L1 price {fmt(r.l1_price)}")


def _map_pairs(rows: Sequence[MapPair], threshold: str, what: str, text: Callable[[MapPair], str]) -> str:
    if not rows:
        return f"none found ({threshold})"
    more = "; ..." if len(rows) > TOP_MAP_PAIRS else ""
    return f"{len(rows):,} pair(s) {what} ({threshold}): " + "; ".join(map(text, rows[:TOP_MAP_PAIRS])) + more


def _group_text(group: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, group[:limit]))
    return f"{len(group)} latents ({shown}{', ...' if len(group) > limit else ''})"


def _duplicate_text(d: DuplicateRow) -> str:
    return f"{d.i} = {d.j} rho {d.rho:.4f}, jaccard {fmt(d.jaccard)}"  # 3 digits would round most to 1


def _antipodal_text(a: AntipodalRow) -> str:
    return f"{a.i} / {a.j} rho {fmt(a.rho)}, covering {percent(a.share)} of tokens"
