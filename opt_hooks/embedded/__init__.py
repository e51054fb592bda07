"""The embedded default: a tiny model, its SAEs and a text corpus, all bundled (offline).

Built by `scripts/make_embedded.py` from text that ships with Python (the standard library's
docstrings and language reference); MANIFEST.json records how, with training statistics.

    model, saes, texts = load_default()
    result = opt_hooks.audit(model, saes, texts, n_tokens=DEFAULT_TOKENS)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
AUDIT_TEXTS_FILE = "audit_texts.json"
MANIFEST_FILE = "MANIFEST.json"
SAE_FOLDER_PREFIX = "sae_layer"  # one sae_lens folder (cfg.json, sae_weights.safetensors) per hook
TRANSCODER_FOLDER_PREFIX = "transcoder_layer"  # a sae_lens SkipTranscoder on one block's MLP

# Tokens audited by default: enough for every condition to have evidence, small enough that
# the whole default report takes well under two minutes on two CPU cores.
DEFAULT_TOKENS = 32_768


def manifest() -> dict[str, Any]:
    """How the bundled files were made (seeds, versions, training statistics)."""
    return json.loads((HERE / MANIFEST_FILE).read_text(encoding="utf-8"))


def load_texts() -> list[str]:
    """The bundled audit corpus: paragraphs of Python's documentation the model never trained on."""
    return json.loads((HERE / AUDIT_TEXTS_FILE).read_text(encoding="utf-8"))


def load_default(device: str = "cpu"):
    """(model, {hook_name: sae}, texts): the bundled HookedTransformer, its SAEs (the transcoder
    last, keyed by its input hook) and corpus."""
    # Heavy imports stay here so that `import opt_hooks.embedded` (for the constants) is cheap.
    from safetensors.torch import load_file
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(HERE)
    config = json.loads((HERE / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    model = HookedTransformer(HookedTransformerConfig(**config, device=device), tokenizer=tokenizer)
    model.load_state_dict(load_file(HERE / MODEL_WEIGHTS_FILE, device=device))
    model.eval()

    saes = {}
    folders = [*sorted(HERE.glob(f"{SAE_FOLDER_PREFIX}*")), *sorted(HERE.glob(f"{TRANSCODER_FOLDER_PREFIX}*"))]
    for folder in folders:
        sae = SAE.load_from_disk(folder, device=device)
        saes[sae.cfg.metadata.hook_name] = sae
    return model, saes, load_texts()
