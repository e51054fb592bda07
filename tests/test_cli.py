"""`opt-hooks report`: flag parsing, usage errors, the output-folder rule, and the embedded
default end to end (in-process `main`, --out in tmp_path)."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from opt_hooks import cli
from opt_hooks.report import load_schema

REPO = Path(__file__).resolve().parent.parent


def test_help_teaches_examples_tiers_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    needles = ("examples:", "opt-hooks report --sae-release gpt2-small-res-jb", "tiers", "certified", "exit codes:")
    for needle in (*needles, "--fail-on", "run.log"):
        assert needle in text


def test_wrapper_script_is_the_same_command():
    script = REPO / "scripts" / "layer_report.py"
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "exit codes:" in run.stdout


@pytest.mark.parametrize(
    "spec, layers",
    [("0-3,8", [0, 1, 2, 3, 8]), ("3,5,7", [3, 5, 7]), ("11", [11]), ("2-2, 1", [1, 2]), ("0-11", list(range(12)))],
)
def test_parse_layers(spec, layers):
    assert cli.parse_layers(spec) == layers


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1,,2", "-1"])
def test_parse_layers_rejects(spec):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_layers(spec)


@pytest.mark.parametrize(
    "text, count",
    [("200000", 200_000), ("200_000", 200_000), ("200k", 200_000), ("2M", 2_000_000), ("1.5m", 1_500_000)],
)
def test_parse_count(text, count):
    assert cli.parse_count(text) == count


@pytest.mark.parametrize("text", ["0", "many", "2x", "-5"])
def test_parse_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_count(text)


@pytest.mark.parametrize(
    "name, layer",
    [
        ("blocks.8.hook_resid_pre", 8),
        ("blocks.10.attn.hook_z", 10),
        ("layer_12/width_16k/average_l0_82", 12),
        ("model.layers.3.mlp", 3),
        ("encoder", None),
    ],
)
def test_layer_of(name, layer):
    assert cli.layer_of(name) == layer


def test_release_ids_chosen_by_layer():
    ids = [f"blocks.{k}.hook_resid_pre" for k in range(12)]
    assert cli.ids_for_layers(ids, [6, 8], "r") == ["blocks.6.hook_resid_pre", "blocks.8.hook_resid_pre"]
    with pytest.raises(cli.UsageError, match="matches 2 ids"):
        cli.ids_for_layers(ids + ["blocks.6.hook_resid_post"], [6], "r")
    with pytest.raises(cli.UsageError, match="--layers or --sae-id"):
        cli.ids_for_layers(ids, None, "r")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sae-id", "blocks.0.hook_resid_pre"], "--sae-id needs --sae-release"),
        (["--sae-release", "r", "--sae-path", "p"], "not both"),
        (["--model", "gpt2"], "--model needs SAEs"),
        (["--held-out", "1.5"], "--held-out"),
        (["--sae-path", "saes/layer_{layer}"], "give --layers"),
        (["--sae-release", "r", "--sae-id", "a", "b", "--layers", "1"], "2 value(s) for 1 layer(s)"),
        (["--alpha", "1.5"], "alpha is a significance level in (0, 1)"),
        (["--min-share", "-1"], "min_share and min_layer_share are shares >= 0"),
    ],
)
def test_conflicting_flags_are_usage_errors(argv, message, capsys, tmp_path):
    assert cli.main(["report", "--out", str(tmp_path / "out"), *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a usage error


def test_malformed_flags_exit_2():
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", "--layers", "3-1"])
    assert exited.value.code == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as exited:
        cli.main([])  # a command is required
    assert exited.value.code == cli.EXIT_USAGE


def test_out_folder_in_use_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    assert cli.main(["report", "--out", str(out)]) == cli.EXIT_FAILED
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_embedded_default_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main(["report", "--out", str(out), "--tokens", "8k", "--fail-on", "certified"])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(load_schema()).validate(report)

    from opt_hooks.result import AuditResult

    result = AuditResult.from_dict(report)
    assert code == (cli.EXIT_FINDINGS if cli.reached(result, "certified") else cli.EXIT_OK)
    assert list(result.layers) == [f"blocks.{k}.hook_resid_post" for k in range(3)]
    for layer in result.layers.values():
        assert layer.scope == "L1 objective (exact)" and not layer.lam_estimated
        assert 0.9 * report["meta"]["n_tokens"] < layer.n_tokens + layer.n_held_out  # all but BOS/EOS tokens
        assert f"-- {layer.hook_name} " in captured.out  # the per-layer terminal summary
        # the pair map's latents carry contexts (the embedded SAEs have duplicate groups)
        assert layer.duplicates
        for row in layer.duplicates[:5]:
            for latent in (row.i, row.j):
                assert layer.features[latent].top_tokens
                assert all(t in result.token_texts for t in layer.features[latent].top_tokens)
    assert report["meta"]["n_tokens"] >= 8000 and report["meta"]["run"]["source"] == "embedded default"
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "blocks.2.hook_resid_post" in page
    log = (out / "run.log").read_text()
    assert "command: opt-hooks report --out" in log and "report written" in log
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "run.log"]

    # same folder again: refused without --overwrite, replaced with it (quiet: nothing on stdout)
    assert cli.main(["report", "--out", str(out), "--tokens", "8k"]) == cli.EXIT_FAILED
    capsys.readouterr()
    again = ["report", "--out", str(out), "--tokens", "2k", "--layers", "1", "--overwrite", "--quiet",
             "--alpha", "0.01", "--min-share", "0.5", "--min-layer-share", "0.2"]
    assert cli.main(again) == cli.EXIT_OK
    assert capsys.readouterr().out == ""
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert list(layers) == ["blocks.1.hook_resid_post"]
    layer = layers["blocks.1.hook_resid_post"]
    assert layer["alpha"] == 0.01
    checks = [c for f in layer["features"] for c in f["certificates"].values()]
    assert all(c["share"] >= 0.5 for c in checks if c["tier"] == "certified")
    assert layer["layer_conditions"]["C5"]["tier"] != "certified"  # a bias shift never recovers 20% of L


def test_local_model_folder_and_sae_folders(tmp_path, minilm_tokenizer, capsys):
    """The user path, offline: a Hugging Face folder (booted as a TransformerBridge) and two
    sae_lens SAE folders chosen with a {layer} template."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    # A fresh model: conftest's session-wide tiny_gpt2_hf may already be wrapped by a bridge.
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=16, n_head=4, n_positions=32, vocab_size=minilm_tokenizer.vocab_size)
    model_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    minilm_tokenizer.save_pretrained(model_dir)
    for layer in (0, 2):
        torch.manual_seed(layer)
        metadata = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_pre")  # untrained; lam from its config
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=0.5, metadata=metadata))
        sae.save_inference_model(tmp_path / f"sae_{layer}")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {k}: the dog and the labrador walk home." for k in range(300)))

    out = tmp_path / "out"
    argv = ["report", "--model", str(model_dir), "--sae-path", str(tmp_path / "sae_{layer}"), "--layers", "0,2",
            "--dataset", str(corpus), "--tokens", "1k", "--context-size", "32", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert list(report["layers"]) == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert report["meta"]["run"]["sae_paths"] == [str(tmp_path / "sae_0"), str(tmp_path / "sae_2")]
    assert capsys.readouterr().out == ""


def test_failures_exit_1_with_the_traceback_in_run_log(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["report", "--sae-release", "no-such-release", "--layers", "0", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_FAILED
    assert "not in SAE-Lens's registry" in capsys.readouterr().err
    log = (out / "run.log").read_text()
    assert "Traceback" in log and "no-such-release" in log


# ---- opt-hooks repair ---------------------------------------------------------------------


def test_repair_help_and_defaults_match_the_api(capsys):
    import inspect

    from opt_hooks.repair_run import RepairOptions, repair

    with pytest.raises(SystemExit) as exited:
        cli.main(["repair", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--rounds", "--audit-held-out", "--held-out", "examples:", "saes/<hook>/", "repair.json",
                   "exit codes:", "reports/embedded-repair/"):
        assert needle in text, needle
    assert "--fail-on" not in text and "--resume" not in text  # report's own flags
    assert cli.REPAIR_HELD_OUT == inspect.signature(repair).parameters["held_out"].default
    assert cli.REPAIR_AUDIT_HELD_OUT == RepairOptions().audit_held_out
    args = cli.build_parser().parse_args(["repair"])
    assert (args.held_out, args.audit_held_out, args.rounds) == (0.2, 0.25, 1)
    assert cli.default_out(args) == Path("reports") / "embedded-repair"
    args = cli.build_parser().parse_args(["repair", "--sae-release", "gpt2-small-res-jb", "--layers", "6"])
    assert cli.default_out(args) == Path("reports") / "gpt2-small-res-jb-repair"
    args = cli.build_parser().parse_args(["report", "--sae-release", "gpt2-small-res-jb", "--layers", "6"])
    assert cli.default_out(args) == Path("reports") / "gpt2-small-res-jb"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--held-out", "0"], "--held-out of a repair is a share in (0, 1)"),
        (["--audit-held-out", "1"], "--audit-held-out of a repair is a share in (0, 1)"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--model", "gpt2"], "--model needs SAEs"),
    ],
)
def test_repair_usage_errors(argv, message, capsys, tmp_path):
    assert cli.main(["repair", "--out", str(tmp_path / "out"), *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "opt-hooks repair: error:" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exited:
        cli.main(["repair", "--fail-on", "certified"])  # a report flag
    assert exited.value.code == cli.EXIT_USAGE


def test_repair_embedded_default_end_to_end(tmp_path, capsys):
    from opt_hooks import embedded
    from opt_hooks.records import AuditRecord
    from opt_hooks.report.terminal import render_repair
    from sae_lens import SAE

    out = tmp_path / "repair"
    assert cli.main(["repair", "--out", str(out), "--tokens", "8k"]) == cli.EXIT_OK, (out / "run.log").read_text()
    printed = capsys.readouterr().out
    hooks = [f"blocks.{k}.hook_resid_post" for k in range(3)]
    assert sorted(p.name for p in out.iterdir()) == ["repair.json", "report.html", "report.json", "run.log", "saes"]

    report = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(load_schema()).validate(report)
    repair = json.loads((out / "repair.json").read_text())
    assert report["repair"] == repair and set(repair) == {"meta", "table", "changes"}
    assert list(report["layers"]) == hooks == list(repair["table"]) == list(repair["changes"])
    assert report["meta"]["run"]["source"] == "embedded default"
    assert repair["meta"]["run"]["command"].startswith("opt-hooks repair --out")
    assert AuditRecord.from_dict(report).repair == repair
    for hook in hooks:
        row = repair["table"][hook]
        assert row["n_tokens"] > 1000 and row["before"]["L"] > 0 and row["objective"] == "mse + lam * l1"
        # a step is applied only where its validation gain is significant; the table never shows L raised
        for step in repair["changes"][hook]:
            assert not step["applied"] or step["gain"] > 0
        assert row["change"]["L"] <= 2 * row["change"]["se"]
    # the embedded SAEs' C5 bias step is certified and kept even on these few tokens (layer 0's is the clearest)
    assert any(step["step"] == "bias" and step["applied"] for step in repair["changes"][hooks[0]])

    page = (out / "report.html").read_text()
    assert '<a href="#repair">repair</a>' in page and "<h2>Repair</h2>" in page
    section = page.split('<section id="repair">')[1].split("</section>")[0]
    assert re.findall(r'<div class="repair-layer" data-hook="([^"]+)">', section) == hooks

    assert printed.startswith(render_repair(repair))  # the summary, then where the SAEs went
    for hook in hooks:
        assert f"-- {hook} " in printed and f"  {hook}: {out / 'saes' / hook}" in printed
    assert "before" in printed and "after" in printed

    _, originals, _ = embedded.load_default(device="cpu")
    for hook in hooks:
        folder = out / "saes" / hook
        assert (folder / "cfg.json").is_file()
        sae = SAE.load_from_disk(str(folder), device="cpu")
        original = originals[hook]
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.d_sae == original.cfg.d_sae
        applied = [step["step"] for step in repair["changes"][hook] if step["applied"]]
        moves_b_dec = bool({"bias", "floor"} & set(applied))
        assert moves_b_dec == (not torch.equal(sae.b_dec, original.b_dec))  # the bias step is in the saved SAE
        assert bool(applied) == any(not torch.equal(a, b) for a, b in zip(sae.state_dict().values(),
                                                                           original.state_dict().values()))

    log = (out / "run.log").read_text()
    assert "command: opt-hooks repair --out" in log and "repair written" in log
    # the same folder again: refused without --overwrite, before any work
    assert cli.main(["repair", "--out", str(out), "--tokens", "8k"]) == cli.EXIT_FAILED
    assert "--overwrite" in capsys.readouterr().err
