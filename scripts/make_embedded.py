"""Build the embedded default that `opt-hooks report` audits when given no arguments.

Everything is made here, offline, from text that ships with Python itself:

- corpus: the docstrings of the standard library's modules, classes and functions, plus the
  language reference topics of `pydoc_data.topics`, split into paragraphs; a fixed random
  share (AUDIT_CHARS characters) is kept apart as the audit corpus and never trained on;
- tokenizer: byte-level BPE (VOCAB_SIZE entries) trained with the `tokenizers` library;
- model: a GPT-2-architecture HookedTransformer (MODEL_CONFIG), trained with plain torch;
- SAEs: one sae_lens standard SAE per hook in HOOKS, trained with sae_lens's own
  `StandardTrainingSAE.training_forward_pass` (MSE + L1 penalty) on the model's residual
  stream and saved with `save_inference_model`, so that `SAE.load_from_disk` reads them and
  the l1 coefficient stays in `metadata.training_architecture_details`;
- transcoder: one sae_lens SkipTranscoder on the MLP of block TRANSCODER_LAYER (reads
  `ln2.hook_normalized`, predicts `hook_mlp_out`), trained with plain torch on the same L1 loss
  in the output space (sae_lens ships no transcoder trainer), its l1 coefficient recorded in
  `metadata.training_architecture_details` as the SAEs' is.

Seeds and thread count are fixed, so a rerun on the same machine with the same Python (its
standard library is the corpus), torch and tokenizers versions rewrites byte-identical files
(checked), except MANIFEST.json's build_seconds; other CPUs may differ in the last bits.

Runtime: 14.5 minutes on 2 shared CPU cores (one torch thread; 862 s measured with the
machine's load average near 6), of which the model is 5 and each SAE 3 minutes; the
transcoder adds about 2.5 minutes. Output: 3.0 MB in opt_hooks/embedded/.

    python scripts/make_embedded.py                    # rewrites opt_hooks/embedded/
    python scripts/make_embedded.py --transcoder-only  # (re)trains the transcoder on the bundled model
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import random
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import pydoc_data.topics
import torch
from safetensors.torch import save_file
from sae_lens import __version__ as sae_lens_version
from sae_lens.saes.sae import SAEMetadata, TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
from opt_hooks.embedded import (  # noqa: E402  (needs the path above)
    AUDIT_TEXTS_FILE,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    MODEL_WEIGHTS_FILE,
    SAE_FOLDER_PREFIX,
    TRANSCODER_FOLDER_PREFIX,
)

SEED = 0
THREADS = 1  # deterministic, and far faster than 2 when other work shares the cores
DESCRIPTION = ("tiny GPT-2-architecture model, standard SAEs and one skip transcoder trained on Python's "
               "own documentation")
SPECIAL = "<|endoftext|>"  # BOS, EOS and padding, as in GPT-2
VOCAB_SIZE = 2048
CONTEXT = 128
MODEL_CONFIG = {
    "model_name": "opt-hooks-tiny-gpt2",
    "n_layers": 3,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": CONTEXT,
    "d_vocab": VOCAB_SIZE,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "original_architecture": "GPT2LMHeadModel",
    "default_prepend_bos": True,
    "seed": SEED,
}
MODEL_STEPS = 700
MODEL_BATCH = 32  # windows of CONTEXT tokens
MODEL_LR = 2e-3

HOOKS = [f"blocks.{layer}.hook_resid_post" for layer in range(MODEL_CONFIG["n_layers"])]
SAE_WIDTH = 512  # 8x the residual width
L1_COEFFICIENT = 4.0  # L0 about 25 with about 75% variance explained
SAE_TOKENS = 300_000  # activations per hook used for SAE training
SAE_STEPS = 3000
SAE_BATCH = 2048
SAE_LR = 1e-3

TRANSCODER_LAYER = 1
TRANSCODER_HOOKS = (f"blocks.{TRANSCODER_LAYER}.ln2.hook_normalized", f"blocks.{TRANSCODER_LAYER}.hook_mlp_out")
TRANSCODER_WIDTH = 256  # 4x the MLP's output width, small enough to keep the default report fast
TRANSCODER_L1 = 0.25
TRANSCODER_STEPS = 1500

AUDIT_CHARS = 240_000  # about 60k tokens: the default audit uses 32,768 of them
MIN_PARAGRAPH = 80  # characters; shorter docstrings are mostly "Return x." noise
# Folders of the standard library that are tests, demos or vendored data, not prose.
SKIP_FOLDERS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "__pycache__"}


def stdlib_paragraphs() -> list[str]:
    """Docstrings of the standard library and the language reference, one paragraph each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = list(pydoc_data.topics.topics.values())
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & SKIP_FOLDERS or path.parent.name.startswith("config-"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a few deliberately broken files exist
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                texts.append(ast.get_docstring(node) or "")
    paragraphs = (p.strip() for text in texts for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p) >= MIN_PARAGRAPH]


