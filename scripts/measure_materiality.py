"""The measurement behind the materiality defaults (docs/THEORY.md, appendix "Materiality").

Audits the embedded default with half the tokens held out and both materiality thresholds at 0,
then prints, per layer, the shares (gain / the feature's value) of the significant feature
findings and C5's share of the held-out L: a threshold below the smallest of these hides nothing.

    python scripts/measure_materiality.py [--tokens 32768] [--held-out 0.5]
"""
from __future__ import annotations

import argparse

import opt_hooks as oh
from opt_hooks.embedded import load_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--held-out", type=float, default=0.5)
    args = parser.parse_args()
    model, saes, texts = load_default()
    options = oh.AuditOptions(min_share=0.0, min_layer_share=0.0)
    result = oh.audit(model, saes, texts, n_tokens=args.tokens, held_out=args.held_out, progress=False, options=options)
    for hook, layer in result.layers.items():
        shares = sorted(c.share for f in layer.features for c in f.certificates.values() if c.tier == "certified")
        c5 = layer.layer_conditions["C5"]["certificate"]
        quantiles = [round(shares[min(len(shares) - 1, int(q * len(shares)))], 4) for q in (0, 0.1, 0.5)] if shares else []
        print(f"{hook}: {layer.n_held_out:,} held-out tokens, {len(shares)} significant feature findings, "
              f"share min / 10% / median {quantiles}; C5 {c5.tier if c5 else 'none'} share "
              f"{c5.share if c5 else None}")


if __name__ == "__main__":
    main()
