"""Benchmark: audit throughput divided by the bare pass throughput (issue goal: >= 0.8).

The bare pass is what any SAE user pays anyway: the model forward to the deepest hooked
layer plus `sae.encode`, on the same token windows, same device, same run. The audit is
measured twice: pass 1 alone (the streamed statistics) and the whole `opt_hooks.audit`
(pass 1, plan, pass 2 over audit and held-out windows: the certificates' exact checks).

    python scripts/bench_audit.py                      # CPU-sized default
    python scripts/bench_audit.py --device cuda --d-model 768 --layers 12 --d-sae 24576 --tokens 262144

A random-weight model from HookedTransformerConfig stands in for a hub model (offline);
throughput depends on shapes, not on weights.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import opt_hooks as oh
from opt_hooks.adapters import forward_to_deepest


def build(args: argparse.Namespace) -> tuple[HookedTransformer, list[StandardSAE]]:
    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_ctx=args.context, d_head=64,
        n_heads=max(1, args.d_model // 64), d_mlp=4 * args.d_model, d_vocab=args.vocab,
        act_fn="gelu", seed=0, device=args.device, dtype=getattr(torch, args.dtype),
    )
    model = HookedTransformer(cfg).eval()
    saes = []
    for layer in args.hook_layers:
        sae = StandardSAE(StandardSAEConfig(d_in=args.d_model, d_sae=args.d_sae, device=args.device))
        with torch.no_grad():  # a ReLU encoder with ~1-3% of features active per token
            sae.W_enc.normal_(0, 1 / args.d_model**0.5)
            sae.b_enc.fill_(-2.0 * float(model.blocks[0].ln1.w.norm()) / args.d_model**0.5)
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_pre"
        sae.cfg.metadata.training_architecture_details = {"l1_coefficient": 1.0}
        saes.append(sae)
    return model, saes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_pass(model, saes, windows, batch_size, device) -> float:
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    by_hook = dict(zip(hooks, saes))

    def encode(acts, hook):
        by_hook[hook.name].encode(acts)

    sync(device)
    tick = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            with model.hooks(fwd_hooks=[(h, encode) for h in hooks]):
                forward_to_deepest(model, windows[start:start + batch_size], hooks)
    sync(device)
    return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--hook-layers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, saes = build(args)
    n_windows = args.tokens // args.context
    windows = torch.randint(0, args.vocab, (n_windows, args.context))
    bare_pass(model, saes, windows[: args.batch_size], args.batch_size, args.device)  # warm-up

    bare = bare_pass(model, saes, windows, args.batch_size, args.device)
    sync(args.device)
    tick = time.perf_counter()
    result = oh.audit(model, saes, windows, n_tokens=args.tokens, batch_size=args.batch_size,
                      context_size=args.context, held_out=0.1, progress=False)
    sync(args.device)
    total = time.perf_counter() - tick
    seconds = result.meta["seconds"]
    audit_tokens = next(iter(result.layers.values())).n_tokens
    n_held = next(iter(result.layers.values())).n_held_out
    bare_rate = args.tokens / bare
    rows = [
        ("bare pass (forward + encode)", args.tokens, bare, bare_rate),
        ("audit pass 1 (statistics)", audit_tokens, seconds["pass1_s"], audit_tokens / seconds["pass1_s"]),
        ("audit pass 2 (certificates)", audit_tokens + n_held, seconds["pass2_s"], (audit_tokens + n_held) / seconds["pass2_s"]),
        ("whole audit", args.tokens, total, args.tokens / total),
    ]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; model d_model={args.d_model} layers={args.layers}; "
          f"{len(saes)} SAEs d_sae={args.d_sae} at layers {args.hook_layers}; {args.tokens} tokens\n")
    print("| stage | tokens | seconds | tokens/s | / bare |")
    print("|---|---:|---:|---:|---:|")
    for name, tokens, secs, rate in rows:
        print(f"| {name} | {tokens} | {secs:.2f} | {rate:,.0f} | {rate / bare_rate:.2f} |")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