def split_corpus(paragraphs: list[str]) -> tuple[list[str], list[str]]:
    """(audit, training): a seeded shuffle, the first AUDIT_CHARS characters for the audit."""
    order = list(range(len(paragraphs)))
    random.Random(SEED).shuffle(order)
    audit, used = [], 0
    for k, index in enumerate(order):
        if used >= AUDIT_CHARS:
            return audit, [paragraphs[i] for i in order[k:]]
        audit.append(paragraphs[index])
        used += len(paragraphs[index])
    raise ValueError("corpus too small for the audit share")


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def token_windows(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Pack texts (separated by EOS) into windows of CONTEXT tokens that each start with BOS."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    body = CONTEXT - 1
    n = len(ids) // body
    windows = torch.tensor(ids[: n * body]).view(n, body)
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    return torch.cat([bos, windows], dim=1)


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def train_model(model: HookedTransformer, windows: torch.Tensor, log) -> float:
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.AdamW(model.parameters(), lr=MODEL_LR, weight_decay=0.01)
    for step in range(MODEL_STEPS):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, MODEL_STEPS, MODEL_LR)
        batch = windows[torch.randint(len(windows), (MODEL_BATCH,), generator=generator)]
        loss = model(batch, return_type="loss")
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        if step % 100 == 0 or step == MODEL_STEPS - 1:
            log(f"model step {step:4d}  loss {loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def residual_activations(model: HookedTransformer, windows: torch.Tensor, hook: str) -> torch.Tensor:
    """(SAE_TOKENS, d_model) activations at `hook`, BOS positions left out as SAE-Lens does."""
    rows, count = [], 0
    for batch in windows.split(64):
        _, cache = model.run_with_cache(batch, names_filter=hook)
        acts = cache[hook][:, 1:].reshape(-1, model.cfg.d_model)
        rows.append(acts)
        count += len(acts)
        if count >= SAE_TOKENS:
            break
    return torch.cat(rows)[:SAE_TOKENS]


def train_sae(acts: torch.Tensor, hook: str, log) -> tuple[StandardTrainingSAE, dict[str, float]]:
    torch.manual_seed(SEED)
    cfg = StandardTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=SAE_WIDTH,
        l1_coefficient=L1_COEFFICIENT,
        metadata=SAEMetadata(
            model_name=MODEL_CONFIG["model_name"],
            hook_name=hook,
            context_size=CONTEXT,
            prepend_bos=True,
            exclude_special_tokens=False,
            dataset_path="python-stdlib-docstrings",
        ),
    )
    sae = StandardTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))  # start the bias at the data mean: fewer dead features early
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.Adam(sae.parameters(), lr=SAE_LR)
    for step in range(SAE_STEPS):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, SAE_STEPS, SAE_LR)
        batch = acts[torch.randint(len(acts), (SAE_BATCH,), generator=generator)]
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients={"l1": L1_COEFFICIENT},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        if step % 500 == 0 or step == SAE_STEPS - 1:
            l0 = (out.feature_acts > 0).float().sum(-1).mean().item()
            mse, l1 = out.losses["mse_loss"].item(), out.losses["l1_loss"].item()
            log(f"{hook} step {step:4d}  mse {mse:.4f}  l1 {l1:.4f}  L0 {l0:.1f}")
    with torch.no_grad():
        codes = sae.encode(acts)
        error = (sae.decode(codes) - acts).pow(2).sum(-1).mean()
        variance = (acts - acts.mean(0)).pow(2).sum(-1).mean()
        stats = {
            "l0": (codes > 0).float().sum(-1).mean().item(),
            "explained_variance": 1 - (error / variance).item(),
            "dead_features": int(((codes > 0).sum(0) == 0).sum().item()),
        }
    return sae, stats


