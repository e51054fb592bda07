"""report/: report.json against its schema, report.html (content, and in headless Chromium),
the terminal summary, Neuronpedia links. Renderers run on a hand-made AuditResult, so these
tests need no model and no audit."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from html import escape
from pathlib import Path

import jsonschema
import pytest
import yaml

from opt_hooks.report import REPORT_HTML, REPORT_JSON, load_schema, render_html, render_summary, write_report
from opt_hooks.report.neuronpedia import feature_url, sae_url
from opt_hooks.records import (
    SCHEMA_VERSION, AbsorptionRow, AntipodalRow, CertificateCheck, DuplicateRow, FeatureRow, LayerResult, PairRow,
)
from opt_hooks.result import AuditResult

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE_TEXT = "x = '<script>alert(1)</script>' & done"  # must come out escaped


def _check(condition: str, measured: float, held_out: float | None, tier: str = "violated") -> CertificateCheck:
    n_held_out = 100 if held_out is not None else 0
    gain = None if held_out is None else -held_out
    return CertificateCheck(
        condition, 1e-3, measured * 1.01, measured, held_out, None if held_out is None else 1e-5,
        None if held_out is None else 1e-4, gain, None if gain is None else gain / 0.01, tier,
        "" if tier == "certified" else "held-out descent not significant", 900, n_held_out, 40,
    )


def _feature(k: int, tier: str = "satisfied", conditions: tuple[str, ...] = (), **extra) -> FeatureRow:
    checks = {c: _check(c, -1e-4 * (k + 1), -9e-5 * (k + 1) if tier == "certified" else 2e-6, tier) for c in conditions}
    best = checks[conditions[0]] if conditions else None
    row = dict(
        id=k, tier=tier, conditions=list(conditions), active_count=40 + k, mean_code=0.1 + 0.01 * k,
        max_code=2.0 + k / 10, min_code=0.0, c3_size=0.02 * (k % 7), c4_gain=1e-4 * k, c4_size=0.05 * k,
        gain=best.gain if best else None, gain_se=best.held_out_se if best else None,
        p_value=best.p_value if best else None, value=0.01, share=best.share if best else None, certificates=checks,
        top_tokens=[k, k + 100] if conditions else [], top_values=[2.0, 1.5] if conditions else [],
    )
    return FeatureRow(**{**row, **extra})


def _pair(i: int, j: int, kind: str, tier: str) -> PairRow:
    zi = [0.0] * 30 + [0.5 + 0.05 * n for n in range(40)]
    if kind == "hierarchy":  # j never fires without i: on A_i (zi == 0) z_j stays at 0
        zj = [0.0] * 30 + [0.2 + 0.03 * n for n in range(40)]
        bound, threshold, hull = 0.0, 0.45, (0.0, 0.0)
    else:  # j is always well on when i is off
        zj = [1.0 + 0.02 * n for n in range(30)] + [0.1 * (n % 3) for n in range(40)]
        bound, threshold, hull = 1.0, 0.6, (1.0, 1.58)
    return PairRow(
        i=i, j=j, kind=kind, rho=0.31, bound=bound, threshold=threshold, margin=abs(threshold - bound),
        relative_margin=0.8, count_i=40, count_j=40, co_count=40, p_j_without_i_upper=3 / 40, tier=tier,
        certificate=_check("C2", -2e-4, -1e-4 if tier == "certified" else 1e-5, tier),
        sample_i=zi, sample_j=zj, hull_min=hull[0], hull_max=hull[1],
    )


PAIR_MAP = {"available": True, "rho_spread": 0.02, "rho_min": 0.1, "min_evidence": 0.5, "duplicate_rho": 0.9,
            "antipodal_rho": 0.9, "neighbours": 8, "measured_pairs": 40}
MAP_OFF = "switched off (AuditOptions(pair_map=None))"


def _absorbed(parent: int, child: int, rho: float, l1_price: float) -> AbsorptionRow:
    return AbsorptionRow(
        parent=parent, child=child, rho=rho, own_part=math.sqrt(1 - rho**2), count_parent=60, count_child=45,
        co_count=5, fraction=40 / 45, l1_price=l1_price, evidence=0.93, evidence_se=0.012, evidence_p=1e-9,
        n_evidence=120, reverse_evidence=0.36,
    )


def _layer(hook: str, neuronpedia_id: str | None, exact: bool) -> LayerResult:
    features = [_feature(k) for k in range(24)]
    features[3] = _feature(3, "certified", ("C2", "C4"))
    features[7] = _feature(7, "certified", ("C3",))
    features[11] = _feature(11, "violated", ("C4",))
    features[12] = _feature(12, "violated", ("C1",), min_code=0.04)
    features[20] = _feature(  # dead: no codes, C3 size 0/0
        20, active_count=0, mean_code=0.0, max_code=0.0, c3_size=math.nan, c4_size=None, c4_gain=None
    )
    c5 = {"size": 2e-6, "norm": 1e-7, "tier": "satisfied", "certificate": None}
    c6 = {
        "n_dead": 1, "dead": [20], "resampled": 20, "max_rnorm": 3.2, "threshold": 0.02, "margin": 3.18,
        "n_over_threshold": 812, "worst_tokens": [5, 300], "worst_rnorms": [3.2, 2.9], "tier": "certified",
        "certificate": _check("C6", -3e-3, -2e-3, "certified"),
    }
    objective = {"L": 0.5, "se": 0.01, "mse": 0.2, "l1": 0.3, "n_tokens": 100, "l0": 3.0,
                 "explained_variance": 0.9, "dead_share": 1 / 24}
    gap = {"gain": 0.01, "share": 0.02, "se": 0.001, "n_tokens": 100, "p_value": 1e-9, "step": 0.1}
    gaps = {"decoder": gap, "bias": gap, "codes": {**gap, "l0_before": 3.0, "l0_after": 2.0, "iterations": 50,
                                                  "converged": True, "tol": 1e-7}}
    return LayerResult(
        hook_name=hook, architecture="standard" if exact else "topk",
        scope="L1 objective (exact)" if exact else "L1 surrogate (topk)",
        lam=0.04, lam_estimated=not exact, d_in=16, d_sae=24, n_tokens=900, n_held_out=100,
        features=features, pairs=[_pair(3, 5, "hierarchy", "certified"), _pair(9, 3, "complementary", "violated")],
        layer_conditions={"C5": c5, "C6": c6}, objective=objective, gaps=gaps, n_tests=50, alpha=0.05,
        sae_id=hook, neuronpedia_id=neuronpedia_id,
        dead_features=[20], notes=["a note about this layer"], pair_map=PAIR_MAP,
    )


def _mapped(layer: LayerResult) -> LayerResult:
    """The layer with a pair map of every kind: parent 3 absorbed into its siblings 7 and 11 (the
    costlier tree first), parent 12 into 5 (no contexts kept), one duplicate, one antipodal pair.
    The latents with contexts are flagged ones: the snippets decoded for them are unchanged."""
    return dataclasses.replace(
        layer,
        absorption=[_absorbed(3, 7, 0.6, 4e-3), _absorbed(3, 11, 0.8, 3e-3), _absorbed(12, 5, 0.5, 1e-3)],
        duplicates=[DuplicateRow(14, 15, 0.97, 50, 48, 40, 40 / 58)],
        antipodal=[AntipodalRow(16, 17, -0.98, 450, 430, 2, 878 / 900, [0.6, -0.8] + [0.0] * 14)],
    )


def make_result() -> AuditResult:
    """Two layers (one exact, one L1 surrogate), every tier, both pair kinds, C5/C6, a dead feature;
    the first with a pair map of every kind, the second with an empty one."""
    layers = {
        "blocks.0.hook_resid_pre": _mapped(_layer("blocks.0.hook_resid_pre", "gpt2-small/0-res-jb", exact=True)),
        "blocks.1.hook_resid_pre": _layer("blocks.1.hook_resid_pre", None, exact=False),  # an empty pair map
    }
    texts = {k: f"context of token {k}: the [[dog]] barks" for k in (3, 7, 11, 12, 103, 107, 111, 112, 300)}
    texts[5] = HOSTILE_TEXT
    return AuditResult(layers=layers, meta={"model": "test-model", "n_tokens": 1000}, token_texts=texts)


@pytest.fixture
def result() -> AuditResult:
    return make_result()


# ---- report.json -------------------------------------------------------------------------


def test_report_json_matches_schema(result, tmp_path):
    out = write_report(result, tmp_path / "out")
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    report = json.loads((out / REPORT_JSON).read_text())
    jsonschema.Draft202012Validator(schema).validate(report)
    assert report["layers"]["blocks.0.hook_resid_pre"]["features"][20]["c3_size"] is None  # NaN -> null


def test_schema_version_is_the_one_results_write():
    assert load_schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION


@pytest.mark.parametrize(
    "break_it",
    [
        lambda r: r.update(schema_version="0.9"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["features"][3].update(tier="bogus"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["pairs"][0].pop("threshold"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["pairs"][0].update(kind="sibling"),
        lambda r: r["layers"]["blocks.1.hook_resid_pre"].update(scope="exact"),
        lambda r: r["layers"]["blocks.1.hook_resid_pre"].update(unknown_field=1),
        lambda r: r["token_texts"].update(abc="not a token index"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["absorption"][0].update(sibling=11),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["absorption"][1].pop("own_part"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["duplicates"][0].pop("jaccard"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["antipodal"][0].update(share="98%"),
        lambda r: r["layers"]["blocks.1.hook_resid_pre"].update(pair_map={"available": "yes"}),
    ],
)
def test_schema_rejects_broken_reports(result, break_it):
    report = json.loads(json.dumps(result.to_dict()))
    validator = jsonschema.Draft202012Validator(load_schema())
    validator.validate(report)
    broken = copy.deepcopy(report)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_report_round_trips_through_json(result, tmp_path):
    out = write_report(result, tmp_path / "out")
    again = AuditResult.from_dict(json.loads((out / REPORT_JSON).read_text()))
    assert again.layers["blocks.0.hook_resid_pre"].pairs[1].hull_max == 1.58
    assert render_summary(again) == render_summary(result)


def test_pair_map_rows_round_trip_through_json(result):
    layer = result.layers["blocks.0.hook_resid_pre"]
    again = AuditResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert again.to_dict() == result.to_dict()
    mapped = again.layers["blocks.0.hook_resid_pre"]
    assert mapped.absorption == layer.absorption and isinstance(mapped.absorption[0], AbsorptionRow)
    assert mapped.duplicates == layer.duplicates and isinstance(mapped.duplicates[0], DuplicateRow)
    assert mapped.antipodal == layer.antipodal and isinstance(mapped.antipodal[0], AntipodalRow)
    assert mapped.pair_map == PAIR_MAP
    assert list(mapped.absorption_trees()) == [3, 12]


@pytest.mark.parametrize("table", ["features", "pairs", "absorption", "duplicates", "antipodal"])
def test_to_pandas_rows_are_report_json_rows(result, table):
    """Every DataFrame row is its report.json row (nested certificates left out, conditions joined),
    in report.json's order, for every layer; the result's frame stacks the layers' with hook and sae_id."""
    import math

    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    frame = result.to_pandas(table)
    expected = []
    for hook, layer in report["layers"].items():
        for row in layer[table]:
            row = {k: v for k, v in row.items() if k not in ("certificates", "certificate")}
            if table == "features":
                row["conditions"] = ",".join(row["conditions"])
            expected.append({"hook": hook, "sae_id": layer["sae_id"], **row})
    assert len(frame) == len(expected) and (len(frame) > 0 or table == "antipodal" or table == "duplicates")
    for got, want in zip(frame.to_dict("records"), expected, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if value is None:
                assert got[key] is None or (isinstance(got[key], float) and math.isnan(got[key])), key
            else:
                assert got[key] == value, key
    with pytest.raises(ValueError, match="unknown table"):
        result.layers["blocks.0.hook_resid_pre"].to_pandas("nothing")


def test_save_writes_every_layers_tables_as_parquet(result, tmp_path):
    """tables/<hook>/<table>.parquet holds every row with its certificates as columns, equal to
    `to_pandas(table, certificates=True)`; a feature's C3 columns are its C3 check's fields."""
    import pandas as pd

    out = result.save(tmp_path / "out")
    for hook, layer in result.layers.items():
        for table in layer.TABLES:
            read = pd.read_parquet(out / "tables" / hook / f"{table}.parquet")
            frame = layer.to_pandas(table, certificates=True)
            assert list(read.columns) == list(frame.columns) and len(read) == len(frame)
            pd.testing.assert_frame_equal(read, frame, check_dtype=False, check_column_type=False)
    layer = result.layers["blocks.0.hook_resid_pre"]
    features = pd.read_parquet(out / "tables" / "blocks.0.hook_resid_pre" / "features.parquet")
    with_c3 = [f for f in layer.features if "C3" in f.certificates]
    assert with_c3, "no C3 check in the fixture: the test would be vacuous"
    for f in with_c3:
        row = features[features["id"] == f.id].iloc[0]
        assert row["C3_tier"] == f.certificates["C3"].tier and row["C3_step"] == f.certificates["C3"].step
    pairs = pd.read_parquet(out / "tables" / "blocks.0.hook_resid_pre" / "pairs.parquet")
    assert list(pairs["certificate_tier"]) == [p.certificate.tier if p.certificate else None for p in layer.pairs]


# ---- the output folder --------------------------------------------------------------------


def test_write_report_refuses_a_folder_in_use(result, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_report(result, out)
    write_report(result, out, overwrite=True)
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", REPORT_JSON, REPORT_HTML, "tables"])
    assert not [p for p in out.rglob(".*.tmp")]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        write_report(result, tmp_path / "file", overwrite=True)


def test_save_writes_both_files(result, tmp_path):
    assert result.save(tmp_path / "saved") == tmp_path / "saved"
    assert (tmp_path / "saved" / REPORT_HTML).stat().st_size > 10_000


# ---- report.html content -----------------------------------------------------------------


def test_html_is_self_contained_and_complete(result):
    page = render_html(result)
    # offline: no external scripts, styles, images or fonts; links only to Neuronpedia pages
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert set(re.findall(r'href="(https?://[^/"]+)', page)) == {"https://www.neuronpedia.org"}
    for hook in result.layers:
        assert hook in page
    assert page.count('<table class="sortable features">') == 2
    assert page.count('<table class="sortable pairs">') == 2
    assert page.count("class=\"threshold\"") == 4  # one scatter per flagged pair, threshold line drawn
    assert "hierarchy: ρ = 0.31" in page and "[1, 1.58]" in page  # rho stated, hull interval marked
    assert "L1 surrogate (topk)" in page and "not proofs about its own objective" in page
    assert "context of token 103: the <mark>dog</mark> barks" in page  # top contexts, token marked
    assert HOSTILE_TEXT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('data-report-status="loading"') == 1


@pytest.mark.parametrize(
    "text, shown",
    [
        ("the [[dog]] barks", "the <mark>dog</mark> barks"),
        ("x = a[[0]] + b[[i]] [[)]]\n", "x = a[[0]] + b[[i]] <mark>)</mark>\n"),  # code before the token
        ("no marker <here>", "no marker &lt;here&gt;"),
    ],
)
def test_context_snippets_mark_the_token(text, shown):
    from opt_hooks.report.html import _context

    assert _context(text) == shown


def test_html_feature_table_ranks_by_tier_then_held_out_gain(result):
    page = render_html(result)
    table = page.split('<table class="sortable features">')[1].split("</table>")[0]
    ids = re.findall(r'<tr><td data-v="(\d+)">', table)
    assert ids == ["7", "3", "11", "12"]  # certified before violated, then by held-out gain (ties: id)
    assert 'href="https://www.neuronpedia.org/gpt2-small/0-res-jb/7"' in table


def test_pair_plot_marks_hull_and_threshold_in_data_coordinates(result):
    from opt_hooks.report.svg import pair_scatter

    svg = pair_scatter(
        [0.0, 1.0], [0.0, 2.0], threshold=1.0, hull=(0.0, 0.5), rho=0.2, labels=("1", "2"), kind="hierarchy"
    )
    threshold_y = float(re.search(r'y1="([\d.]+)" x2="[\d.]+" y2="[\d.]+" class="threshold"', svg).group(1))
    hull = re.search(r'y1="([\d.]+)" x2="[\d.]+" y2="([\d.]+)" class="hull"', svg)
    low_y, high_y = float(hull.group(1)), float(hull.group(2))
    assert low_y > high_y > threshold_y  # SVG y grows downwards: the hull lies below the threshold


def test_engine_pairs_carry_what_the_pair_figure_needs():
    """End to end from the engine: a planted hierarchy (feature 1 fires only with feature 0)
    is flagged, and its row has the scatter sample and the exact hull the figure draws."""
    import torch

    from opt_hooks.engine import LayerAudit

    gen = torch.Generator().manual_seed(0)
    n, d, k = 3000, 16, 6
    atoms = torch.randn(k, d, generator=gen, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    z = torch.zeros(n, k, dtype=torch.float64)
    firing = {0: torch.rand(n, generator=gen) < 0.3}
    firing[1] = firing[0] & (torch.rand(n, generator=gen) < 0.5)
    firing.update({f: torch.rand(n, generator=gen) < 0.2 for f in range(2, k)})
    for f, on in firing.items():
        z[on, f] = 1 + 0.2 * torch.rand(int(on.sum()), generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    x = bias + z @ atoms + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    held = torch.arange(n) % 10 == 0
    audit = LayerAudit(atoms, bias, lam=0.2, hook_name="planted")
    audit.update(x[~held], z[~held])
    plan = audit.plan()
    plan.update(x, z, held_out=held)
    layer = plan.result()

    pair = next(p for p in layer.pairs if (p.i, p.j) == (0, 1))
    assert pair.kind == "hierarchy" and pair.sample_i
    assert (pair.hull_min, pair.hull_max) == (0.0, 0.0)  # z_1 is 0 wherever feature 0 is off
    page = render_html(AuditResult(layers={"planted": layer}))
    assert 'class="hull"' in page and "hierarchy: ρ = " in page


# ---- terminal ----------------------------------------------------------------------------


def test_terminal_summary_has_one_block_per_layer(result):
    text = render_summary(result)
    assert text.splitlines()[0].startswith(
        "opt_hooks audit: 2 layer(s); certified: 4 feature(s), 2 pair(s), 2 layer finding(s)")
    for hook in result.layers:
        assert f"-- {hook} " in text
    assert "lam         0.04 (estimated from the data)" in text
    assert "features    certified 2  violated 2  satisfied 20  (dead 1)" in text
    assert "certified   C1 0  C2 1  C3 1  C4 1  C5 no  C6 yes" in text
    assert "objective   L 0.5 ± 0.01 per token: MSE 0.2, L1 0.3; L0 3; explained variance 0.9; dead 4.2%" in text
    assert "codes gap   2% of L (± 0.2%; gain 0.01 per token), L0 3 -> 2" in text
    assert "3 -> 5 hierarchy (certified gain 1.00e-04)" in text
    assert text.index("#7 ") < text.index("#3 ") < text.index("#11 ") < text.index("#12 ")


# ---- the pair map (absorption, duplicates, antipodal) ------------------------------------


def _layer_html(page: str, k: int) -> str:
    return page.split(f'<section class="layer" id="layer-{k}">')[1].split("</section>")[0]


def _tree(section: str, parent: int) -> str:
    return section.split(f'<div class="tree" data-parent="{parent}">')[1].split('<div class="tree"')[0]


def test_terminal_shows_absorption_trees_with_their_children(result):
    text = render_summary(result)
    mapped, empty = text.split("-- blocks.1.hook_resid_pre ")
    assert "  absorption  2 tree(s), 3 absorbed child(ren) (label-free: rho >= 0.1, evidence >= 0.5)" in mapped
    lines = mapped.splitlines()
    start = lines.index("    parent 3 (on 60 tokens) absorbed into 2 child(ren):")
    assert lines[start + 1].startswith("      child 7: rho 0.6 / own 0.8, parent off on 89% of 45 tokens, "
                                       "evidence 0.93 ± 0.012, L1 price 0.004")
    assert lines[start + 2].startswith("      child 11: rho 0.8 / own 0.6")
    assert lines[start + 3] == "    parent 12 (on 60 tokens) absorbed into 1 child(ren):"
    assert lines[start + 4].startswith("      child 5: rho 0.5 / own 0.866")
    assert "  duplicates  1 pair(s) to merge (rho >= 0.9): 14 = 15 rho 0.9700, jaccard 0.69" in mapped
    assert "  antipodal   1 pair(s) of dense latents (rho <= -0.9): 16 / 17 rho -0.98, covering 98% of tokens" in mapped
    assert "  absorption  none found (label-free: rho >= 0.1, evidence >= 0.5)" in empty
    assert "  duplicates  none found (rho >= 0.9)" in empty and "  antipodal   none found (rho <= -0.9)" in empty


def test_terminal_and_html_say_why_a_pair_map_is_missing(result):
    layer = result.layers["blocks.1.hook_resid_pre"]
    missing = dataclasses.replace(layer, pair_map={**PAIR_MAP, "available": False}, skipped={"absorption": MAP_OFF})
    text = render_summary(AuditResult(layers={"l": missing}))
    assert f"  absorption  not computed: {MAP_OFF}" in text
    assert "absorption skipped" not in text and "duplicates" not in text  # one line, not three
    section = _layer_html(render_html(AuditResult(layers={"l": missing})), 0)
    assert f"<h3>Absorption map</h3><p>Not computed: {escape(MAP_OFF)}</p>" in section


def test_html_absorption_map_nests_siblings_under_their_parent(result):
    section = _layer_html(render_html(result), 0)
    assert section.index("<h3>Absorption map</h3>") < section.index("Top-activating contexts")
    assert "Label-free (THEORY.md section 6)" in section
    assert "absorption ρ &ge; 0.1" in section and "evidence &ge; 0.5" in section  # the thresholds
    assert "Absorption trees: 2 parent(s), 3 absorbed child(ren)" in section
    assert section.index('data-parent="3"') < section.index('data-parent="12"')  # the costlier tree first
    tree = _tree(section, 3)
    assert re.findall(r'<tr data-child="(\d+)">', tree) == ["7", "11"]  # both siblings, in one tree
    assert re.findall(r'<tr data-child="(\d+)">', _tree(section, 12)) == ["5"]
    assert "total L1 price 0.007" in tree  # 4e-3 + 3e-3
    child = tree.split('<tr data-child="7">')[1].split('<tr data-child="11">')[0]
    # the decoder split: parent part rho^2 = 36% of the 120 px bar, own part the rest, and both numbers
    assert 'width="43.2" height="12" class="split-parent"' in child and 'width="76.8"' in child
    assert "ρ 0.6 | own 0.8" in child
    for cell in ("<td>89%</td>", "0.93 ± 0.012 (n 120)", "<td>0.36</td>", "<td>0.004</td>", "<td>45</td>",
                 "<td>5</td>"):
        assert cell in child, cell
    # contexts of the parent (before its children) and of each child (in its row)
    assert tree.index("context of token 103: the <mark>dog</mark> barks") < tree.index('<tr data-child="7">')
    assert "top contexts of child 7 (2)" in child and "context of token 107: the <mark>dog</mark>" in child
    assert "no contexts kept for child 5" in _tree(section, 12)


def test_html_absorption_map_links_latents_to_neuronpedia_in_a_new_tab(result):
    section = _layer_html(render_html(result), 0)
    tree = _tree(section, 3)
    for latent in (3, 7, 11):
        link = f'href="https://www.neuronpedia.org/gpt2-small/0-res-jb/{latent}" target="_blank" rel="noopener"'
        assert link in tree, latent
    layer = dataclasses.replace(result.layers["blocks.0.hook_resid_pre"], neuronpedia_id=None)
    unlinked = _layer_html(render_html(AuditResult(layers={"l": layer})), 0)
    assert "<h3>Absorption map</h3>" in unlinked and "neuronpedia" not in unlinked


def test_html_lists_duplicates_and_antipodal_pairs(result):
    page = render_html(result)
    section = _layer_html(page, 0)
    duplicates = section.split('<table class="sortable duplicates">')[1].split("</table>")[0]
    cells = re.findall(r'<td data-v="([^"]*)">', duplicates)
    assert cells == ["14", "15", "0.97", "50", "48", "40", repr(40 / 58)]  # i, j, rho, counts, jaccard
    antipodal = section.split('<table class="sortable antipodal">')[1].split("</table>")[0]
    assert re.findall(r'<td data-v="([^"]*)">', antipodal) == ["16", "17", "-0.98", repr(878 / 900), "450", "430", "2"]
    assert "<h4>Duplicates to merge: 1</h4>" in section and "<h4>Antipodal dense pairs: 1</h4>" in section
    empty = _layer_html(page, 1)
    assert "<p>No absorption, duplicate or antipodal pair found.</p>" in empty and "ρ &ge; 0.1" in empty
    assert "sortable duplicates" not in empty


def test_engine_absorption_map_validates_and_renders_as_trees(tmp_path):
    """End to end from the engine: an exactly coded absorbed world has absorption trees of
    siblings; its report.json validates and both renderers put each child under its parent."""
    from opt_hooks.synthetic import absorbed_audit, mixed_world

    layer = absorbed_audit(mixed_world(0), 0.2, n_audit=4000, n_held_out=3000, seed=0).layer
    trees = layer.absorption_trees()
    parent, children = next((p, rows) for p, rows in trees.items() if len(rows) > 1)
    result = AuditResult(layers={"absorbed": layer})
    out = result.save(tmp_path / "out")
    jsonschema.Draft202012Validator(load_schema()).validate(json.loads((out / REPORT_JSON).read_text()))
    tree = _tree(_layer_html((out / REPORT_HTML).read_text(), 0), parent)
    assert re.findall(r'<tr data-child="(\d+)">', tree) == [str(r.child) for r in children]
    lines = render_summary(result).splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"    parent {parent} "))
    assert lines[start + 1].startswith(f"      child {children[0].child}: rho ")


# ---- Neuronpedia -------------------------------------------------------------------------


def test_neuronpedia_links_from_the_sae_lens_registry():
    # The yaml as shipped; found without importing sae_lens, parsed with libyaml (seconds, not a minute).
    registry_file = Path(importlib.util.find_spec("sae_lens").origin).parent / "pretrained_saes.yaml"
    registry = yaml.load(registry_file.read_text(), Loader=yaml.CSafeLoader)
    ids = {
        (release, sae["id"]): sae["neuronpedia"]
        for release, entry in registry.items()
        for sae in entry["saes"]
        if sae.get("neuronpedia")
    }
    assert len(ids) > 1000
    np_id = ids[("gpt2-small-res-jb", "blocks.8.hook_resid_pre")]
    assert feature_url(np_id, 1234) == "https://www.neuronpedia.org/gpt2-small/8-res-jb/1234"
    for np_id in ids.values():  # every registry id has the "<model>/<sae>" form links are built from
        assert re.fullmatch(r"https://www\.neuronpedia\.org/[^/]+/[^/]+/0", feature_url(np_id, 0)), np_id
    np_id = ids[("gpt2-small-res-jb", "blocks.0.hook_resid_pre")]
    assert sae_url(np_id) == "https://www.neuronpedia.org/gpt2-small/0-res-jb"
    with pytest.raises(ValueError, match="<model>/<sae>"):
        feature_url("gpt2-small-res-jb", 3)


# ---- report.html in a real browser -------------------------------------------------------


def _chromium(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI to render report.html")
        pytest.skip("chromium not installed")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        *mode, page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path)


def test_html_runs_without_script_errors_and_sorts(result, tmp_path):
    # Append a probe that clicks the "feature" header of the first feature table twice
    # (ascending, then descending) and records the row order, for --dump-dom to show.
    probe = """<script>
      var table = document.querySelector("table.features"), header = table.tHead.rows[0].cells[0];
      function order() {
        var rows = Array.prototype.slice.call(table.tBodies[0].rows);
        return rows.map(function (r) { return r.cells[0].textContent; }).join(",");
      }
      header.click(); var up = order(); header.click();
      document.body.setAttribute("data-probe", up + "|" + order());
    </script>"""
    page = tmp_path / REPORT_HTML
    page.write_text(render_html(result).replace("</body>", probe + "</body>"))
    run = _chromium(tmp_path, page, "--dump-dom")
    dom = run.stdout
    assert 'data-report-status="ready"' in dom, run.stderr[-3000:]
    assert re.search(r'<pre id="js-errors"></pre>', dom)
    assert 'data-probe="3,7,11,12|12,11,7,3"' in dom
    assert "Uncaught" not in run.stderr, run.stderr[-3000:]


def test_html_screenshot_shows_the_report(result, tmp_path):
    page = tmp_path / REPORT_HTML
    page.write_text(render_html(result))
    run = _chromium(tmp_path, page, "--screenshot=shot.png", "--window-size=1200,900", "--hide-scrollbars")
    shot = tmp_path / "shot.png"
    assert shot.exists(), run.stderr[-3000:]
    width, height, pixels = _decode_png(shot.read_bytes())
    assert (width, height) == (1200, 900)
    colours = {pixels[k : k + 3] for k in range(0, len(pixels), 3 * 7)}  # every 7th pixel
    assert len(colours) > 50  # text, badges and plots, not a blank page
    tier_red = bytes((0xC0, 0x39, 0x2B))  # the certified colour of the tier bars in view
    assert tier_red in {pixels[k : k + 3] for k in range(0, len(pixels), 3)}


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = width * channels
    previous = bytearray(stride)
    rgb = bytearray()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        previous = line
        if channels == 3:
            rgb += line
        else:
            rgb += b"".join(bytes(line[k : k + 3]) for k in range(0, stride, 4))
    return width, height, bytes(rgb)


def test_context_snippets_cover_certified_and_top_ranked_features(monkeypatch, minilm_tokenizer):
    """Snippets are decoded for every certified feature and the top-ranked others, not for every
    feature with a descent (at 24k features that would be 120k decodes)."""
    import torch

    from opt_hooks import run

    with_map = make_result()
    result = make_result()
    for layer in result.layers.values():  # first without the pair map
        layer.absorption, layer.duplicates, layer.antipodal = [], [], []
    windows = torch.randint(1000, 2000, (4, 128), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(run, "CONTEXT_FEATURES", 1)
    texts = run._token_texts(result, windows, minilm_tokenizer)
    # per layer: certified 7 and 3, rank-0 feature 7; violated 11 and 12 (ranks 2, 3) left out; C6's worst tokens
    assert set(texts) == {7, 107, 3, 103, 5, 300}
    assert all("[[" in text and "]]" in text for text in texts.values())
    # the pair map's latents get snippets too, flagged or not
    mapped = {t for layer in with_map.layers.values() for f in run._map_latents(layer) for t in layer.features[f].top_tokens}
    assert mapped - set(texts)  # the fixture's map reaches beyond the flagged features
    assert set(run._token_texts(with_map, windows, minilm_tokenizer)) == set(texts) | mapped
    monkeypatch.setattr(run, "CONTEXT_FEATURES", 4)
    assert set(run._token_texts(result, windows, minilm_tokenizer)) == {7, 107, 3, 103, 11, 111, 12, 112, 5, 300}


# ---- the repair (RepairResult.to_dict() in AuditRecord.repair) -------------------------------


def _side(L: float, dead: int) -> dict:
    return {"L": L, "L_se": 0.01, "mse": L - 0.3, "mse_se": 0.008, "l1": 0.3, "l1_se": 0.002, "l0": 3.0,
            "l0_se": 0.1, "explained_variance": 0.9 if dead else 0.92, "dead": dead}


def _step(name: str, condition: str, applied: bool, gain: float | None, items: list[dict], **extra) -> dict:
    reason = "" if applied else extra.pop("reason", "not significant on the validation tokens")
    return {"round": extra.pop("round", 1), "step": name, "condition": condition, "applied": applied,
            "reason": reason, "gain": gain, "se": None if gain is None else gain / 5,
            "p_value": None if gain is None else 1e-6, "n_tokens": None if gain is None else 400, "items": items,
            **extra}


def make_repair() -> dict:
    """A repair of both fixture layers: layer 0 with an applied step of each exact kind, a refused
    floor (its reason hostile) and a respawn not applied with 25 items; layer 1 with no steps."""
    certified = [{"feature": k, "step": 0.1, "certified_gain": 1e-3, "se": 1e-4, "p_value": 1e-7} for k in (3, 7)]
    merges = [{"keep": 14 + 2 * k, "drop": 15 + 2 * k, "rho": 0.97} for k in range(5)]
    plants = [{"feature": 100 + k, "threshold": 2.5, "scale": 1.1, "audit_gain": 1e-4, "gain": None, "se": None,
               "kept": True} for k in range(20)]
    steps = [
        _step("floor", "C1", False, None, certified[:1], reason=HOSTILE_TEXT),
        _step("bias", "C5", True, 0.0123, [{"step": 0.5, "certified_gain": 0.012, "se": 1e-3, "p_value": 1e-9}]),
        _step("atoms", "C3", True, 0.00456, certified),
        _step("codes", "C4", True, 0.00789, [{**c, "factor": 1.1} for c in certified]),
        _step("respawn", "duplicates + C6", False, 0.0011, merges + plants, merge_only_gain=-0.0022,
              merge_only_se=0.0004),
    ]
    table = {
        "blocks.0.hook_resid_pre": {"before": _side(0.5, 1), "after": _side(0.4762, 0),
                                    "change": {"L": -0.0238, "se": 0.0031, "p_value": 2e-12},
                                    "n_tokens": 300, "lam": 0.04, "objective": "mse + lam * l1"},
        "blocks.1.hook_resid_pre": {"before": _side(0.6, 0), "after": _side(0.6, 0),
                                    "change": {"L": 0.0, "se": 0.0, "p_value": None},
                                    "n_tokens": 300, "lam": 0.04, "objective": "mse + lam * l1"},
    }
    meta = {"source": "text", "n_tokens": 2048, "held_out": 0.2, "test_tokens": 384, "audit_held_out": 0.25}
    return {"meta": meta, "table": table, "changes": {"blocks.0.hook_resid_pre": steps, "blocks.1.hook_resid_pre": []}}


@pytest.fixture
def repaired() -> AuditResult:
    result = make_result()
    result.repair = make_repair()
    return result


def _repair_html(page: str) -> str:
    return page.split('<section id="repair">')[1].split("</section>")[0]


def test_repair_report_json_matches_schema_and_round_trips(repaired, tmp_path):
    out = write_report(repaired, tmp_path / "out")
    report = json.loads((out / REPORT_JSON).read_text())
    jsonschema.Draft202012Validator(load_schema()).validate(report)
    assert report["repair"] == make_repair()
    assert AuditResult.from_dict(report).repair == make_repair()
    assert "repair" not in make_result().to_dict()  # an audit alone has none


@pytest.mark.parametrize(
    "break_it",
    [
        lambda r: r.update(extra=1),
        lambda r: r.pop("changes"),
        lambda r: r["table"]["blocks.0.hook_resid_pre"]["before"].pop("L"),
        lambda r: r["table"]["blocks.0.hook_resid_pre"]["after"].update(dead=-1),
        lambda r: r["table"]["blocks.0.hook_resid_pre"]["change"].update(L="lower"),
        lambda r: r["changes"]["blocks.0.hook_resid_pre"][1].update(applied="yes"),
        lambda r: r["changes"]["blocks.0.hook_resid_pre"][1].update(step="polish"),
        lambda r: r["changes"]["blocks.0.hook_resid_pre"][2].pop("reason"),
        lambda r: r["changes"]["blocks.0.hook_resid_pre"][2].update(items={"feature": 3}),
    ],
)
def test_schema_rejects_broken_repairs(repaired, break_it):
    report = json.loads(json.dumps(repaired.to_dict()))
    validator = jsonschema.Draft202012Validator(load_schema())
    validator.validate(report)
    break_it(report["repair"])
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(report)


def test_terminal_repair_shows_before_after_and_every_step():
    from opt_hooks.report.terminal import render_repair

    text = render_repair(make_repair())
    lines = text.splitlines()
    assert lines[0] == "opt_hooks repair: 2 layer(s); L lower on the test tokens in 1 of 2; 3 of 5 step(s) applied"
    first, second = text.split("-- blocks.1.hook_resid_pre ")
    assert "-- blocks.0.hook_resid_pre " in first
    assert "  test        300 tokens neither the audit nor the repair read; objective mse + lam * l1 (lam 0.04)" in first
    header = next(line for line in lines if "before" in line)
    assert header.split() == ["before", "after", "change"]
    assert "  L           0.5 ± 0.01         0.4762 ± 0.01      -0.0238 ± 0.0031 (p 2.00e-12)" in first
    assert "  dead        1                  0                  -1" in first
    assert "    bias       C5              applied     gain 0.0123 ± 0.00246 (p 1.00e-06), 1 item(s)" in first
    assert "    codes      C4              applied     gain 0.00789 ± 0.00158 (p 1.00e-06), 2 item(s)" in first
    assert f"    floor      C1              not applied, 1 item(s): {HOSTILE_TEXT}" in first
    respawn = next(line for line in lines if line.startswith("    respawn "))
    assert "not applied gain 0.0011 ± 2.20e-04" in respawn and "5 merge(s), 20 resampled latent(s);" in respawn
    assert "merges alone -0.0022 ± 4.00e-04: not significant on the validation tokens" in respawn
    assert "kept" not in respawn  # a step not applied keeps none of its latents
    assert "    none: the audit certified nothing the repair could write" in second
    # a second round's steps carry their round; JSON's view of the dict renders the same
    two = make_repair()
    two["changes"]["blocks.1.hook_resid_pre"] = [_step("bias", "C5", True, 0.001, [{}], round=2)]
    assert "    r2 bias    C5              applied     gain 0.001" in render_repair(two)
    assert render_repair(json.loads(json.dumps(make_repair()))) == text


def test_html_repair_section(repaired):
    page = render_html(repaired)
    assert '<a href="#overview">overview</a> <a href="#repair">repair</a>' in page
    assert page.index('<section id="overview">') < page.index('<section id="repair">') < page.index('id="layer-0"')
    section = _repair_html(page)
    assert "<h2>Repair</h2>" in section and "test tokens, which neither the audit nor the repair read" in section
    blocks = re.findall(r'<div class="repair-layer" data-hook="([^"]+)">', section)
    assert blocks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    layer0 = section.split('data-hook="blocks.0.hook_resid_pre">')[1].split('data-hook="blocks.1.hook_resid_pre">')[0]
    table = layer0.split('<table class="repair-table">')[1].split("</table>")[0]
    assert "<th>before</th><th>after</th><th>change</th>" in table
    assert ('<tr><td class="text"><b>L</b></td><td>0.5 ± 0.01</td><td>0.4762 ± 0.01</td>'
            "<td>-0.0238 ± 0.0031 (p 2.00e-12)</td></tr>") in table
    assert "<td>-1</td>" in table.split("<b>dead</b>")[1]
    steps = layer0.split('<table class="repair-steps">')[1]
    rows = re.findall(r'<tr><td class="text"><abbr title="[^"]*">(\w+)</abbr>.*?</tr>', steps)
    assert rows == ["floor", "bias", "atoms", "codes", "respawn"]
    assert steps.count('<span class="badge applied">yes</span>') == 3
    assert steps.count('<span class="badge not-applied">no</span>') == 2
    assert '<td data-v="0.0123">0.0123</td>' in steps  # the validation gain, sortable by its exact value
    assert HOSTILE_TEXT not in page and escape(HOSTILE_TEXT) in steps  # the reason, escaped
    assert "merges alone: gain -0.0022 ± 4.00e-04" in steps
    # every step's items folded below it, the first 20 of the respawn's 25
    folded = re.findall(r'<details class="items"><summary>([^<]+)</summary>', steps)
    assert folded == ["1 item(s)", "1 item(s)", "2 item(s)", "2 item(s)", "first 20 of 25 items"]
    respawn = steps.split("first 20 of 25 items")[1].split("</details>")[0]
    assert respawn.count("<tr>") == 21  # header + 20 items
    assert "<th class=\"text\">keep</th>" in respawn and "<th class=\"num\">threshold</th>" in respawn
    assert "5 more items in report.json" in respawn
    assert 'href="https://www.neuronpedia.org/gpt2-small/0-res-jb/14"' in respawn  # latents link like the rest
    layer1 = section.split('data-hook="blocks.1.hook_resid_pre">')[1]
    assert "None: the audit certified nothing the repair could write." in layer1
    plain = render_html(make_result())  # an audit alone: no section, no link
    assert 'id="repair"' not in plain and 'href="#repair"' not in plain


def test_html_with_a_repair_runs_without_script_errors(repaired, tmp_path):
    page = tmp_path / REPORT_HTML
    page.write_text(render_html(repaired))
    run = _chromium(tmp_path, page, "--dump-dom")
    assert 'data-report-status="ready"' in run.stdout, run.stderr[-3000:]
    assert re.search(r'<pre id="js-errors"></pre>', run.stdout)
