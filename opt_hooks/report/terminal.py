"""Plain-text summary of an AuditResult: one block per layer, for terminals and logs."""
from __future__ import annotations

from opt_hooks.report.svg import fmt
from opt_hooks.result import CONDITIONS, TIER_RANK, AuditResult, LayerResult, PairRow

TOP_FEATURES = 5
TOP_PAIRS = 3
WIDTH = 78


def render_summary(result: AuditResult) -> str:
    blocks = [_layer_block(layer) for layer in result.layers.values()]
    flagged = sum(len(layer.flagged()) for layer in result.layers.values())
    certified = sum(layer.tier_counts()["certified"] for layer in result.layers.values())
    head = (
        f"opt_hooks audit: {len(result.layers)} layer(s), {flagged:,} flagged feature(s), "
        f"{certified:,} certified (descent confirmed on held-out tokens)"
    )
    return "\n".join([head, *blocks])


def _layer_block(layer: LayerResult) -> str:
    tiers = layer.tier_counts()
    counts = layer.condition_counts()
    lam_source = "estimated from the data" if layer.lam_estimated else "training l1 coefficient"
    conditions = "  ".join(_condition_count(c, counts[c], layer) for c in CONDITIONS)
    lines = [
        f"-- {layer.hook_name} " + "-" * max(2, WIDTH - len(layer.hook_name) - 4),
        f"  scope       {layer.scope}  [{layer.architecture}, {layer.d_sae:,} features, d_in {layer.d_in:,}]",
        f"  lam         {fmt(layer.lam, 4)} ({lam_source})",
        f"  tokens      {layer.n_tokens:,} audit + {layer.n_held_out:,} held-out",
        f"  tiers       certified {tiers['certified']:,}  violated {tiers['violated']:,}  "
        f"satisfied {tiers['satisfied']:,}  (dead {len(layer.dead_features):,})",
        f"  conditions  {conditions}",
    ]
    flagged = layer.flagged()[:TOP_FEATURES]
    if flagged:
        lines.append("  top features")
        for feature_id in flagged:
            f = layer.feature(feature_id)
            lines.append(
                f"    #{f.id:<7} {f.tier:<9} {','.join(f.conditions):<14} severity {fmt(f.severity)}"
                f"  active on {f.active_count:,} tokens"
            )
    pairs = sorted(layer.pairs, key=lambda p: (TIER_RANK[p.tier], -p.relative_margin, p.i, p.j))[:TOP_PAIRS]
    if pairs:
        lines.append("  top pairs")
        lines += [f"    {_pair_line(p)}" for p in pairs]
    lines += [f"  note: {note}" for note in layer.notes]
    return "\n".join(lines)


def _condition_count(condition: str, count: int, layer: LayerResult) -> str:
    if condition in ("C5", "C6"):  # layer-wide conditions: a verdict, not a count
        return f"{condition} {layer.layer_conditions.get(condition, {}).get('tier', 'satisfied')}"
    return f"{condition} {count:,}"


def _pair_line(p: PairRow) -> str:
    if p.kind == "hierarchy":
        finding = f"max z_j off i {fmt(p.bound)} < (1-rho)mu_j {fmt(p.threshold)}"
    else:
        finding = f"min z_j off i {fmt(p.bound)} > (1-rho)mu_j {fmt(p.threshold)}"
    return (
        f"{p.i} -> {p.j} {p.kind} ({p.tier}): {finding}, rho {fmt(p.rho)}; "
        f"j on {p.count_j:,} tokens, i on {p.co_count:,} of them"
    )