@torch.no_grad()
def mlp_activations(model: HookedTransformer, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), SAE_TOKENS rows each: the transcoder block's MLP input and output, BOS left out."""
    xs, ys, count = [], [], 0
    for batch in windows.split(64):
        _, cache = model.run_with_cache(batch, names_filter=list(TRANSCODER_HOOKS))
        x, y = (cache[hook][:, 1:].reshape(-1, model.cfg.d_model) for hook in TRANSCODER_HOOKS)
        xs.append(x)
        ys.append(y)
        count += len(x)
        if count >= SAE_TOKENS:
            break
    return torch.cat(xs)[:SAE_TOKENS], torch.cat(ys)[:SAE_TOKENS]


def train_transcoder(x: torch.Tensor, y: torch.Tensor, log) -> tuple[SkipTranscoder, dict[str, float]]:
    """A SkipTranscoder trained on sum_dims (y - y_hat)^2 + l1 * sum_i f_i ||W_dec[i]|| per token."""
    torch.manual_seed(SEED)
    hook_in, hook_out = TRANSCODER_HOOKS
    transcoder = SkipTranscoder(SkipTranscoderConfig(
        d_in=x.shape[1], d_sae=TRANSCODER_WIDTH, d_out=y.shape[1], apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            model_name=MODEL_CONFIG["model_name"], hook_name=hook_in, hook_name_out=hook_out,
            context_size=CONTEXT, prepend_bos=True, exclude_special_tokens=False,
            dataset_path="python-stdlib-docstrings",
            training_architecture_details={"l1_coefficient": TRANSCODER_L1},
        ),
    ))
    with torch.no_grad():
        transcoder.b_dec.copy_(y.mean(0))
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.Adam(transcoder.parameters(), lr=SAE_LR)

    def losses(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = transcoder.encode(x[rows])
        mse = (transcoder(x[rows]) - y[rows]).pow(2).sum(-1).mean()
        l1 = (codes * transcoder.W_dec.norm(dim=1)).sum(-1).mean()
        return mse, l1, codes

    for step in range(TRANSCODER_STEPS):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, TRANSCODER_STEPS, SAE_LR)
        mse, l1, codes = losses(torch.randint(len(x), (SAE_BATCH,), generator=generator))
        optimiser.zero_grad()
        (mse + TRANSCODER_L1 * l1).backward()
        optimiser.step()
        if step % 500 == 0 or step == TRANSCODER_STEPS - 1:
            l0 = (codes > 0).float().sum(-1).mean().item()
            log(f"transcoder step {step:4d}  mse {mse.item():.4f}  l1 {l1.item():.4f}  L0 {l0:.1f}")
    transcoder.eval()
    with torch.no_grad():
        codes = transcoder.encode(x)
        error = (transcoder(x) - y).pow(2).sum(-1).mean()
        variance = (y - y.mean(0)).pow(2).sum(-1).mean()
        stats = {
            "l0": (codes > 0).float().sum(-1).mean().item(),
            "explained_variance": 1 - (error / variance).item(),
            "dead_features": int(((codes > 0).sum(0) == 0).sum().item()),
        }
    return transcoder, stats


