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

EMBEDDED_TRANSCODER = "blocks.1.ln2.hook_normalized"  # the embedded skip transcoder, keyed by its input hook


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
    assert list(result.layers) == [*(f"blocks.{k}.hook_resid_post" for k in range(3)), EMBEDDED_TRANSCODER]
    for layer in result.layers.values():
        assert 0.9 * report["meta"]["n_tokens"] < layer.n_tokens + layer.n_held_out  # all but BOS/EOS tokens
        assert f"-- {layer.hook_name} " in captured.out  # the per-layer terminal summary
        assert not layer.lam_estimated
        if layer.hook_name == EMBEDDED_TRANSCODER:
            assert layer.scope == "skip transcoder, L1 objective (exact)" and "C7" in layer.layer_conditions
            assert layer.hook_name_out == "blocks.1.hook_mlp_out" and "predicts    blocks.1.hook_mlp_out" in captured.out
            continue
        assert layer.scope == "L1 objective (exact)"
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
    # the bundled texts, never the hub dataset its SAEs' metadata names; context and BOS from that metadata
    assert "dataset the bundled Python-documentation corpus: the embedded default; context 128, prepend_bos True: " \
           "from the SAE's metadata" in log
    assert report["meta"]["dataset"] == "1144 in-memory documents" and report["meta"]["context_size"] == 128
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "run.log", "tables"]

    # same folder again: refused without --overwrite, replaced with it (quiet: nothing on stdout)
    assert cli.main(["report", "--out", str(out), "--tokens", "8k"]) == cli.EXIT_FAILED
    capsys.readouterr()
    again = ["report", "--out", str(out), "--tokens", "2k", "--layers", "1", "--overwrite", "--quiet",
             "--alpha", "0.01", "--min-share", "0.5", "--min-layer-share", "0.2"]
    assert cli.main(again) == cli.EXIT_OK
    assert capsys.readouterr().out == ""
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert list(layers) == ["blocks.1.hook_resid_post", EMBEDDED_TRANSCODER]  # layer 1: its SAE and transcoder
    layer = layers["blocks.1.hook_resid_post"]
    assert layer["alpha"] == 0.01
    checks = [c for f in layer["features"] for c in f["certificates"].values()]
    assert all(c["share"] >= 0.5 for c in checks if c["tier"] == "certified")
    assert layer["layer_conditions"]["C5"]["tier"] != "certified"  # a bias shift never recovers 20% of L


def tiny_model_folder(folder: Path, tokenizer) -> Path:
    """A 3-layer random GPT-2 (d_model 16, 32 positions) saved as a Hugging Face folder. A fresh model:
    conftest's session-wide tiny_gpt2_hf may already be wrapped by a bridge."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=16, n_head=4, n_positions=32, vocab_size=tokenizer.vocab_size)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sae_folder(folder: Path, layer: int, **metadata) -> Path:
    """An untrained standard SAE (lam 0.5 from its config) on blocks.<layer>.hook_resid_pre of the tiny
    model, saved as a sae_lens folder, with these metadata fields."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(layer)
    metadata = SAEMetadata(**{"hook_name": f"blocks.{layer}.hook_resid_pre", **metadata})
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=0.5, metadata=metadata))
    sae.save_inference_model(folder)
    return folder


def paragraphs(n: int = 300) -> list[str]:
    return [f"Paragraph {k}: the dog and the labrador walk home." for k in range(n)]


