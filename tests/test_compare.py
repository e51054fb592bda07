"""oh.compare and `opt-hooks compare`: reports side by side, matched by hook (and SAE id), the values
equal to the compared records' own, differences marked significant only with an SE, the settings the
reports differ in, compare.json / compare.html (in headless Chromium) and the command's errors.
The records are real: small sae_lens SAEs audited (and one repaired) on activations."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import opt_hooks as oh
from opt_hooks import cli
from opt_hooks.comparison import COMPARE_HTML, COMPARE_JSON, Comparison
from opt_hooks.records import AuditRecord
from opt_hooks.report import REPORT_JSON
from tests.test_report import _chromium
from tests.sae_training import train_sae
from tests.test_verdicts import Stationary

HOOK0, HOOK1, HOOK2 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"
WORLD = Stationary(0)
X0 = WORLD.sample(3000)  # the activations at hook 0 of every report


def rotated_decoder(world: Stationary, angle: float = 0.3) -> torch.Tensor:
    """Decoder row 0 turned out of the span (the encoder kept): a C3 defect the repair turns back."""
    decoder = world.atoms.clone()
    decoder[0] = math.cos(angle) * world.atoms[0] + math.sin(angle) * world.outside[0]
    return decoder


@pytest.fixture(scope="module")
def audit_a():
    """A stationary standard SAE at hook 0, a trained TopK SAE at hook 1 (the L1 surrogate's scope)."""
    x1 = Stationary(1).sample(2000)
    topk = train_sae("topk", x1, hook_name=HOOK1, d_sae=16, steps=15)
    return oh.audit_activations({HOOK0: WORLD.sae(), HOOK1: topk}, {HOOK0: X0, HOOK1: x1}, held_out=0.25)


@pytest.fixture(scope="module")
def audit_b():
    """Another checkpoint at hook 0 (its decoder row 0 turned) on the same activations with another
    held-out share, and an SAE at hook 2: hook 1 is missing here, hook 2 in audit_a."""
    world2 = Stationary(2)
    saes = {HOOK0: WORLD.sae(rotated_decoder(WORLD)), HOOK2: world2.sae()}
    return oh.audit_activations(saes, {HOOK0: X0, HOOK2: world2.sample(2000)}, held_out=0.2)


@pytest.fixture(scope="module")
def repaired():
    return oh.repair_activations({HOOK0: WORLD.sae(rotated_decoder(WORLD))}, {HOOK0: X0}, held_out=0.2,
                                 repair_options=oh.RepairOptions(audit_held_out=0.25))


def row_of(data: dict, hook: str) -> dict:
    return next(row for row in data["rows"] if row["hook"] == hook)


def test_json_lists_both_reports_with_the_records_values(audit_a, audit_b):
    data = oh.compare(audit_a, audit_b, names=["a", "b"]).to_dict()
    json.dumps(data, allow_nan=False)  # compare.json is strict JSON
    assert [r["name"] for r in data["reports"]] == ["a", "b"]
    assert [[layer["hook"] for layer in r["layers"]] for r in data["reports"]] == [[HOOK0, HOOK1], [HOOK0, HOOK2]]
    assert [row["hook"] for row in data["rows"]] == [HOOK0, HOOK1, HOOK2]
    assert row_of(data, HOOK1)["missing"] == ["b"] and row_of(data, HOOK1)["entries"][1] is None
    assert row_of(data, HOOK2)["missing"] == ["a"] and row_of(data, HOOK2)["entries"][0] is None
    assert row_of(data, HOOK2)["differences"] == []  # nothing to take a difference from
    checked = 0
    for record, k in ((audit_a, 0), (audit_b, 1)):
        for hook, layer in record.layers.items():
            entry = row_of(data, hook)["entries"][k]
            assert entry["objective"] == {key: layer.objective[key] for key in entry["objective"]}
            assert entry["tiers"] == layer.tier_counts()
            assert entry["certified"] == layer.condition_counts("certified")
            for name, gap in layer.gaps.items():
                assert entry["gaps"][name]["share"] == gap["share"]
                assert entry["gaps"][name]["share_se"] == pytest.approx(gap["se"] / layer.objective["L"], rel=1e-12)
            assert (entry["scope"], entry["lam"], entry["lam_estimated"]) == (layer.scope, layer.lam, layer.lam_estimated)
            assert (entry["n_tokens"], entry["n_held_out"], entry["d_sae"]) == (layer.n_tokens, layer.n_held_out,
                                                                              layer.d_sae)
            assert entry["pair_map"]["absorbed"] == len(layer.absorption)
            assert entry["pair_map"]["duplicates"] == len(layer.duplicates)
            assert entry["pair_map"]["antipodal"] == len(layer.antipodal)
            assert entry["repair"] is None
            checked += 1
    assert checked == 4
    a, b = audit_a.layers[HOOK0], audit_b.layers[HOOK0]
    diff = next(d for d in row_of(data, HOOK0)["differences"] if d["quantity"] == "L")
    assert diff["difference"] == pytest.approx(b.objective["L"] - a.objective["L"], rel=1e-12)
    se = math.hypot(a.objective["se"], b.objective["se"])
    assert diff["se"] == pytest.approx(se, rel=1e-12)
    assert diff["p_value"] == pytest.approx(math.erfc(abs(diff["difference"]) / se / math.sqrt(2)), rel=1e-9)


def test_a_difference_is_significant_only_with_an_se(audit_a, audit_b):
    data = oh.compare(audit_a, audit_b).to_dict()
    differences = [d for row in data["rows"] for d in row["differences"]]
    tested = [d for d in differences if d["se"] is not None]
    assert data["n_tested"] == len(tested) > 0
    at_hook0 = row_of(data, HOOK0)["differences"]  # two standard SAEs with lam: every quantity there
    assert {d["quantity"] for d in at_hook0 if d["se"] is None} == {"mse", "l1", "l0", "explained_variance",
                                                                    "dead_share", "flagged share"}
    flagged = next(d for d in at_hook0 if d["quantity"] == "flagged share")
    assert flagged["difference"] == audit_b.layers[HOOK0].flagged_share() - audit_a.layers[HOOK0].flagged_share()
    assert {d["quantity"] for d in at_hook0 if d["se"] is not None} == {"L", "codes gap", "decoder gap", "bias gap",
                                                                        "absorption score"}
    entries = row_of(data, HOOK0)["entries"]
    scores = [(e["pair_map"]["absorption_score"], e["pair_map"]["absorption_score_se"]) for e in entries]
    assert scores == [(r.layers[HOOK0].pair_map["absorption_score"], r.layers[HOOK0].pair_map["absorption_score_se"])
                      for r in (audit_a, audit_b)]
    score = next(d for d in at_hook0 if d["quantity"] == "absorption score")
    assert score["difference"] == scores[1][0] - scores[0][0]
    assert score["se"] == math.hypot(scores[0][1], scores[1][1])
    for d in differences:
        if d["se"] is None:
            assert d["significant"] is None and d["p_value"] is None
        else:
            assert d["significant"] == (d["p_value"] < data["alpha"] / len(tested))
    # the same record twice: every difference 0, none significant; then its L moved by 10 SEs: significant
    same = oh.compare(audit_a, audit_a).to_dict()
    assert all(d["difference"] == 0 and not d["significant"] for row in same["rows"] for d in row["differences"])
    moved = copy.deepcopy(audit_a)
    moved.layers[HOOK0].objective["L"] += 10 * moved.layers[HOOK0].objective["se"]
    shifted = oh.compare(audit_a, moved).to_dict()
    flagged = [(row["hook"], d["quantity"]) for row in shifted["rows"] for d in row["differences"] if d["significant"]]
    assert flagged == [(HOOK0, "L")]
    marked = [line.split()[0] for line in oh.compare(audit_a, moved).summary().splitlines()
              if line.startswith("  ") and line.endswith(" *")]
    assert marked == ["L"]
    assert not [line for line in oh.compare(audit_a, audit_a).summary().splitlines() if line.endswith(" *")]


def test_settings_and_tokens_are_compared(audit_a, audit_b):
    data = oh.compare(audit_a, audit_b).to_dict()
    assert data["settings"]["differ"]["held_out"] == [0.25, 0.2]
    assert data["settings"]["same_tokens"] is False and data["settings"]["token_keys_differ"] == ["held_out"]
    assert "different tokens (held_out differ)" in oh.compare(audit_a, audit_b).summary()
    # activations the caller gave: the records cannot say whether the tokens are the same
    assert oh.compare(audit_a, audit_a).to_dict()["settings"]["same_tokens"] is None
    text_meta = {"source": "text", "model": "m", "dataset": "corpus.txt", "n_tokens": 4096, "context_size": 128,
                 "held_out": 0.1, "seconds": {"total_s": 1.0}, "run": {"seed": 0, "command": "opt-hooks report"}}
    first, second = copy.deepcopy(audit_a), copy.deepcopy(audit_a)
    first.meta = copy.deepcopy(text_meta)
    second.meta = {**copy.deepcopy(text_meta), "seconds": {"total_s": 2.0},
                   "run": {"seed": 1, "command": "opt-hooks report --seed 1"}}
    settings = oh.compare(first, second).to_dict()["settings"]
    assert settings["same_tokens"] is True  # timings and the command line are no settings
    assert settings["differ"] == {"run.seed": [0, 1]}


def test_a_repair_shows_its_before_after_table(audit_a, repaired, tmp_path):
    by_object = oh.compare(audit_a, repaired, names=["audit", "repair"])
    data = by_object.to_dict()
    assert [r["kind"] for r in data["reports"]] == ["audit", "repair"]
    entry = row_of(data, HOOK0)["entries"][1]
    table, steps = repaired.table[HOOK0], repaired.changes[HOOK0]
    assert entry["repair"]["before"] == table["before"] and entry["repair"]["after"] == table["after"]
    assert entry["repair"]["change"] == table["change"]
    assert (entry["repair"]["steps"], entry["repair"]["applied"]) == (len(steps), sum(s["applied"] for s in steps))
    assert row_of(data, HOOK0)["entries"][0]["repair"] is None
    audit_layer = repaired.audits[0].layers[HOOK0]
    assert entry["objective"]["L"] == audit_layer.objective["L"]  # the repair's own audit, not audit_a's
    summary = by_object.summary()
    for label in ("L before", "L after", "change of L", "steps"):
        assert re.search(rf"^  {label} +no repair +\S", summary, re.M), label
    # two repairs: their changes of L are compared, each with its paired SE
    twice = oh.compare(repaired, repaired).to_dict()
    change = next(d for d in row_of(twice, HOOK0)["differences"] if d["quantity"] == "repair change of L")
    assert change["difference"] == 0 and change["se"] == pytest.approx(math.sqrt(2) * table["change"]["se"])
    # saved folders compare as the objects do
    audit_a.save(tmp_path / "audit")
    repaired.save(tmp_path / "repair")
    by_folder = oh.compare(tmp_path / "audit", tmp_path / "repair" / REPORT_JSON).to_dict()
    assert [r["name"] for r in by_folder["reports"]] == ["audit", "repair"]
    assert [r["source"] for r in by_folder["reports"]] == [str(tmp_path / "audit"), str(tmp_path / "repair" / REPORT_JSON)]
    assert by_folder["rows"] == data["rows"]


def test_several_saes_at_one_hook_are_matched_by_sae_id(audit_a):
    layer = audit_a.layers[HOOK0]
    two = AuditRecord(layers={"s1": dataclasses.replace(layer, sae_id="s1"),
                              "s2": dataclasses.replace(layer, sae_id="s2")}, meta=audit_a.meta)
    one = AuditRecord(layers={HOOK0: dataclasses.replace(layer, sae_id="s2")}, meta=audit_a.meta)
    data = oh.compare(two, one, names=["two", "one"]).to_dict()
    assert [(row["hook"], row["sae_id"], row["missing"]) for row in data["rows"]] == [
        (HOOK0, "s1", ["one"]), (HOOK0, "s2", [])]
    # one SAE per hook in each report: matched by hook even where the SAEs differ (widths, checkpoints)
    plain = oh.compare(audit_a, one).to_dict()
    assert [(row["hook"], row["sae_id"]) for row in plain["rows"]] == [(HOOK0, None), (HOOK1, None)]
    assert [e["sae_id"] for e in plain["rows"][0]["entries"]] == [layer.sae_id, "s2"]


def test_html_is_escaped_self_contained_and_runs_in_chromium(audit_a, audit_b, repaired, tmp_path):
    hostile = "<script>alert(1)</script>"
    comparison = oh.compare(audit_a, audit_b, repaired, names=[hostile, "b", "r"])
    out = comparison.save(tmp_path / "cmp")
    assert sorted(p.name for p in out.iterdir()) == [COMPARE_HTML, COMPARE_JSON]  # no temporary files left
    page = (out / COMPARE_HTML).read_text()
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # offline: nothing fetched
    assert json.loads((out / COMPARE_JSON).read_text()) == comparison.to_dict()
    run = _chromium(tmp_path, out / COMPARE_HTML, "--dump-dom")
    dom = run.stdout
    assert 'data-report-status="ready"' in dom, run.stderr[-3000:]
    assert '<pre id="js-errors"></pre>' in dom
    assert "Uncaught" not in run.stderr, run.stderr[-3000:]
    assert dom.count('<section class="layer"') == 3
    assert dom.count('<td class="missing">missing</td>') > 0
    with pytest.raises(FileExistsError, match="not empty"):
        comparison.save(out, overwrite=False)


def test_api_errors(audit_a, tmp_path):
    with pytest.raises(ValueError, match="at least two reports, got 1"):
        oh.compare(audit_a)
    with pytest.raises(ValueError, match="1 name"):
        oh.compare(audit_a, audit_a, names=["x"])
    with pytest.raises(ValueError, match="names must differ"):
        oh.compare(audit_a, audit_a, names=["x", "x"])
    with pytest.raises(TypeError, match="cannot compare a int"):
        oh.compare(audit_a, 3)
    assert isinstance(oh.compare(audit_a, audit_a), Comparison)
    assert [r.name for r in oh.compare(audit_a, audit_a).reports] == ["audit 1", "audit 2"]


@pytest.fixture(scope="module")
def saved(audit_a, audit_b, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reports")
    return audit_a.save(root / "a"), audit_b.save(root / "b")


def test_cli_writes_json_and_html_and_prints_the_table(saved, tmp_path, capsys):
    a, b = saved
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / COMPARE_JSON).read_text())
    assert [(r["name"], r["source"]) for r in data["reports"]] == [("a", str(a)), ("b", str(b))]
    assert (out / COMPARE_HTML).read_text().startswith("<!DOCTYPE html>")
    assert printed.startswith("opt_hooks compare: 2 report(s), 3 layer(s); reference a")
    assert re.search(r"^ +a +b +b - a$", printed, re.M)
    assert f"-- {HOOK1} " in printed and "missing" in printed
    assert f"comparison written: {out / COMPARE_JSON}" in printed
    assert cli.main(["compare", str(a), str(b), "--out", str(out), "--names", "narrow,wide", "--overwrite"]) == 0
    assert [r["name"] for r in json.loads((out / COMPARE_JSON).read_text())["reports"]] == ["narrow", "wide"]