def write_transcoder(model: HookedTransformer, windows: torch.Tensor, out: Path, log) -> dict[str, dict]:
    """Train the transcoder, save its sae_lens folder; its MANIFEST entry."""
    transcoder, stats = train_transcoder(*mlp_activations(model, windows), log)
    folder = out / f"{TRANSCODER_FOLDER_PREFIX}{TRANSCODER_LAYER}"
    transcoder.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg, sort_keys=True))
    log(f"transcoder {TRANSCODER_HOOKS[0]} -> {TRANSCODER_HOOKS[1]}: {stats}")
    return {TRANSCODER_HOOKS[0]: {"hook_name_out": TRANSCODER_HOOKS[1], "architecture": "skip_transcoder",
                                  "d_sae": TRANSCODER_WIDTH, "l1_coefficient": TRANSCODER_L1,
                                  "steps": TRANSCODER_STEPS, **stats}}


def finish(out: Path, log) -> None:
    bundle = [p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in bundle:
        path.chmod(0o644)  # safetensors writes 0600; installed package data must be readable by all
    total = sum(p.stat().st_size for p in bundle)
    log(f"wrote {out} ({total / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "opt_hooks" / "embedded", help="target folder")
    parser.add_argument("--transcoder-only", action="store_true",
                        help="keep the bundled tokenizer, model and SAEs; (re)train only the transcoder")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    # The bundle is a HookedTransformer by design (load_default returns one); TL 3 says it is deprecated.
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
    paragraphs = stdlib_paragraphs()
    audit_texts, train_texts = split_corpus(paragraphs)
    log(f"corpus: {len(paragraphs)} paragraphs, {len(audit_texts)} kept for the audit")

    if args.transcoder_only:
        from opt_hooks.embedded import load_default, manifest

        model, _, _ = load_default()
        windows = token_windows(model.tokenizer, train_texts)
        entry = manifest()  # the rest of the bundle, build_seconds included, is as it was
        entry["transcoders"] = write_transcoder(model, windows, args.out, log)
        entry["description"] = DESCRIPTION
        (args.out / MANIFEST_FILE).write_text(json.dumps(entry, indent=1) + "\n")
        finish(args.out, log)
        return 0

    tokenizer = train_tokenizer(train_texts)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    # Reload from disk so the model holds exactly the tokenizer that load_default() will give it.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    windows = token_windows(tokenizer, train_texts)
    log(f"tokenizer: {VOCAB_SIZE} entries; {windows.numel():,} training tokens")

    model = HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG), tokenizer=tokenizer)
    model_loss = train_model(model, windows, log)
    model.eval()
    save_file(model.state_dict(), args.out / MODEL_WEIGHTS_FILE)
    (args.out / MODEL_CONFIG_FILE).write_text(json.dumps(MODEL_CONFIG, indent=1) + "\n")

    sae_stats = {}
    for layer, hook in enumerate(HOOKS):
        sae, sae_stats[hook] = train_sae(residual_activations(model, windows, hook), hook, log)
        folder = args.out / f"{SAE_FOLDER_PREFIX}{layer}"
        sae.save_inference_model(folder)
        # sae_lens writes cfg.json's keys in set order (varies with PYTHONHASHSEED): sort them
        # so that a rebuild is byte-identical.
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps(cfg, sort_keys=True))
        log(f"{hook}: {sae_stats[hook]}")
    transcoders = write_transcoder(model, windows, args.out, log)

    (args.out / AUDIT_TEXTS_FILE).write_text(json.dumps(audit_texts, indent=0, ensure_ascii=False) + "\n")
    manifest = {
        "description": DESCRIPTION,
        "seed": SEED,
        "threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sae_lens": sae_lens_version,
        "corpus": "docstrings of the Python standard library + pydoc_data.topics, paragraphs >= "
        f"{MIN_PARAGRAPH} characters; {len(audit_texts)} paragraphs held apart for the audit",
        "model": {**MODEL_CONFIG, "steps": MODEL_STEPS, "batch": MODEL_BATCH, "final_loss": round(model_loss, 4)},
        "saes": {
            hook: {"d_sae": SAE_WIDTH, "l1_coefficient": L1_COEFFICIENT, "steps": SAE_STEPS, **stats}
            for hook, stats in sae_stats.items()
        },
        "transcoders": transcoders,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    finish(args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
