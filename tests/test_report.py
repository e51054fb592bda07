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
from html import escape, unescape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from opt_hooks.report import REPORT_HTML, REPORT_JSON, load_schema, render_html, render_summary, write_report
from opt_hooks.report.neuronpedia import feature_url, quick_list_url, sae_url
from opt_hooks.report.terminal import ROWS_LINES, ROWS_TEXT
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


PAIR_MAP = {"available": True, "rho_spread": 0.02, "rho_min": 0.1, "min_evidence": 0.5, "max_parent_cv": 0.5,
            "duplicate_rho": 0.9,
            "antipodal_rho": 0.9, "neighbours": 8, "measured_pairs": 40, "absorption_score": 0.125,
            "absorption_score_se": 0.0123, "scored_latents": 23, "absorbing_latents": 5}
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
    # whole words at both ends (a leading space, a closing period): the page keeps every word
    texts = {k: f" context of token {k}: the [[dog]] barks." for k in (3, 7, 11, 12, 103, 107, 111, 112, 300)}
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
        # a feature's check in full is a certified one; a verdict is not certified
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["features"][3]["certificates"]["C4"].update(tier="violated"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["features"][11]["certificates"]["C4"].update(tier="certified"),
        lambda r: r["layers"]["blocks.0.hook_resid_pre"]["features"][11]["certificates"]["C4"].update(step=0.1),
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
    """Every DataFrame row is its report.json row (nested certificates and context codes left out, conditions joined),
    in report.json's order, for every layer; the result's frame stacks the layers' with hook and sae_id."""
    import math

    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    frame = result.to_pandas(table)
    expected = []
    for hook, layer in report["layers"].items():
        for row in layer[table]:
            # nested records and a feature's per-context codes (lists of lists) are not columns
            row = {k: v for k, v in row.items() if k not in ("certificates", "certificate", "top_context_values")}
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


def test_report_json_keeps_certified_checks_whole_and_the_verdict_of_the_others(result, tmp_path):
    """A feature's certified check is in report.json in full; a violated one as its tier and reason,
    its best one getting back its held-out numbers from the row; every field of both stays in the
    parquet tables."""
    import pandas as pd

    out = result.save(tmp_path / "out")
    report = json.loads((out / REPORT_JSON).read_text())
    rows = report["layers"]["blocks.0.hook_resid_pre"]["features"]
    layer = result.layers["blocks.0.hook_resid_pre"]
    assert rows[3]["certificates"]["C2"] == json.loads(json.dumps(dataclasses.asdict(layer.features[3].certificates["C2"])))
    assert rows[11]["certificates"] == {"C4": {"tier": "violated", "reason": "held-out descent not significant"}}
    again = AuditResult.from_dict(report).layers["blocks.0.hook_resid_pre"]
    assert again.features[3] == layer.features[3]
    kept, full = again.features[11].certificates["C4"], layer.features[11].certificates["C4"]
    for name in ("condition", "tier", "reason", "held_out", "held_out_se", "p_value", "gain", "share", "n_audit",
                 "n_held_out"):
        assert getattr(kept, name) == getattr(full, name), name
    assert (kept.step, kept.measured) == (None, None) and full.measured is not None
    features = pd.read_parquet(out / "tables" / "blocks.0.hook_resid_pre" / "features.parquet").set_index("id")
    assert (features.loc[11, "C4_step"], features.loc[11, "C4_measured"]) == (full.step, full.measured)


# The size budget of report.json (docs/REPORT.md): at most this many bytes per feature, everything
# in the file included, for a record shaped like an audit of wide SAEs.
REPORT_BYTES_PER_FEATURE = 900


def _wide_layer(hook: str, n_features: int, rng) -> LayerResult:
    """An audit's layer at full width: 2% of the features certified (one certified check, one
    violated), 90% violated (C3 and C4 not confirmed held out: what an SGD-trained SAE shows, docs/REPORT.md),
    the rest satisfied, 1% of those dead; every live feature with 5 top tokens; 20 flagged pairs with
    their scatter samples, 0.25 absorption rows and 0.1 duplicate pairs per feature, C5 and C6.
    Numbers are random floats, so they print at full precision as an audit's do."""
    def check(condition: str, tier: str) -> CertificateCheck:
        held_out = -rng.random() * 1e-4
        return CertificateCheck(
            condition, rng.random(), -rng.random() * 1e-3, -rng.random() * 1e-3, held_out, rng.random() * 1e-4,
            rng.random(), -held_out, rng.random() * 0.1, tier,
            "" if tier == "certified" else "held-out descent not significant", 1_800_000, 200_000,
            rng.randrange(30, 5000),
        )

    features = []
    for k in range(n_features):
        draw = rng.random()
        if draw < 0.02:
            checks = {"C3": check("C3", "certified"), "C4": check("C4", "violated")}
        elif draw < 0.92:
            checks = {"C3": check("C3", "violated"), "C4": check("C4", "violated")}
        else:
            checks = {}
        dead = draw > 0.99
        best = checks.get("C3")
        features.append(FeatureRow(
            id=k, tier=best.tier if best else "satisfied", conditions=list(checks), active_count=rng.randrange(1, 10**5),
            mean_code=rng.random(), max_code=rng.random() * 10, min_code=0.0, c3_size=rng.random(),
            c4_gain=rng.random() * 1e-3, c4_size=rng.random(), gain=best.gain if best else None,
            gain_se=best.held_out_se if best else None, p_value=best.p_value if best else None, value=rng.random() * 1e-2,
            share=best.share if best else None, certificates=checks,
            top_tokens=[] if dead else [rng.randrange(2_000_000) for _ in range(5)],
            top_values=[] if dead else [rng.random() * 10 for _ in range(5)],
        ))
    pairs = [PairRow(i=rng.randrange(n_features), j=rng.randrange(n_features), kind="hierarchy", rho=rng.random(),
                     bound=rng.random(), threshold=rng.random(), margin=rng.random(), relative_margin=rng.random(),
                     count_i=rng.randrange(10**5), count_j=rng.randrange(10**5), co_count=rng.randrange(10**5),
                     p_j_without_i_upper=rng.random(), tier="violated", certificate=check("C2", "violated"),
                     sample_i=[rng.random() for _ in range(400)], sample_j=[rng.random() for _ in range(400)],
                     hull_min=0.0, hull_max=rng.random()) for _ in range(20)]
    absorption = [AbsorptionRow(
        parent=rng.randrange(n_features), child=rng.randrange(n_features), rho=rng.random(), own_part=rng.random(),
        count_parent=rng.randrange(10**5), count_child=rng.randrange(10**5), co_count=rng.randrange(10**4),
        fraction=rng.random(), l1_price=rng.random() * 1e-4, evidence=rng.random(), evidence_se=rng.random() * 0.1,
        evidence_p=rng.random(), n_evidence=rng.randrange(10**4), reverse_evidence=rng.random(),
    ) for _ in range(n_features // 4)]
    duplicates = [DuplicateRow(rng.randrange(n_features), rng.randrange(n_features), 0.9 + rng.random() / 10,
                               rng.randrange(10**5), rng.randrange(10**5), rng.randrange(10**4), rng.random())
                  for _ in range(n_features // 10)]
    worst = [rng.randrange(2_000_000) for _ in range(256)]
    layer = _layer(hook, None, exact=True)
    return dataclasses.replace(
        layer, d_in=768, d_sae=n_features, n_tokens=1_800_000, n_held_out=200_000, features=features, pairs=pairs,
        layer_conditions={"C5": {**layer.layer_conditions["C5"], "certificate": check("C5", "certified"),
                                 "tier": "certified"},
                          "C6": {**layer.layer_conditions["C6"], "worst_tokens": worst,
                                 "worst_rnorms": [rng.random() * 100 for _ in worst]}},
        absorption=absorption, duplicates=duplicates, dead_features=[f.id for f in features if not f.top_tokens],
    )


def test_report_json_of_a_24576_feature_layer_stays_under_its_budget():
    """One layer of 24,576 features (a GPT-2 small residual SAE), with its share of the token
    snippets: report.json stays under REPORT_BYTES_PER_FEATURE bytes per feature and is written in
    seconds. Layers are independent entries of report.json, so 12 such layers take 12 times this
    (docs/REPORT.md: 12 x 24,576 features measured at 243 MB)."""
    import random
    import time

    from opt_hooks.records import dumps

    rng = random.Random(0)
    width = 24_576
    layer = _wide_layer("blocks.8.hook_resid_pre", width, rng)
    # the engine decodes snippets for certified features, the top 200 ranked and the pair map's
    # first latents (run.CONTEXT_FEATURES, CONTEXT_MAP_ROWS) and C6's worst tokens: about 4,000 a layer
    texts = {rng.randrange(2_000_000): "x" * 60 + "[[ dog]] barks" for _ in range(4_000)}
    record = AuditResult(layers={layer.hook_name: layer}, meta={"model": "gpt2", "n_tokens": 2_000_000},
                         token_texts=texts)
    started = time.perf_counter()
    text = dumps(record)
    seconds = time.perf_counter() - started
    assert len(text) <= REPORT_BYTES_PER_FEATURE * width, f"{len(text) / width:.0f} bytes per feature"
    assert seconds < 20, f"report.json took {seconds:.1f} s to write"
    rows = json.loads(text)["layers"][layer.hook_name]["features"]
    assert len(rows) == width and sum(1 for f in rows if f["tier"] == "certified") > 0.01 * width


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
    assert page.count('<table class="sortable features paged"') == 2  # rows drawn by report.js from the data
    assert page.count('<table class="sortable pairs">') == 2
    assert page.count("class=\"threshold\"") == 4  # one scatter per flagged pair, threshold line drawn
    assert "hierarchy: ρ = 0.31" in page and "[1, 1.58]" in page  # rho stated, hull interval marked
    assert "L1 surrogate (topk)" in page and "not proofs about its own objective" in page
    assert f" context of token 103: the {_shaded(1.5, 2.3)}dog</mark> barks." in page  # top contexts, token shaded
    assert HOSTILE_TEXT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('data-report-status="loading"') == 1


@pytest.mark.parametrize(
    "text, shown",
    [
        (" the [[dog]] barks.", " the <mark>dog</mark> barks."),
        # a window's edges may cut words: the first and last are dropped (an ellipsis says so)
        ("ing the [[dog]] barks lou", '<span class="cut">…</span> the <mark>dog</mark> barks<span class="cut">…</span>'),
        # ... but not the token's own word, nor a side that ends in punctuation or starts a document
        ("<|endoftext|>writ[[ing]]s.", "&lt;|endoftext|&gt;writ<mark>ing</mark>s."),
        (" x = a[[0]] + b[[i]] [[)]]\n", ' x = a[[0]] + b[[i]] <mark>)</mark><span class="nl">↵</span>'),  # code before it
        ("no marker <here>", "no marker &lt;here&gt;"),
    ],
)
def test_context_snippets_mark_the_token(text, shown):
    from opt_hooks.report.html import _context

    assert _context(text) == shown


def _shaded(value: float, scale: float) -> str:
    """The mark of a top token: shaded by its activation's share of the feature's largest."""
    share = value / scale
    tip = f"activation {value:.3g}: {share:.0%} of the feature&#x27;s largest ({scale:.3g})"
    return f'<mark class="act" style="--act:{share:.2f}" title="{tip}">'


def test_context_shading_is_the_activation_over_the_features_largest():
    from opt_hooks.report.html import _context

    assert _context(" the [[dog]] barks.", 1.5, 2.0) == f" the {_shaded(1.5, 2.0)}dog</mark> barks."
    assert "--act:1.00" in _context(" [[dog]].", 3.0, 2.0)  # a share, never above 1


def _feature_data(page: str, k: int) -> dict:
    block = re.search(rf'<script type="application/json" class="feature-data" data-layer="{k}">(.*?)</script>', page)
    return json.loads(block.group(1))


def test_html_feature_table_ranks_by_tier_then_held_out_gain(result):
    """The table's data (report.js draws its rows) holds every feature: those with a descent in
    the ranking's order, then the others by id."""
    page = render_html(result)
    rows = _feature_data(page, 0)["rows"]
    assert [row[0] for row in rows] == [7, 3, 11, 12] + [k for k in range(24) if k not in (3, 7, 11, 12)]
    assert '<table class="sortable features paged" data-layer="0" data-np="gpt2-small/0-res-jb">' in page


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
    assert "    score 0.125 ± 0.0123 over 23 leaning latents (the layer's label-free absorption score" in mapped
    lines = mapped.splitlines()
    start = lines.index("    parent 3 (on 60 tokens) absorbed into 2 child(ren):")
    assert lines[start - len(ROWS_LINES):start] == [f"    {line}" for line in ROWS_LINES]  # what a row is worth, above the trees
    assert ROWS_LINES[0] not in empty
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
    assert escape(ROWS_TEXT) in section and escape(ROWS_TEXT) not in _layer_html(render_html(result), 1)
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
    assert tree.index(f"context of token 103: the {_shaded(1.5, 2.3)}dog</mark>") < tree.index('<tr data-child="7">')
    assert "top contexts of child 7 (2)" in child and f"context of token 107: the {_shaded(1.5, 2.7)}dog</mark>" in child
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


def _quick_list(url: str) -> tuple[str, list[dict]]:
    """(name, features) of a Neuronpedia quick-list URL."""
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "www.neuronpedia.org", "/quick-list/")
    query = parse_qs(parts.query)
    return query["name"][0], json.loads(query["features"][0])


def test_neuronpedia_quick_list_url_lists_features_across_saes():
    url = quick_list_url("pair 3 -> 5 & more", [("gpt2-small/0-res-jb", 3), ("gpt2-small/8-res-jb", 5)])
    assert "&features=%5B%7B%22modelId%22%3A%22gpt2-small%22%2C%22layer%22%3A%220-res-jb%22" in url  # JSON, encoded
    assert _quick_list(url) == ("pair 3 -> 5 & more", [{"modelId": "gpt2-small", "layer": "0-res-jb", "index": "3"},
                                                       {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "5"}])
    with pytest.raises(ValueError, match="<model>/<sae>"):
        quick_list_url("x", [("gpt2-small-res-jb", 3)])


def test_html_top_findings_rank_every_layers_certified_findings(result):
    """Before the overview: every layer's certified features and layer findings by held-out gain,
    features with their strongest context shaded, a quick list per layer with dashboards."""
    page = render_html(result)
    assert page.index('<section id="findings">') < page.index('<section id="overview">')
    section = page.split('<section id="findings">')[1].split("</section>")[0]
    rows = section.split('<table class="sortable top-findings">')[1].split("<tbody>")[1].split("</tr>")[:-1]
    findings = [re.search(r'<td class="text">(feature |layer: )(?:<a [^>]*>)?(\w+)', row).group(2) for row in rows]
    layers = [re.search(r'<a href="#layer-(\d)">', row).group(1) for row in rows]
    # C6 gains 2e-3 in both layers, feature 7 7.2e-4, feature 3 3.6e-4 (ties: layer order)
    assert list(zip(layers, findings)) == [("0", "C6"), ("1", "C6"), ("0", "7"), ("1", "7"), ("0", "3"), ("1", "3")]
    assert "6 certified finding(s) in 2 layer(s)" in section
    assert f" context of token 7: the {_shaded(2.0, 2.7)}dog</mark> barks." in rows[2]
    links = re.findall(r'<p class="quick-lists">(.*?)</p>', section)
    url = unescape(re.search(r'href="([^"]+)"', links[0]).group(1))
    assert _quick_list(url) == ("blocks.0.hook_resid_pre: top certified",
                                [{"modelId": "gpt2-small", "layer": "0-res-jb", "index": str(k)} for k in (7, 3)])
    assert "blocks.1.hook_resid_pre" not in links[0]  # no dashboards for the second layer
    none = dataclasses.replace(result.layers["blocks.1.hook_resid_pre"], features=[_feature(k) for k in range(24)],
                               layer_conditions={})
    assert "No certified finding in any layer" in render_html(AuditResult(layers={"l": none}))


def test_html_quick_lists_for_pairs_trees_and_map_rows(result):
    """Each flagged pair, absorption tree, duplicate and antipodal pair links its latents as one
    Neuronpedia quick list (report.js writes the URL from the link's data), in a new tab."""
    section = _layer_html(render_html(result), 0)
    lists = re.findall(r'<a class="quick-list" data-np="gpt2-small/0-res-jb" data-name="([^"]+)" '
                       r'data-features="([^"]+)" target="_blank" rel="noopener">', section)
    prefix = "blocks.0.hook_resid_pre: "
    assert lists == [(prefix + "hierarchy pair 3 -&gt; 5", "3 5"), (prefix + "complementary pair 9 -&gt; 3", "9 3"),
                     (prefix + "absorption tree of 3", "3 7 11"), (prefix + "absorption tree of 12", "12 5"),
                     (prefix + "duplicates 14 = 15", "14 15"), (prefix + "antipodal 16 / 17", "16 17")]
    assert 'class="quick-list"' not in _layer_html(render_html(result), 1)  # no dashboards, no lists


# ---- report.html in a real browser -------------------------------------------------------


# Load-time bounds of a layer of 24,576 features in headless Chromium (the test below), about 5x
# what 2 shared CPU cores measured (docs/REPORT.md): from navigation to the page's "ready", and
# the table's parse of its rows and drawing of its first page (data-loaded).
READY_MS = 8_000
PARSE_MS = 3_000


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


def test_html_quick_list_links_and_scatter_zoom_in_chromium(result, tmp_path):
    """In the browser: the script writes each quick-list link's URL from its latents; dragging a
    box over a pair scatter's upper right quarter shows exactly the points inside it, with the axes
    relabelled; a double click brings the whole plot back."""
    probe = """<script>(function () {
      var out = {};
      out.links = Array.prototype.map.call(document.querySelectorAll("a.quick-list[data-features]"),
                                           function (a) { return a.href; });
      var svg = document.querySelector("svg.scatter"), box = svg.getBoundingClientRect();
      function mouse(type, x, y) {
        svg.dispatchEvent(new MouseEvent(type, { clientX: box.left + x, clientY: box.top + y, bubbles: true }));
      }
      mouse("mousedown", 167, 26); mouse("mousemove", 300, 111); mouse("mouseup", 300, 111);
      function shown() {
        return Array.prototype.filter.call(svg.querySelectorAll("circle"), function (c) { return c.style.display !== "none"; })
          .map(function (c) { return [Number(c.getAttribute("data-x")), Number(c.getAttribute("data-y"))]; });
      }
      out.domain = svg.getAttribute("data-domain"); out.zoomed = shown();
      out.x_hi = svg.querySelector(".x-hi").textContent;
      mouse("dblclick", 100, 100); out.reset = shown().length; out.reset_x_hi = svg.querySelector(".x-hi").textContent;
      document.body.setAttribute("data-probe", JSON.stringify(out));
    })();</script>"""
    page = tmp_path / REPORT_HTML
    page.write_text(render_html(result).replace("</body>", probe + "</body>"))
    run = _chromium(tmp_path, page, "--dump-dom")
    assert 'data-report-status="ready"' in run.stdout, run.stderr[-3000:]
    out = json.loads(unescape(re.search(r'data-probe="([^"]*)"', run.stdout).group(1)))
    lists = [_quick_list(url) for url in out["links"]]
    assert [(name.split(": ")[1], [int(f["index"]) for f in features]) for name, features in lists] == [
        ("hierarchy pair 3 -> 5", [3, 5]), ("complementary pair 9 -> 3", [9, 3]), ("absorption tree of 3", [3, 7, 11]),
        ("absorption tree of 12", [12, 5]), ("duplicates 14 = 15", [14, 15]), ("antipodal 16 / 17", [16, 17])]
    assert all(f["modelId"] == "gpt2-small" and f["layer"] == "0-res-jb" for _, features in lists for f in features)
    x0, x1, y0, y1 = map(float, out["domain"].split())
    pair = result.layers["blocks.0.hook_resid_pre"].ranked_pairs()[0]  # the first figure: 3 -> 5, hierarchy
    points = [(float(f"{x:.4g}"), float(f"{y:.4g}")) for x, y in zip(pair.sample_i, pair.sample_j)]
    inside = [[x, y] for x, y in points if x0 <= x <= x1 and y0 <= y <= y1]
    assert x0 > 0 and y0 > 0 and 0 < len(inside) < len(points) and out["zoomed"] == inside
    assert out["x_hi"] == f"{x1:.3g}" and out["reset"] == len(points) and out["reset_x_hi"] == "2.57"


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


# Console calls during the page's life, kept for the probe (the page's own handler records only
# uncaught errors): inserted before report.js so that it sees every call.
CONSOLE_PROBE = """<script>window.consoleCalls = [];
  ["error", "warn"].forEach(function (kind) {
    var original = console[kind];
    console[kind] = function () {
      window.consoleCalls.push(kind + ": " + Array.prototype.join.call(arguments, " "));
      original.apply(console, arguments);
    };
  });</script>"""

# Drives layer 0's feature table and its C3 histogram as a reader would (controls, header clicks,
# a row click, a drag and a double click), and writes what it saw into data-probe as JSON.
TABLE_PROBE = """<script>(function () {
  var out = {}, controls = document.querySelector('.table-controls[data-layer="0"]');
  var table = document.querySelector('table.features[data-layer="0"]'), status = controls.querySelector(".page-status");
  function ids() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return Number(r.cells[0].textContent); });
  }
  function use(selector, type, value) {
    var node = controls.querySelector(selector);
    if (value !== undefined) node.value = value;
    node.dispatchEvent(new Event(type, { bubbles: true }));
  }
  function click(selector) { controls.querySelector(selector).click(); }
  out.loaded_ms = table.hasAttribute("data-loaded") ? Number(table.getAttribute("data-loaded")) : null;
  use(".page-size", "change", "50");
  out.first = ids(); out.status = status.textContent;
  click(".page-next"); out.second = ids();
  click(".page-last"); out.last = ids(); out.last_status = status.textContent;
  out.quick_list = controls.querySelector(".page-quick-list").href;
  use(".feature-search", "input", "100-109"); out.search = ids(); out.search_status = status.textContent;
  use(".feature-search", "input", "dog"); out.bad = status.textContent;
  use(".feature-search", "input", "");
  use(".tier-filter", "change", "certified"); out.certified = ids(); out.certified_status = status.textContent;
  table.tBodies[0].rows[0].cells[2].click();
  var detail = table.tBodies[0].rows[1];
  out.detail = detail.className + ": " + detail.textContent;
  out.detail_marks = detail.querySelectorAll("mark.act").length;
  use(".condition-filter", "change", "C4"); out.certified_c4 = status.textContent;
  use(".condition-filter", "change", ""); use(".tier-filter", "change", "all"); out.all_status = status.textContent;
  var gain = table.tHead.rows[0].cells[3];
  gain.click(); gain.click(); out.by_gain = ids();
  var svg = document.querySelector('svg.histogram[data-layer="0"]'), box = svg.getBoundingClientRect();
  function mouse(type, x) {
    svg.dispatchEvent(new MouseEvent(type, { clientX: box.left + x, clientY: box.top + 60, bubbles: true }));
  }
  mouse("mousedown", 40); mouse("mousemove", 165); mouse("mouseup", 165);  // the plot's left half: C3 in [0, 0.5]
  out.zoom = svg.getAttribute("data-range");
  mouse("dblclick", 100); out.zoom_reset = svg.getAttribute("data-range");
  out.console = window.consoleCalls;
  document.body.setAttribute("data-probe", JSON.stringify(out));
})();</script>"""


def test_html_pages_searches_and_filters_24576_features_in_chromium(tmp_path):
    """One layer of 24,576 features shaped like an audit's (`_wide_layer`: 2% certified, 90%
    violated): the page loads in headless Chromium without a console message or script error,
    within READY_MS, its table draws pages of rows from the data, pages, searches ids, filters
    tiers and conditions, sorts, opens a row's certificates and shaded contexts, links a page's
    features as a Neuronpedia quick list, and the C3 histogram zooms."""
    import random

    from opt_hooks.report.html import _compact

    width, page_rows = 24_576, 50
    layer = dataclasses.replace(_wide_layer("blocks.8.hook_resid_pre", width, random.Random(1)),
                                neuronpedia_id="gpt2-small/8-res-jb")
    flagged = layer.flagged()
    # snippets as run.py decodes them: certified features and the top 200 ranked
    with_texts = {i for rank, i in enumerate(flagged) if rank < 200 or layer.features[i].tier == "certified"}
    texts = {t: " the dog[[ barks]] at night." for i in with_texts for t in layer.features[i].top_tokens}
    html = render_html(AuditResult(layers={layer.hook_name: layer}, meta={"model": "gpt2"}, token_texts=texts))
    assert len(html) < 250 * width, f"{len(html) / width:.0f} bytes per feature"
    html = html.replace('<body data-report-status="loading">', '<body data-report-status="loading">' + CONSOLE_PROBE)
    page = tmp_path / REPORT_HTML
    page.write_text(html.replace("</body>", TABLE_PROBE + "</body>"))
    run = _chromium(tmp_path, page, "--dump-dom", "--window-size=1400,1000")
    dom = run.stdout
    assert 'data-report-status="ready"' in dom, run.stderr[-3000:]
    assert re.search(r'<pre id="js-errors"></pre>', dom) and "Uncaught" not in run.stderr, run.stderr[-3000:]
    ready_ms = int(re.search(r'data-ready-ms="(\d+)"', dom).group(1))
    out = json.loads(unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert out["console"] == []
    # the table is in view at load: its rows are parsed and its first page drawn before "ready"
    assert out["loaded_ms"] is not None and ready_ms < READY_MS and out["loaded_ms"] < PARSE_MS, (ready_ms, out)

    n = len(flagged)
    assert out["first"] == flagged[:page_rows] and out["second"] == flagged[page_rows:2 * page_rows]
    assert out["status"].strip() == f"1–{page_rows} of {n:,} ({width:,} features)"
    last = (n - 1) // page_rows * page_rows
    assert out["last"] == flagged[last:] and out["last_status"].startswith(f" {last + 1:,}–{n:,} of {n:,}")
    assert _quick_list(out["quick_list"]) == (
        "blocks.8.hook_resid_pre: features",
        [{"modelId": "gpt2-small", "layer": "8-res-jb", "index": str(i)} for i in flagged[last:][:25]])

    searched = [i for i in flagged if 100 <= i <= 109]
    hidden = sum(1 for i in range(100, 110) if layer.features[i].tier == "satisfied")
    assert hidden and out["search"] == searched
    assert f"{hidden} matching id(s) hidden by the tier or condition filter" in out["search_status"]
    assert out["bad"].startswith(" not a list of ids")
    certified = [i for i in flagged if layer.features[i].tier == "certified"]
    assert out["certified"] == certified[:page_rows] and f" of {len(certified):,} (" in out["certified_status"]
    with_c4 = [i for i in certified if "C4" in layer.features[i].conditions]
    assert f" of {len(with_c4):,} (" in out["certified_c4"]
    assert f" of {width:,} (" in out["all_status"]
    # the row's details: its certified check in full, the other as its verdict, 5 shaded contexts
    assert out["detail"].startswith("detail: ") and "C3 step " in out["detail"] and "held-out (p " in out["detail"]
    assert "C4 violated: held-out descent not significant" in out["detail"] and out["detail_marks"] == 5
    # the held-out gain, largest first (missing last; ties keep the ranking's order)
    order = flagged + [f.id for f in layer.features if f.tier == "satisfied"]
    gains = {f.id: _compact(f.gain) for f in layer.features}
    by_gain = sorted(range(width), key=lambda r: (gains[order[r]] is None, -(gains[order[r]] or 0), r))
    assert out["by_gain"] == [order[r] for r in by_gain[:page_rows]]
    # the zoomed histogram counts the live features' C3 sizes in [0, 0.5]
    dead = set(layer.dead_features)
    sizes = [_compact(f.c3_size) for f in layer.features if f.id not in dead]
    lo, hi, count = map(float, out["zoom"].split())
    assert lo == 0 and abs(hi - 0.5) < 0.01 and count == sum(1 for v in sizes if v is not None and lo <= v <= hi)
    assert out["zoom_reset"] is None


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
    shown = lambda record: {key: run._context_features(layer) for key, layer in record.layers.items()}  # noqa: E731
    texts, pieces = run._token_texts(result, windows, minilm_tokenizer, shown(result))
    # per layer: certified 7 and 3, rank-0 feature 7; violated 11 and 12 (ranks 2, 3) left out; C6's worst tokens
    assert set(texts) == {7, 107, 3, 103, 5, 300}
    assert all("[[" in text and "]]" in text for text in texts.values()) and set(pieces) == set(texts)
    for token, (parts, at) in pieces.items():  # the snippet, token by token, the token at `at`
        left, _, rest = texts[token].rpartition("[[")
        mid, _, right = rest.partition("]]")
        assert parts[at] == mid and len(parts) <= run.CONTEXT_BEFORE + 1 + run.CONTEXT_AFTER
    # the pair map's latents get snippets too, flagged or not
    mapped = {t for layer in with_map.layers.values() for f in run._map_latents(layer) for t in layer.features[f].top_tokens}
    assert mapped - set(texts)  # the fixture's map reaches beyond the flagged features
    assert set(run._token_texts(with_map, windows, minilm_tokenizer, shown(with_map))[0]) == set(texts) | mapped
    monkeypatch.setattr(run, "CONTEXT_FEATURES", 4)
    assert set(run._token_texts(result, windows, minilm_tokenizer, shown(result))[0]) == {7, 107, 3, 103, 11, 111, 12, 112, 5, 300}


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


def test_context_codes_are_each_features_code_on_every_token_of_its_contexts(tmp_path):
    """On the embedded default (its SAEs and its transcoder): a feature's top_context_values are its code
    on each token of the context window, recomputed here with run_with_cache and the SAE's own encode;
    the HTML shades those tokens."""
    import torch

    import opt_hooks as oh
    from opt_hooks import embedded, run
    from opt_hooks.adapters.data import token_windows
    from opt_hooks.adapters.sae import SAEView

    model, saes, texts = embedded.load_default()
    result = oh.audit(model, saes, texts, n_tokens=4096, batch_size=8, context_size=128, progress=False)
    windows = torch.cat(list(token_windows(texts, model, 128, n_tokens=4096, batch_size=8)))
    checked = 0
    for key, layer in result.layers.items():
        view = SAEView(saes[key])
        shown = [f for f in layer.features if f.top_context_values][:3]
        assert shown, key
        for f in shown:
            assert len(f.top_context_values) == len(f.top_tokens)
            for token, value, codes in zip(f.top_tokens, f.top_values, f.top_context_values):
                row, lo, pos, hi = run._context_span(token, 128)
                parts, at = result.token_pieces[token]
                assert (len(parts), at) == (hi - lo, pos - lo) and codes[at] == pytest.approx(value, rel=1e-3)
                hooks = [view.hook_name, view.hook_name_out]
                cache = model.run_with_cache(windows[row:row + 1], names_filter=hooks)[1]
                acts_out = cache[view.hook_name_out] if view.is_transcoder else None
                z = view.units(cache[view.hook_name], acts_out)[1][:, f.id]
                torch.testing.assert_close(torch.tensor(codes, dtype=torch.float64), z[lo:hi].double(),
                                           rtol=1e-3, atol=1e-3 * max(1.0, f.max_code))
                checked += 1
    assert checked >= 3 * len(result.layers)
    page = result.save(tmp_path / "report") / "report.html"
    assert page.read_text().count('<span class="act"') > 0


def test_flagged_share_counts_each_latent_named_in_any_table_once(result):
    # layer 0: certified 3, 7; dead 20; duplicates 14, 15; absorption 3 -> 7, 3 -> 11, 12 -> 5:
    # {3, 5, 7, 11, 12, 14, 15, 20} = 8 of 24; layer 1: certified 3, 7 and dead 20 only
    mapped, bare = (result.layers[h] for h in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"))
    assert mapped.flagged_latents() == {3, 5, 7, 11, 12, 14, 15, 20} and mapped.flagged_share() == 8 / 24
    assert bare.flagged_latents() == {3, 7, 20} and bare.flagged_share() == 3 / 24
    text = render_summary(result)
    assert "  flagged     33% of latents (certified, duplicated, absorbed or dead);" in text
    assert "  flagged     12% of latents" in text
    assert "docs/VALIDATION.md, section Q" in _layer_html(render_html(result), 0)


def test_numbers_read_as_numbers_never_as_1e_plus_02():
    from opt_hooks.report.svg import fmt
    from opt_hooks.report.terminal import percent

    assert percent(1.0) == "100%" and percent(1.104) == "110%" and percent(0.996) == "100%"
    assert percent(0.593) == "59%" and percent(0.0029) == "0.29%"
    assert fmt(1234.5) == "1234" and fmt(0.0123) == "0.0123" and fmt(2e5) == "2.00e+05" and fmt(5e-4) == "5.00e-04"
