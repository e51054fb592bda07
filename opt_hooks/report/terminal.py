"""Plain-text summaries for terminals and logs: of an AuditRecord (`render_summary`) and of a
repair (`render_repair`), one block per layer.

Each audit block leads with the scale every gain is judged against (the held-out objective and the
layer gaps), then the verdict counts and the top findings in the policy's order (held-out gain
per token within each tier, THEORY.md 3.5), then the label-free pair map (THEORY.md section 6):
absorption trees, duplicates to merge, antipodal dense pairs.

Each repair block (THEORY.md section 7) shows the objective before / after on the test tokens, then
the steps: the applied ones with their gain on the validation tokens, the others with the reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from opt_hooks.report.svg import fmt
from opt_hooks.records import (
    CONDITIONS, LAYER_CONDITIONS, AbsorptionRow, AntipodalRow, AuditRecord, CertificateCheck, DuplicateRow, FeatureRow, LayerResult,
    PairRow, latent_label,
)

TOP_FEATURES = 5
TOP_PAIRS = 3
TOP_TREES = 2  # absorption trees, in the map's order (total L1 price)
TOP_CHILDREN = 3  # per tree
TOP_MAP_PAIRS = 3  # duplicates, antipodal pairs
MapPair = TypeVar("MapPair", DuplicateRow, AntipodalRow)
WIDTH = 78
# what the layer's flagged share (LayerResult.flagged_share) predicts, and where the evidence is
FLAGGED_TEXT = ("latents the audit names in a table: a certified finding, a duplicate, an absorption row, "
                "or dead. On SynthSAEBench-recipe worlds a lower share went with SAEs that recover the true "
                "features better (MCC, F1), which EV and L0 did not tell (docs/VALIDATION.md, section Q)")
# what the layer's absorption score (pair_map["absorption_score"], THEORY.md section 6) measures
SCORE_TEXT = ("label-free: on average, the part of a leaning latent's decoder that points at a more frequent "
              "latent which stays off where it fires (a child that absorbed its parent: its rho, up to ~0.7; "
              "about 0.1-0.2 where no hierarchy was planted); across synthetic SAEs it tracked their true "
              "absorption rate, Spearman 0.93-0.99 (docs/VALIDATION.md, section Q)")
# what the map's rows are worth, measured against the truth of SynthSAEBench-recipe worlds
# (docs/VALIDATION.md: Q3 and Q6 pooled per architecture over each width's worlds, Q8, S): the
# terminal's four lines above the trees, and the report page's fuller text
ROWS_LINES = ("rows: label-free candidates to read. On synthetic worlds of 2,048 features (VALIDATION.md Q), a true",
              "ancestor parented 28-38% of standard SAEs' rows, 57-100% of BatchTopK, Matryoshka and pursuit SAEs';",
              "recall 1.5-3% (at 4,096 features, Q8: 83-90% for all four; recall under 5%). That ancestor is mostly",
              "a grandparent or higher: a quarter of right rows name the child's direct parent")
ROWS_TEXT = ("Each row is a label-free candidate to read, not a certified finding. Against the truth of "
             "SynthSAEBench-recipe worlds of 2,048 features (docs/VALIDATION.md, section Q), the parent latent "
             "of 28-38% of the rows coded a true ancestor of the child latent's feature for standard L1 SAEs, "
             "of 57-100% for BatchTopK, Matryoshka and matching-pursuit SAEs (JumpReLU SAEs wrote too few "
             "rows to say); on worlds of 4,096 features (section Q8), of 83-90% for standard, BatchTopK, "
             "Matryoshka and matching-pursuit SAEs alike. The ancestor a right row names is mostly a "
             "grandparent or higher: a quarter of the right rows at 2,048 features name the child's direct "
             "parent (most of Matryoshka SAEs' right rows do, a seventh to a sixth of matching pursuit's), "
             "so read a tree's parent as somewhere above its children. The rows found 1.5-3% of the absorbed "
             "parent-child edges (under 5% at 4,096 features): a trained parent latent also carries its "
             "children that have no latent of their own, so a true edge reads about half "
             "the evidence the theory expects (section S). Compare SAEs by the absorption score above, which "
             "ranked them by their true absorption rate.")

# How each condition's certificate changes the SAE, for the finding lines.
CHANGES = {
    "C1": "move the floor into b_dec",
    "C2": "absorb the pair",
    "C3": "rotate the decoder row",
    "C4": "scale the codes",
    "C5": "shift b_dec",
    "C6": "resample a dead feature",
    "C7": "move W_skip",
}


def render_summary(result: AuditRecord) -> str:
    layers = list(result.layers.values())
    certified = sum(layer.tier_counts()["certified"] for layer in layers)
    pairs = sum(1 for layer in layers for p in layer.pairs if p.tier == "certified")
    layer_findings = sum(layer.condition_counts()[c] for layer in layers for c in LAYER_CONDITIONS)
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
    for name in ("codes", "decoder", "bias", "skip"):
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
        f"{c} {'yes' if certified[c] else 'no'}" if c in LAYER_CONDITIONS else f"{c} {certified[c]:,}"
        for c in CONDITIONS if c != "C7" or "C7" in layer.layer_conditions  # C7: skip transcoders only
    )
    gaps = gap_text(layer)
    lines = [
        f"-- {layer.hook_name} " + "-" * max(2, WIDTH - len(layer.hook_name) - 4),
        f"  scope       {layer.scope}  [{layer.architecture}, {layer.d_sae:,} features, d_in {layer.d_in:,}]",
        *([f"  predicts    {layer.hook_name_out}"] if layer.hook_name_out else []),
        f"  lam         {lam_line}",
        f"  tokens      {layer.n_tokens:,} audit + {layer.n_held_out:,} held-out; "
        f"{layer.n_tests:,} certificates tested at alpha {fmt(layer.alpha)} "
        f"(Bonferroni: p < {fmt(layer.alpha / max(layer.n_tests, 1))} each)",
        f"  objective   {objective_text(layer)}",
        *[f"  {name + ' gap':<11} {text}" for name, text in gaps],
        f"  features    certified {tiers['certified']:,}  violated {tiers['violated']:,}  "
        f"satisfied {tiers['satisfied']:,}  (dead {len(layer.dead_features):,})",
        f"  certified   {conditions}",
        f"  flagged     {percent(layer.flagged_share())} of latents (certified, duplicated, absorbed or dead);",
        "              fewer went with truer features on SynthSAEBench-recipe worlds (VALIDATION.md Q)",
    ]
    for name in LAYER_CONDITIONS:
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
        f"#{f.label:<6} {','.join(f.conditions):<10} {_finding(best, CHANGES[f.conditions[0]], 'of its value')}"
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
        f"{latent_label(p.i, p.sign_i)} -> {latent_label(p.j, p.sign_j)} {p.kind} ({p.tier}{verdict}): {finding}, "
        f"rho {fmt(p.rho)}; "
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
             f"evidence >= {fmt(m.get('min_evidence'))})",
             f"    score {fmt(m.get('absorption_score'))} ± {fmt(m.get('absorption_score_se'))} over "
             f"{m.get('scored_latents') or 0:,} leaning latents (the layer's label-free absorption score, THEORY.md section 6)"]
    if trees:
        lines += [f"    {line}" for line in ROWS_LINES]
    for parent, rows in list(trees.items())[:TOP_TREES]:
        shown = f", top {TOP_CHILDREN}" if len(rows) > TOP_CHILDREN else ""
        lines.append(f"    parent {layer.row_label(parent)} (on {rows[0].count_parent:,} tokens) absorbed into "
                     f"{len(rows):,} child(ren){shown}:")
        lines += [f"      {_absorption_line(r)}" for r in rows[:TOP_CHILDREN]]
    lines.append(f"  {'duplicates':<11} " + _map_pairs(layer.duplicates, f"rho >= {fmt(m.get('duplicate_rho'))}",
                                                        "to merge", _duplicate_text))
    groups = layer.duplicate_groups()
    if groups:
        lines.append(f"    in {len(groups):,} group(s) of {sum(map(len, groups)):,} latents, each one direction "
                     f"coded several times; largest: {_group_text(layer, groups[0])}")
    lines.append(f"  {'antipodal':<11} " + _map_pairs(layer.antipodal, f"rho <= -{fmt(m.get('antipodal_rho'))}",
                                                       "of dense latents", _antipodal_text))
    return lines


def _absorption_line(r: AbsorptionRow) -> str:
    return (f"child {latent_label(r.child, r.child_sign)}: rho {fmt(r.rho)} / own {fmt(r.own_part)}, "
            f"parent off on {percent(r.fraction)} "
            f"of {r.count_child:,} tokens, evidence {fmt(r.evidence)} ± {fmt(r.evidence_se)}, "
            f"L1 price {fmt(r.l1_price)}")


def _map_pairs(rows: Sequence[MapPair], threshold: str, what: str, text: Callable[[MapPair], str]) -> str:
    if not rows:
        return f"none found ({threshold})"
    more = "; ..." if len(rows) > TOP_MAP_PAIRS else ""
    return f"{len(rows):,} pair(s) {what} ({threshold}): " + "; ".join(map(text, rows[:TOP_MAP_PAIRS])) + more


def _group_text(layer: LayerResult, group: list[int], limit: int = 8) -> str:
    shown = ", ".join(layer.row_label(row) for row in group[:limit])
    return f"{len(group)} latents ({shown}{', ...' if len(group) > limit else ''})"


def _duplicate_text(d: DuplicateRow) -> str:
    return f"{latent_label(d.i, d.sign_i)} = {latent_label(d.j, d.sign_j)} rho {d.rho:.4f}, jaccard {fmt(d.jaccard)}"  # 3 digits would round most to 1


def _antipodal_text(a: AntipodalRow) -> str:
    return f"{latent_label(a.i, a.sign_i)} / {latent_label(a.j, a.sign_j)} rho {fmt(a.rho)}, covering {percent(a.share)} of tokens"


# ---- repair (opt_hooks.repair_run.RepairResult.to_dict()) ------------------------------------------

# The rows of a repair's before / after table: (label, key in each side, key of its SE or None).
REPAIR_ROWS = (
    ("L", "L", "L_se"),
    ("mse", "mse", "mse_se"),
    ("lam * l1", "l1", "l1_se"),
    ("l0", "l0", "l0_se"),
    ("expl. var.", "explained_variance", None),
    ("dead", "dead", None),
)
REPAIR_STEPS = {  # what each step writes into the SAE
    "floor": "C1 floors into b_dec",
    "bias": "C5 bias step",
    "atoms": "C3 atom turns",
    "codes": "C4 code scales",
    "respawn": "duplicates merged, free latents resampled",
}


def render_repair(repair: dict[str, Any]) -> str:
    """The repair's summary: a head line, then per layer the before / after table on the test
    tokens and the steps (`repair` is `RepairResult.to_dict()`, or its JSON)."""
    table, changes = repair.get("table") or {}, repair.get("changes") or {}
    hooks = list(table) + [hook for hook in changes if hook not in table]
    steps = [step for hook in hooks for step in changes.get(hook, [])]
    lower = sum(1 for hook in hooks if ((table.get(hook) or {}).get("change") or {}).get("L") is not None
                and table[hook]["change"]["L"] < 0)
    head = (f"opt_hooks repair: {len(hooks)} layer(s); L lower on the test tokens in {lower} of "
            f"{len(hooks)}; {sum(1 for s in steps if s.get('applied')):,} of {len(steps):,} step(s) applied")
    rounds = max([int(s.get("round") or 1) for s in steps], default=1)
    return "\n".join([head, *(_repair_block(hook, table.get(hook), changes.get(hook, []), rounds > 1)
                              for hook in hooks)])


def _repair_block(hook: str, row: dict[str, Any] | None, steps: list[dict[str, Any]], rounds: bool) -> str:
    lines = [f"-- {hook} " + "-" * max(2, WIDTH - len(hook) - 4)]
    if row is None:
        lines.append("  test        not measured")
    else:
        lam = f" (lam {fmt(row['lam'], 4)})" if row.get("lam") is not None else ""
        lines.append(f"  test        {_count(row.get('n_tokens'))} tokens neither the audit nor the repair read; "
                     f"objective {row.get('objective') or 'n/a'}{lam}")
        lines.append(f"  {'':<11} {'before':<18} {'after':<18} change")
        lines += [f"  {line}" for line in repair_table_lines(row)]
    lines.append("  steps       gain per token on the validation tokens (kept where significant)")
    if not steps:
        lines.append("    none: the audit certified nothing the repair could write")
    lines += [f"    {repair_step_text(step, rounds)}" for step in steps]
    return "\n".join(lines)


def repair_table_lines(row: dict[str, Any]) -> list[str]:
    return [f"{label:<11} {before:<18} {after:<18} {change}" for label, before, after, change in repair_cells(row)]


def repair_cells(row: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, before, after, change) per row of one layer's table: value ± SE on each side, and
    the change (L's with its paired SE and p-value: the same tokens on both sides)."""
    before, after = row.get("before") or {}, row.get("after") or {}
    cells = []
    for label, key, se_key in REPAIR_ROWS:
        sides = [with_se(side.get(key), side.get(se_key) if se_key else None) for side in (before, after)]
        if key == "L":
            change = row.get("change") or {}
            delta = f"{signed(change.get('L'))} ± {fmt(change.get('se'))} (p {fmt(change.get('p_value'))})"
        else:
            delta = signed(difference(before.get(key), after.get(key)))
        cells.append((label, sides[0], sides[1], delta))
    return cells