def test_cli_help_teaches_the_command(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["compare", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for needle in ("REPORT_DIR", "--names", "--out", "examples:", "reference", "sqrt(se_a^2 + se_b^2)", "exit codes:"):
        assert needle in text, needle


def _old_schema(folder: Path) -> Path:
    folder.mkdir()
    (folder / REPORT_JSON).write_text(json.dumps({"schema_version": "1.0", "layers": {}, "meta": {}}))
    return folder


@pytest.mark.parametrize("inputs, extra, code, message", [
    (["a"], [], 2, "compare needs at least two reports, got 1"),
    (["a", "b"], ["--names", "x"], 2, "--names gives 1 name(s) for 2 report(s)"),
    (["a", "b"], ["--names", "x,x"], 2, "--names must be distinct"),
    (["a", "empty"], [], 1, "has no report.json"),
    (["a", "missing"], [], 1, "does not exist"),
    (["a", "old"], [], 1, "report schema_version '1.0' is not"),
])
def test_cli_errors_are_one_line(saved, inputs, extra, code, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _old_schema(tmp_path / "old")
    folders = {"a": saved[0], "b": saved[1], "empty": tmp_path / "empty", "missing": tmp_path / "missing",
               "old": tmp_path / "old"}
    out = tmp_path / "cmp"
    assert cli.main(["compare", *(str(folders[k]) for k in inputs), *extra, "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert err.startswith("opt-hooks compare: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing written


def test_cli_refuses_a_folder_in_use(saved, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["compare", str(saved[0]), str(saved[1]), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
