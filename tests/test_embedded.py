"""The embedded default: small, packaged, loadable offline, and internally consistent (the SAEs
reconstruct this model's activations, the transcoder predicts its MLP's output; the l1
coefficient is where the adapters read lam)."""
from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
import torch

from opt_hooks import embedded

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "opt_hooks"


def _bundle() -> list[Path]:
    return [p for p in embedded.HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


@pytest.fixture(scope="module")
def loaded():
    return embedded.load_default(device="cpu")


def test_bundle_is_under_10_mb():
    assert sum(p.stat().st_size for p in _bundle()) < 10_000_000


def test_package_data_ships_every_bundled_file():
    """setuptools globs package-data relative to the package: every file must match one."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["opt_hooks"]
    shipped = {p for pattern in globs for p in PACKAGE.glob(pattern) if p.is_file()}
    missing = [str(p.relative_to(PACKAGE)) for p in _bundle() if p not in shipped and p.suffix != ".py"]
    assert not missing, f"add package-data globs for {missing}"


def test_load_default(loaded):
    model, saes, texts = loaded
    manifest = embedded.manifest()
    assert model.cfg.n_layers == manifest["model"]["n_layers"] == 3
    transcoders = list(manifest["transcoders"])
    assert list(saes) == [*(f"blocks.{k}.hook_resid_post" for k in range(3)), *transcoders]
    assert transcoders == ["blocks.1.ln2.hook_normalized"]
    text = "Return the number of items in a container."
    assert model.tokenizer.decode(model.tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert model.to_tokens(text)[0, 0].item() == model.tokenizer.bos_token_id  # BOS prepended, as SAE-Lens does
    tokens = sum(len(model.tokenizer(t)["input_ids"]) for t in texts)
    assert tokens > 1.5 * embedded.DEFAULT_TOKENS  # audit and held-out tokens without repeating text


def test_saes_keep_their_training_penalty(loaded):
    from opt_hooks.adapters.sae import SAEView

    _, saes, _ = loaded
    manifest = embedded.manifest()
    for hook, sae in saes.items():
        details = sae.cfg.metadata.training_architecture_details
        view = SAEView(sae)
        if hook in manifest["transcoders"]:
            entry = manifest["transcoders"][hook]
            assert sae.cfg.architecture() == entry["architecture"] == "skip_transcoder"
            assert view.hook_name_out == entry["hook_name_out"] and view.scope == "skip transcoder, L1 objective (exact)"
            assert view.lam == details["l1_coefficient"] == entry["l1_coefficient"]
            continue
        assert sae.cfg.architecture() == "standard" and details["lp_norm"] == 1.0
        assert details["l1_coefficient"] == manifest["saes"][hook]["l1_coefficient"]
        assert view.lam == details["l1_coefficient"] and view.scope == "L1 objective (exact)"


def test_saes_reconstruct_the_models_activations(loaded):
    model, saes, texts = loaded
    tokens = model.to_tokens(texts[:8], truncate=True)[:, :128]
    hooks = {hook: sae.cfg.metadata.hook_name_out or hook for hook, sae in saes.items()}  # a transcoder's target
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[*hooks, *hooks.values()])
        for hook, sae in saes.items():
            acts = cache[hook][:, 1:].reshape(-1, model.cfg.d_model)  # BOS left out, as in training
            target = cache[hooks[hook]][:, 1:].reshape(-1, model.cfg.d_model)
            codes = sae.encode(acts)
            explained = 1 - (sae(acts) - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
            l0 = (codes > 0).float().sum(-1).mean()
            assert explained > 0.7, hook
            assert 2 < l0 < 64, hook


def test_make_embedded_pieces_are_deterministic():
    spec = importlib.util.spec_from_file_location("make_embedded", REPO / "scripts" / "make_embedded.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    paragraphs = [f"paragraph {k} " * 20 for k in range(4000)]
    audit, train = make.split_corpus(paragraphs)
    assert (audit, train) == make.split_corpus(paragraphs)
    assert sorted(audit + train) == sorted(paragraphs) and sum(map(len, audit)) >= make.AUDIT_CHARS

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(embedded.HERE)
    windows = make.token_windows(tokenizer, audit[:50])
    assert windows.shape[1] == make.CONTEXT
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