def report_on_tiny_model(tmp_path: Path, tokenizer, *flags: str) -> tuple[Path, dict]:
    """`opt-hooks report` of the SAEs that `flags` name on a tiny GPT-2 folder, over a corpus of
    `paragraphs()` (1k tokens, context 32): its --out folder and its report.json."""
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs()))
    out = tmp_path / "out"
    argv = ["report", "--model", str(model_dir), *flags,
            "--dataset", str(corpus), "--tokens", "1k", "--context-size", "32", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    return out, json.loads((out / "report.json").read_text())


def test_local_model_folder_and_sae_folders(tmp_path, minilm_tokenizer, capsys):
    """The user path, offline: a Hugging Face folder (booted as a TransformerBridge) and two
    sae_lens SAE folders chosen with a {layer} template."""
    for layer in (0, 2):
        sae_folder(tmp_path / f"sae_{layer}", layer)
    _, report = report_on_tiny_model(tmp_path, minilm_tokenizer, "--sae-path", str(tmp_path / "sae_{layer}"),
                                     "--layers", "0,2")
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
    hooks = [*(f"blocks.{k}.hook_resid_post" for k in range(3)), EMBEDDED_TRANSCODER]
    assert sorted(p.name for p in out.iterdir()) == ["repair.json", "report.html", "report.json", "run.log", "saes",
                                                     "tables"]

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


# ---- the SAEs' metadata as defaults, the API's options as flags, messages -----------------------


@pytest.fixture
def api_calls(monkeypatch):
    """(name, args, kwargs) of every opt_hooks.api.audit / opt_hooks.repair_run.repair call the CLI
    makes; the calls themselves are made."""
    import opt_hooks.api
    import opt_hooks.repair_run

    calls = []
    for module, name in ((opt_hooks.api, "audit"), (opt_hooks.repair_run, "repair")):
        def spy(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def test_the_saes_metadata_names_the_dataset_context_and_bos(tmp_path, minilm_tokenizer, api_calls):
    """No --dataset, --context-size or BOS flag: they come from the SAEs' metadata (a local dataset
    folder, offline), as ActivationsStore.from_sae takes them; the first SAE's where they disagree."""
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    corpus = write_jsonl(tmp_path / "corpus", [{"text": text} for text in paragraphs()])
    named = {"model_name": str(model_dir), "dataset_path": str(corpus), "prepend_bos": False}
    sae_folder(tmp_path / "sae_0", 0, context_size=16, **named)
    sae_folder(tmp_path / "sae_2", 2, context_size=24, **named)

    out = tmp_path / "out"
    argv = ["report", "--sae-path", str(tmp_path / "sae_{layer}"), "--layers", "0,2", "--tokens", "1k",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["dataset"] == str(corpus) and meta["context_size"] == 16
    metadata = "from the SAE's metadata"
    assert meta["run"]["data"] == {
        "dataset": str(corpus), "context_size": 16, "prepend_bos": False, "split": "train",
        "from": {"dataset": metadata, "context_size": metadata, "prepend_bos": metadata},
    }
    log = (out / "run.log").read_text()
    assert f"dataset {corpus}, context 16, prepend_bos False: from the SAE's metadata" in log
    assert "the SAEs' metadata disagree on context_size (blocks.0.hook_resid_pre: 16, blocks.2.hook_resid_pre: 24)" in log
    [(name, args, kwargs)] = api_calls
    assert name == "audit" and args[2] == str(corpus)
    assert kwargs["context_size"] == 16 and kwargs["prepend_bos"] is False


def test_metadata_without_a_dataset_keeps_the_bundled_corpus(tmp_path, minilm_tokenizer, api_calls):
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    sae_folder(tmp_path / "sae", 1, model_name=str(model_dir))
    out = tmp_path / "out"
    argv = ["report", "--sae-path", str(tmp_path / "sae"), "--context-size", "16", "--tokens", "512",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    log = (out / "run.log").read_text()
    assert "no --dataset: auditing on the bundled Python-documentation corpus" in log  # today's warning
    assert "context 16: from --context-size; prepend_bos True: the default" in log
    from opt_hooks import embedded

    [(_, args, kwargs)] = api_calls
    assert args[2] == embedded.load_texts() and kwargs["prepend_bos"] is True


def test_the_apis_options_are_flags(tmp_path, minilm_tokenizer, api_calls):
    """--hook-name, --lam HOOK=LAM, --text-column, --split, --no-prepend-bos, --include-special-tokens,
    --nonfinite, --allow-model-mismatch reach opt_hooks.audit (and its report)."""
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    for layer in (0, 2):
        sae_folder(tmp_path / f"sae_{layer}", layer, model_name="gpt2-small")  # another model: no warning asked
    rows = write_jsonl(tmp_path / "rows", [{"title": f"Note {k}", "body": text} for k, text in enumerate(paragraphs())])
    out = tmp_path / "out"
    argv = ["report", "--model", str(model_dir), "--sae-path", str(tmp_path / "sae_{layer}"), "--layers", "0,2",
            "--hook-name", "blocks.{layer}.hook_resid_post", "--dataset", str(rows), "--text-column", "body",
            "--split", "validation", "--context-size", "16", "--no-prepend-bos", "--include-special-tokens",
            "--lam", "blocks.0.hook_resid_post=0.25", "--nonfinite", "skip", "--allow-model-mismatch",
            "--tokens", "1k", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    report = json.loads((out / "report.json").read_text())
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert list(report["layers"]) == hooks
    assert [report["layers"][hook]["lam"] for hook in hooks] == [0.25, 0.5]  # the other keeps its config's
    assert report["meta"]["include_special_tokens"] is True and report["meta"]["context_size"] == 16
    assert report["meta"]["run"]["data"]["text_column"] == "body"
    [(_, _, kwargs)] = api_calls
    expected = {"hook_names": hooks, "lam": {hooks[0]: 0.25}, "text_column": "body", "split": "validation",
                "prepend_bos": False, "include_special_tokens": True, "nonfinite": "skip",
                "allow_model_mismatch": True}
    assert {key: kwargs[key] for key in expected} == expected
    log = (out / "run.log").read_text()
    assert f"dataset {rows}: from --dataset; context 16: from --context-size; prepend_bos False: from --no-prepend-bos" in log
    assert "was trained on 'gpt2-small'" not in log

    # without --text-column the two string columns cannot be told apart: the flag is what picked one
    again = [a for a in argv if a not in ("--text-column", "body")] + ["--overwrite"]
    assert cli.main(again) == cli.EXIT_FAILED
    assert "cannot pick the text column" in (out / "run.log").read_text()


def test_repair_takes_the_same_inputs(tmp_path, minilm_tokenizer, api_calls):
    """opt-hooks repair reads the same flags and metadata (the shared input code): --lam as one number."""
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    corpus = write_jsonl(tmp_path / "corpus", [{"text": text} for text in paragraphs()])
    for layer in (0, 2):
        sae_folder(tmp_path / f"sae_{layer}", layer, model_name=str(model_dir), dataset_path=str(corpus),
                   context_size=16)
    out = tmp_path / "out"
    argv = ["repair", "--sae-path", str(tmp_path / "sae_{layer}"), "--layers", "0,2", "--lam", "0.3",
            "--no-prepend-bos", "--include-special-tokens", "--text-column", "text", "--split", "test",
            "--tokens", "2k", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
    [(name, args, kwargs)] = api_calls
    assert name == "repair" and args[2] == str(corpus)
    expected = {"lam": 0.3, "context_size": 16, "prepend_bos": False, "include_special_tokens": True,
                "text_column": "text", "split": "test"}
    assert {key: kwargs[key] for key in expected} == expected
    report = json.loads((out / "report.json").read_text())
    assert {layer["lam"] for layer in report["layers"].values()} == {0.3}
    assert report["meta"]["run"]["data"]["from"]["dataset"] == "from the SAE's metadata"


def test_parse_lam():
    assert cli.parse_lam(["0.5"]) == 0.5
    assert cli.parse_lam(["a=1", "b = 2e-1"]) == {"a": 1.0, "b": 0.2}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lam", "0"], "--lam must be a finite number > 0, got 0"),
        (["--lam", "x"], "--lam: 'x' is not a number"),
        (["--lam", "a=1", "2"], "--lam takes one number, or HOOK=LAM pairs"),
        (["--lam", "a=1", "a=2"], "--lam gives a twice"),
        (["--lam", "a=inf"], "--lam a must be a finite number > 0"),
        (["--hook-name", "blocks.{layer}.hook_resid_pre"], "--hook-name 'blocks.{layer}.hook_resid_pre' has {layer}"),
        (["--context-size", "0"], "--context-size must be positive"),
    ],
)
def test_bad_new_flags_are_usage_errors(argv, message, capsys, tmp_path):
    assert cli.main(["report", "--out", str(tmp_path / "out"), *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flags_that_do_not_fit_the_saes(tmp_path, capsys):
    """Found once the SAEs are read: a --lam hook no SAE is on, a --hook-name count that is not theirs,
    an SAE without a hook and no --hook-name."""
    out = tmp_path / "out"
    assert cli.main(["report", "--lam", "blocks.9.hook_resid_post=1", "--out", str(out)]) == cli.EXIT_USAGE
    assert "--lam blocks.9.hook_resid_post=...: no SAE here is on that hook; the hooks: blocks.0" in capsys.readouterr().err
    argv = ["report", "--hook-name", "a", "b", "--out", str(out), "--overwrite"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "--hook-name gives 2 hook(s) for 4 SAE(s)" in capsys.readouterr().err
    sae = sae_folder(tmp_path / "sae", 0, hook_name=None)
    assert cli.main(["report", "--sae-path", str(sae), "--out", str(out), "--overwrite"]) == cli.EXIT_USAGE
    assert f"the SAE {sae} names no hook point (cfg.metadata.hook_name is empty): give --hook-name" in (
        capsys.readouterr().err)


@pytest.mark.parametrize(
    "metadata, flags, message",
    [
        ({"model_name": "my-own-model"}, [],
         "the SAE's metadata names the model 'my-own-model', which TransformerLens does not know: give --model NAME"),
        ({}, ["--model", "gtp2"], "--model 'gtp2' is not a folder, nor a model TransformerLens knows (close: gpt2"),
    ],
)
def test_a_model_transformerlens_does_not_know_is_one_line(metadata, flags, message, tmp_path, capsys):
    sae = sae_folder(tmp_path / "sae", 0, **metadata)
    assert cli.main(["report", "--sae-path", str(sae), *flags, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    *_, error = err.splitlines()
    assert error.startswith("opt-hooks report: error: ") and message in error
    assert "Valid official model names" not in err and len(error) < 300  # not TransformerLens's list of names


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the hub libraries read it (at import; conftest sets it for every test)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "what, message",
    [
        ("dataset", "cannot load the dataset NeelNanda/pile-10k (named by the SAE's metadata): the Hugging Face hub "
                    "is offline (HF_HUB_OFFLINE=1 is set) and it is not in the local cache; give --dataset a local "
                    ".txt, .jsonl or .parquet file or folder instead"),
        ("model", "cannot load the model gpt2-small: the Hugging Face hub is offline (HF_HUB_OFFLINE=1 is set) and it "
                  "is not in the local cache; give --model a local Hugging Face model folder instead"),
        ("sae", "cannot load the SAE gpt2-small-res-jb / blocks.0.hook_resid_pre: the Hugging Face hub is offline "
                "(HF_HUB_OFFLINE=1 is set) and it is not in the local cache; give local SAE folders (sae_lens format) "
                "with --sae-path instead"),
    ],
)
def test_an_offline_hub_is_named_with_what_to_give_instead(what, message, tmp_path, minilm_tokenizer, hub_offline,
                                                            capsys):
    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    hub = {"dataset": {"model_name": str(model_dir), "dataset_path": "NeelNanda/pile-10k", "context_size": 16},
           "model": {"model_name": "gpt2-small"}}
    out = tmp_path / "out"
    if what == "sae":
        argv = ["report", "--sae-release", "gpt2-small-res-jb", "--layers", "0", "--out", str(out)]
    else:
        argv = ["report", "--sae-path", str(sae_folder(tmp_path / "sae", 0, **hub[what])), "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "Traceback" in (out / "run.log").read_text()  # the library's own error stays in run.log


def test_an_unreachable_hub_without_the_offline_switch(monkeypatch):
    for name in cli.OFFLINE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(cli.HubUnreachable, match="^cannot load the dataset d: the Hugging Face hub cannot be reached "
                                                 "and it is not in the local cache; give --dataset x instead$"):
        with cli.hub_errors("the dataset d", "give --dataset x"):
            try:
                raise ConnectionError("Couldn't reach 'd' on the Hub")  # what datasets raises
            except ConnectionError as error:
                raise ValueError("could not load the Hugging Face dataset 'd'") from error
    with pytest.raises(ConnectionResetError):  # not the hub's: passes through
        with cli.hub_errors("the dataset d", "give --dataset x"):
            raise ConnectionResetError("peer")


def test_a_metadata_dataset_path_that_is_not_here(tmp_path, capsys):
    sae = sae_folder(tmp_path / "sae", 0, dataset_path=str(tmp_path / "gone.jsonl"))
    assert cli.main(["report", "--sae-path", str(sae), "--out", str(tmp_path / "out")]) == cli.EXIT_FAILED
    assert f"the SAE's metadata names the dataset {tmp_path / 'gone.jsonl'}, which is not here: give --dataset" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("command, replaced", [("report", "its report files"), ("repair", "its report files and saes/")])
def test_a_refused_out_names_the_cli_flag(command, replaced, tmp_path, capsys):
    out = tmp_path / "out"
    (out / cli.CHECKPOINT_DIR).mkdir(parents=True)
    assert cli.main([command, "--out", str(out)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    resume = ", or --resume to continue the run checkpointed there" if command == "report" else ""
    assert f"output folder {out} is not empty: give --overwrite to replace {replaced}{resume}, or choose another --out" in err
    assert "overwrite=True" not in err


def test_transcoder_folder_on_a_local_model(tmp_path, minilm_tokenizer):
    """A sae_lens SkipTranscoder folder beside an SAE folder: audited in one run, the transcoder read
    at its input hook and compared at its output hook (metadata.hook_name_out), then repaired."""
    from sae_lens import SkipTranscoder, SkipTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    model_dir = tiny_model_folder(tmp_path / "tiny-gpt2", minilm_tokenizer)
    sae_folder(tmp_path / "sae", 2)
    torch.manual_seed(5)
    metadata = SAEMetadata(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out",
                           training_architecture_details={"l1_coefficient": 0.1})
    SkipTranscoder(SkipTranscoderConfig(d_in=16, d_sae=32, d_out=16, apply_b_dec_to_input=False,
                                        metadata=metadata)).save_model(tmp_path / "transcoder")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs()))
    for command in ("report", "repair"):
        out = tmp_path / command
        argv = [command, "--model", str(model_dir), "--sae-path", str(tmp_path / "transcoder"), str(tmp_path / "sae"),
                "--dataset", str(corpus), "--tokens", "1k", "--context-size", "32", "--out", str(out), "--quiet"]
        assert cli.main(argv) == cli.EXIT_OK, (out / "run.log").read_text()
        layers = json.loads((out / "report.json").read_text())["layers"]
        assert list(layers) == ["blocks.0.ln2.hook_normalized", "blocks.2.hook_resid_pre"]
        transcoder = layers["blocks.0.ln2.hook_normalized"]
        assert transcoder["hook_name_out"] == "blocks.0.hook_mlp_out" and transcoder["lam"] == 0.1
        assert transcoder["scope"] == "skip transcoder, L1 objective (exact)" and "C7" in transcoder["layer_conditions"]
    assert (tmp_path / "repair" / "saes" / "blocks.0.ln2.hook_normalized" / "cfg.json").is_file()


def test_two_sae_folders_on_one_hook(tmp_path, minilm_tokenizer):
    sae_folder(tmp_path / "a", 2)
    sae_folder(tmp_path / "b", 2)
    out, report = report_on_tiny_model(tmp_path, minilm_tokenizer, "--sae-path", str(tmp_path / "a"), str(tmp_path / "b"))
    layers = report["layers"]
    assert list(layers) == ["blocks.2.hook_resid_pre/sae0", "blocks.2.hook_resid_pre/sae1"]
    assert layers["blocks.2.hook_resid_pre/sae0"]["features"] == layers["blocks.2.hook_resid_pre/sae1"]["features"]
    assert sorted(p.name for p in (out / "tables").iterdir()) == ["blocks.2.hook_resid_pre_sae0", "blocks.2.hook_resid_pre_sae1"]