def repair_step_text(step: dict[str, Any], rounds: bool = False) -> str:
    """One step: applied with its validation gain, or not applied with the reason."""
    name = f"r{step.get('round', 1)} {step.get('step')}" if rounds else str(step.get("step"))
    state = "applied" if step.get("applied") else "not applied"
    parts = [f"{name:<10} {step.get('condition') or '':<15} {state:<11}"]
    if step.get("gain") is not None:
        parts.append(f" gain {fmt(step['gain'])} ± {fmt(step.get('se'))} (p {fmt(step.get('p_value'))})")
    parts.append(f", {items_text(step)}")
    if step.get("merge_only_gain") is not None:
        parts.append(f"; merges alone {fmt(step['merge_only_gain'])} ± {fmt(step.get('merge_only_se'))}")
    if not step.get("applied"):
        parts.append(f": {step.get('reason') or 'no reason given'}")
    return "".join(parts)


def items_text(step: dict[str, Any]) -> str:
    """How many changes a step holds: respawn's merges and resampled latents apart."""
    items = step.get("items") or []
    if step.get("step") != "respawn":
        return f"{len(items):,} item(s)"
    merges = sum(1 for item in items if "keep" in item)
    planted = [item for item in items if "keep" not in item]
    text = f"{merges:,} merge(s), {len(planted):,} resampled latent(s)"
    if step.get("applied") and planted:  # a step not applied keeps none of them
        text += f" ({sum(1 for item in planted if item.get('kept')):,} kept)"
    return text


def difference(before: Any, after: Any) -> float | int | None:
    if before is None or after is None:
        return None
    return after - before


def signed(value: float | int | None) -> str:
    return fmt(value) if value is None or value <= 0 else f"+{fmt(value)}"


def with_se(value: Any, se: Any) -> str:
    """A value to 4 digits (the change below it is small), with its SE where there is one."""
    return fmt(value, 4) if se is None else f"{fmt(value, 4)} ± {fmt(se)}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"
