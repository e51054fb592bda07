"""The `opt-hooks` command line.

- `opt-hooks report`: audit SAEs on a model and write report.json, report.html and run.log;
- `opt-hooks repair`: the same inputs; audit, write the certified changes into the SAEs
  (`opt_hooks.repair`, THEORY.md section 7) and write report.json and report.html (the audit with
  a Repair section), repair.json, the repaired SAEs (saes/<hook>/, sae_lens folders) and run.log;
- `opt-hooks compare`: saved reports side by side (`opt_hooks.comparison.compare`): compare.json,
  compare.html and the terminal table.

The commands only gather inputs (model, SAEs, text), call the API (`opt_hooks.api.audit`,
`opt_hooks.repair_run.repair`) and write the results; all maths lives behind the API. `main(argv)`
returns the exit code, so tests and `scripts/layer_report.py` can call it in-process.
"""
from __future__ import annotations

import argparse
import difflib
import io
import logging
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_hooks.policy import VerdictPolicy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FINDINGS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUN_LOG = "run.log"
DEFAULT_TOKENS = 1_000_000  # as opt_hooks.audit; the embedded default uses its own, smaller count
DEFAULT_CONTEXT = 128  # as opt_hooks.audit; the SAE's metadata context_size comes first
LAYER_TEMPLATE = "{layer}"
POLICY = VerdictPolicy()  # the verdict defaults the flags show
REPAIR_HELD_OUT = 0.2  # as opt_hooks.repair_run.repair: the test share
REPAIR_AUDIT_HELD_OUT = 0.25  # as opt_hooks.RepairOptions: the validation share of the rest

log = logging.getLogger("opt_hooks.cli")

DESCRIPTION = """\
Audit sparse autoencoders (SAEs) against the first-order optimality conditions of the L1
dictionary-learning objective, and report which features are provably non-optimal.

With no arguments it audits the embedded default, offline: a tiny GPT-2-style model trained
on Python's own documentation, with one standard SAE per layer (under a minute on 2 CPU
cores), and writes reports/embedded/.
"""

EPILOG = """\
examples:
  opt-hooks report
  opt-hooks report --sae-release gpt2-small-res-jb --layers 0-11 \\
      --dataset NeelNanda/pile-10k --tokens 2M --out reports/gpt2
  opt-hooks report --model gpt2-small --sae-release gpt2-small-res-jb \\
      --sae-id 'blocks.{layer}.hook_resid_pre' --layers 6,8 --dataset corpus.txt
  opt-hooks report --model ./my-hf-model --sae-path './saes/layer_{layer}' --layers 0-3 \\
      --dataset ./corpus.jsonl --device cuda --fail-on certified

  --model defaults to the model named by the SAE release (or the SAE's own metadata);
  --sae-release without --sae-id picks the release's SAE for each of --layers;
  --dataset, --context-size and --prepend-bos default to the SAE's metadata (dataset_path,
  context_size, prepend_bos), as SAE-Lens's ActivationsStore.from_sae reads them; where it names
  none, to the bundled text corpus (Python documentation), 128 and BOS. The run log says which.

tiers (of each feature, C2 pair and layer-wide condition):
  certified  a certificate (a fixed change of the SAE, chosen on the audit tokens) lowers the
             objective on held-out tokens, significantly (Bonferroni over the layer's
             certificates, --alpha) and materially (--min-share of the feature's value,
             --min-layer-share of the layer's L): provably not optimal, by an amount that matters
  violated   it lowers the objective on the audit tokens, but held out not significantly or
             not materially (the report says which)
  satisfied  no certificate lowers the objective on the audit tokens
  Standard (L1) SAEs get exact statements; TopK, JumpReLU, gated, Matryoshka SAEs are judged
  by the L1 surrogate's conditions, labelled "L1 surrogate" (C3 and C5 hold for all).
  Transcoders (--sae-path folders of sae_lens' transcoder classes) are audited in their output
  space, read at metadata.hook_name and compared at metadata.hook_name_out; skip transcoders
  also get C7 (skip stationarity).

output, in --out (default reports/<name>; refused if not empty, unless --overwrite):
  report.json  the audit (compact; a feature's non-certified checks as their verdicts), described
               by opt_hooks/report/schema.json
  report.html  one self-contained page (works offline): plots, sortable tables, pair figures
  tables/      per layer: every row as parquet (certificates as columns) and an SAEBench-style
               <release>_<sae_id>_eval_results.json
  run.log      the run's log: arguments, versions, timings, warnings, errors with tracebacks

exit codes:
  0    report written
  1    the run failed: a model, SAE or dataset could not be loaded (the hub offline: give local
       folders), --out is not empty and --overwrite was not given, or an internal error (the
       message and run.log say which)
  2    usage error: unknown, malformed or conflicting flags
  3    report written, and --fail-on found a feature, pair or layer condition at that tier
  130  interrupted (Ctrl-C)
"""


REPAIR_DESCRIPTION = """\
Repair sparse autoencoders (SAEs): audit them as `opt-hooks report` does, write the certified
changes into them (C1 floors into b_dec, the C5 bias step, C3 atom turns, C4 code scales, then
duplicates merged and free latents resampled; THEORY.md section 7), keep each change only where
it lowers the objective on tokens it was not chosen on, and measure the repaired SAEs against
the originals on test tokens that neither the audit nor the repair read.

With no arguments it repairs the embedded default, offline (the tiny bundled GPT-2-style model
and its SAEs), and writes reports/embedded-repair/.
"""

REPAIR_EPILOG = """\
examples:
  opt-hooks repair
  opt-hooks repair --tokens 64k --rounds 2
  opt-hooks repair --sae-release gpt2-small-res-jb --layers 6,8 \\
      --dataset NeelNanda/pile-10k --tokens 2M --out reports/gpt2-repair

  The inputs are those of `opt-hooks report` (see opt-hooks report --help).

tokens (windows of text, every part evenly spaced):
  test        --held-out of them (default 0.2): read only at the end, for the before / after table
  validation  --audit-held-out of the rest (default 0.25): the audit's held-out tokens, where
              every certificate is certified and every step of the repair is kept only when it
              lowers L significantly (Bonferroni over the layer's steps, --alpha)
  audit       the rest: where the audit chooses its certificates

output, in --out (default reports/<name>-repair; refused if not empty, unless --overwrite):
  report.json  the (first round's) audit with the repair: schema opt_hooks/report/schema.json
  report.html  one self-contained page, with a Repair section: before / after and every step
  repair.json  the repair alone: {meta, table, changes}
  saes/<hook>/ each repaired SAE, a sae_lens folder (sae_lens.SAE.load_from_disk reads it)
  run.log      the run's log: arguments, versions, timings, warnings, errors with tracebacks

exit codes:
  0    repair written
  1    the run failed (the message and run.log say why)
  2    usage error: unknown, malformed or conflicting flags
  130  interrupted (Ctrl-C)
"""


COMPARE_DESCRIPTION = """\
Compare saved reports side by side (folders written by opt-hooks report or opt-hooks repair, or
their report.json): per layer, matched by hook name, each report's scope, lam, tokens, held-out
objective, layer gaps, tier counts, certified counts per condition, pair-map counts and repair
table, and each report's differences from the first, with an SE where both values have one.
"""

COMPARE_EPILOG = """\
examples:
  opt-hooks compare reports/a reports/b
  opt-hooks compare reports/16k reports/32k reports/64k --names 16k,32k,64k --out reports/widths

  The first report is the reference: the others' differences are taken from it. A difference's SE
  is sqrt(se_a^2 + se_b^2), exact for reports on different tokens and conservative on the same
  tokens; a difference is marked significant (*) only with an SE (two-sided, Bonferroni over the
  comparison's differences, alpha 0.05). The settings the reports differ in are listed first.

output, in --out (default reports/compare; refused if not empty, unless --overwrite):
  compare.json  every report's values per matched layer, the differences and the settings
  compare.html  one self-contained page (works offline)

exit codes:
  0    comparison written
  1    a report could not be read (a folder without report.json, another schema version), or
       --out is not empty and --overwrite was not given
  2    usage error: fewer than two reports, --names not one name per report
"""


class UsageError(Exception):
    """Flags that cannot work together; reported like argparse's own errors (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opt-hooks", description="SAE optimality audits.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="audit SAEs and write a report (no arguments: the embedded default)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(report, "report")
    repair = commands.add_parser(
        "repair",
        help="audit SAEs, apply the certified changes, write the repaired SAEs and a report",
        description=REPAIR_DESCRIPTION,
        epilog=REPAIR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(repair, "repair")
    compare = commands.add_parser(
        "compare",
        help="saved reports side by side: compare.json, compare.html and a terminal table",
        description=COMPARE_DESCRIPTION,
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("reports", nargs="+", metavar="REPORT_DIR",
                         help="report folders (or their report.json), the first the reference")
    compare.add_argument("--names", metavar="A,B,...", help="one name per report (default: the folders' names)")
    compare.add_argument("--out", type=Path, metavar="FOLDER", help="output folder (default reports/compare)")
    compare.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty --out, replacing compare.json and compare.html")
    return parser


def add_arguments(command: argparse.ArgumentParser, name: str) -> None:
    """The flags of `opt-hooks report` (name "report") or `opt-hooks repair` ("repair"): the same
    inputs; each command has its own --held-out and a few flags of its own."""
    source = command.add_argument_group("what to audit")
    source.add_argument(
        "--model", metavar="NAME|FOLDER", help="TransformerLens model name, or a local Hugging Face model folder"
    )
    source.add_argument("--sae-release", metavar="RELEASE", help="SAE-Lens registry release, e.g. gpt2-small-res-jb")
    source.add_argument(
        "--sae-id", nargs="+", metavar="ID", help="SAE id(s) in the release: one per layer, or one with {layer}"
    )
    source.add_argument(
        "--sae-path", nargs="+", metavar="FOLDER", help="local SAE folder(s) (sae_lens format), or one with {layer}"
    )
    source.add_argument("--layers", type=parse_layers, metavar="SPEC", help="layers to audit: 0-11, 3,5,7 or 0-3,8")
    source.add_argument(
        "--hook-name", nargs="+", metavar="HOOK",
        help="hook point(s) to attach the SAEs to: one per SAE, or one with {layer} (default: each SAE's "
        "metadata hook_name)",
    )
    data = command.add_argument_group("data (defaults: the SAEs' metadata, as SAE-Lens's ActivationsStore.from_sae)")
    data.add_argument(
        "--dataset", metavar="NAME|PATH",
        help="Hugging Face dataset name, or a local .txt/.jsonl/.parquet file or folder of them (default: the "
        "SAE's metadata dataset_path, else the bundled Python-documentation corpus)",
    )
    data.add_argument("--text-column", metavar="NAME", help="the dataset's text column (default: text, else its only one)")
    data.add_argument("--split", default="train", help="the Hugging Face dataset's split (default train)")
    data.add_argument(
        "--tokens", type=parse_count, metavar="N",
        help=f"tokens to {'audit' if name == 'report' else 'read in all'}, e.g. 200000, 200k, 2M "
        f"(default {DEFAULT_TOKENS:,}; embedded: 32,768)",
    )
    data.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward pass (default 16)")
    data.add_argument(
        "--context-size", type=int, metavar="N",
        help=f"tokens per sequence (default: the SAE's metadata context_size, else {DEFAULT_CONTEXT})",
    )
    data.add_argument(
        "--prepend-bos", action=argparse.BooleanOptionalAction,
        help="start every sequence with the BOS token (default: the SAE's metadata prepend_bos, else yes)",
    )
    data.add_argument(
        "--include-special-tokens", action="store_true",
        help="audit BOS / EOS / padding positions too (default: left out)",
    )
    if name == "report":
        data.add_argument(
            "--held-out", type=float, default=0.1, metavar="SHARE",
            help="share of tokens kept to confirm certificates (default 0.1)",
        )
    else:
        data.add_argument(
            "--held-out", type=float, default=REPAIR_HELD_OUT, metavar="SHARE",
            help=f"share of tokens kept as test tokens for the before / after table (default {REPAIR_HELD_OUT:g})",
        )
        data.add_argument(
            "--audit-held-out", type=float, default=REPAIR_AUDIT_HELD_OUT, metavar="SHARE",
            help="share of the other tokens the audit holds out: the validation tokens every step is checked on "
            f"(default {REPAIR_AUDIT_HELD_OUT:g})",
        )
        data.add_argument(
            "--rounds", type=int, default=1, metavar="N",
            help="audit -> apply, repeated on the repaired SAEs (default 1)",
        )
    run = command.add_argument_group("run")
    run.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    run.add_argument("--seed", type=int, default=0, help="seed of every random generator (default 0)")
    run.add_argument(
        "--out", type=Path, metavar="FOLDER",
        help=f"output folder (default reports/<name>{'' if name == 'report' else '-repair'})",
    )
    run.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty --out, replacing report files" + ("" if name == "report" else " and saes/"),
    )
    if name == "report":
        run.add_argument(
            "--checkpoint-every", type=parse_count, metavar="N",
            help="save the audit's state to <out>/checkpoint every N tokens (e.g. 1M); it is also saved after each pass",
        )
        run.add_argument(
            "--resume", action="store_true",
            help="continue an interrupted run from <out>/checkpoint (give the same flags again)",
        )
        run.add_argument(
            "--fail-on", choices=("certified", "violated"),
            help="exit 3 when anything reaches this tier (violated includes certified)",
        )
        run.add_argument(
            "--nonfinite", choices=("raise", "skip"), default="raise",
            help="NaN / inf activations or codes: stop (raise, the default) or leave those tokens out, counted (skip)",
        )
        run.add_argument(
            "--allow-model-mismatch", action="store_true",
            help="no warning when an SAE's metadata names another model than --model",
        )
    run.add_argument("--quiet", action="store_true", help="no progress bars and no summary; errors only")
    verdicts = command.add_argument_group("verdicts (THEORY.md section 3)")
    verdicts.add_argument(
        "--lam", nargs="+", metavar="LAM|HOOK=LAM",
        help="the L1 coefficient: one number for every SAE, or HOOK=LAM pairs (others keep the default: "
        "the SAE's training config, else estimated on the first audit tokens)",
    )
    verdicts.add_argument("--alpha", type=float, default=POLICY.alpha, metavar="A",
                          help=f"significance level per layer, Bonferroni-corrected (default {POLICY.alpha:g})")
    verdicts.add_argument("--min-share", type=float, default=POLICY.min_share, metavar="S",
                          help=f"materiality: held-out gain / the feature's value (default {POLICY.min_share:g})")
    verdicts.add_argument("--min-layer-share", type=float, default=POLICY.min_layer_share, metavar="S",
                          help=f"materiality of layer findings: gain / held-out L (default {POLICY.min_layer_share:g})")


def parse_layers(spec: str) -> list[int]:
    """'0-11' -> [0..11]; '3,5,7' -> [3, 5, 7]; '0-3,8' -> [0, 1, 2, 3, 8] (sorted, unique)."""
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"bad layer spec {spec!r}: use forms like 0-11, 3,5,7 or 0-3,8")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise argparse.ArgumentTypeError(f"bad layer range {part.strip()!r}: the end is below the start")
        layers.update(range(first, last + 1))
    return sorted(layers)


def parse_count(text: str) -> int:
    """'200000', '200_000', '200k', '2M', '1.5m' -> an int > 0."""
    match = re.fullmatch(r"\s*([\d_]+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (examples: 200000, 200k, 2M)")
    value = float(match[1].replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2].lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"token count must be positive, got {text!r}")
    return int(value)


def layer_of(name: str) -> int | None:
    """The layer number in a hook name or SAE id: blocks.8.hook_resid_pre, layer_12/width_16k, ..."""
    match = re.search(r"(?:^|[./_-])(?:blocks|layers?)[._]?(\d+)(?=\D|$)", name)
    return int(match[1]) if match else None


def expand(templates: list[str], layers: list[int] | None, flag: str) -> list[str]:
    """One entry per layer: a single {layer} template is filled in, explicit lists are kept."""
    if len(templates) == 1 and LAYER_TEMPLATE in templates[0]:
        if not layers:
            raise UsageError(f"{flag} {templates[0]!r} has {LAYER_TEMPLATE}: give --layers")
        return [templates[0].replace(LAYER_TEMPLATE, str(layer)) for layer in layers]
    if any(LAYER_TEMPLATE in t for t in templates):
        raise UsageError(f"{flag}: give either one {LAYER_TEMPLATE} template or explicit values, not both")
    if layers and len(layers) != len(templates):
        raise UsageError(f"{flag} gives {len(templates)} value(s) for {len(layers)} layer(s) in --layers")
    return templates


@dataclass
class Inputs:
    """Everything audit() / repair() need, plus what the report says about where it came from."""

    model: Any
    saes: list[Any]
    dataset: Any
    n_tokens: int
    facts: dict[str, Any] = field(default_factory=dict)
    context_size: int = DEFAULT_CONTEXT
    prepend_bos: bool = True
    hook_names: list[str] | None = None  # the API's hook_names (--hook-name); None: each SAE's own
    hooks: list[str] = field(default_factory=list)  # the hook of every SAE, in order
    dataset_label: str = ""  # the dataset, in words, for messages
    data_sources: dict[str, str] = field(default_factory=dict)  # where dataset, context size and BOS came from


def resolve_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_flags(args: argparse.Namespace) -> None:
    if args.sae_id and not args.sae_release:
        raise UsageError("--sae-id needs --sae-release")
    if args.sae_release and args.sae_path:
        raise UsageError("give --sae-release or --sae-path, not both")
    if args.model and not (args.sae_release or args.sae_path):
        raise UsageError("--model needs SAEs: give --sae-release or --sae-path")
    if not 0 <= args.held_out < 1:
        raise UsageError(f"--held-out is a share in [0, 1), got {args.held_out}")
    if args.command == "repair":
        for flag, value in (("--held-out", args.held_out), ("--audit-held-out", args.audit_held_out)):
            if not 0 < value < 1:
                raise UsageError(f"{flag} of a repair is a share in (0, 1), got {value}")
        if args.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    for flag, value in (("--batch-size", args.batch_size), ("--context-size", args.context_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    try:
        audit_options(args)
    except ValueError as error:
        raise UsageError(f"--alpha / --min-share / --min-layer-share: {error}") from error
    if args.lam:
        args.lam = parse_lam(args.lam)
    if args.sae_id:
        args.sae_id = expand(args.sae_id, args.layers, "--sae-id")
    if args.sae_path:
        args.sae_path = expand(args.sae_path, args.layers, "--sae-path")
    if args.hook_name:
        args.hook_name = expand(args.hook_name, args.layers, "--hook-name")


def parse_lam(values: list[str]) -> float | dict[str, float]:
    """--lam: ['0.5'] -> 0.5 (every SAE); ['blocks.0.hook_resid_pre=0.5', ...] -> {hook: lam} (the
    API's `lam`, a number or a mapping; hooks left out keep their default)."""
    if len(values) == 1 and "=" not in values[0]:
        return lam_value(values[0], "--lam")
    pairs: dict[str, float] = {}
    for item in values:
        hook, equals, value = (part.strip() for part in item.partition("="))
        if not (equals and hook):
            raise UsageError(f"--lam takes one number, or HOOK=LAM pairs (blocks.6.hook_resid_pre=5.0), got {item!r}")
        if hook in pairs:
            raise UsageError(f"--lam gives {hook} twice")
        pairs[hook] = lam_value(value, f"--lam {hook}")
    return pairs


def lam_value(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a finite number > 0, got {text}")
    return value


def audit_options(args: argparse.Namespace) -> Any:
    from opt_hooks.engine import AuditOptions

    return AuditOptions(alpha=args.alpha, min_share=args.min_share, min_layer_share=args.min_layer_share)


def embedded_inputs(args: argparse.Namespace, device: str) -> Inputs:
    from opt_hooks import embedded

    model, saes, _ = embedded.load_default(device=device)
    if args.layers is not None:
        saes = {hook: sae for hook, sae in saes.items() if layer_of(hook) in args.layers}
        if not saes:
            raise ValueError(
                f"the embedded model has no SAE at layers {args.layers}; it has layers 0-{model.cfg.n_layers - 1}"
            )
    chosen = list(saes.values())
    hooks = sae_hooks(args, chosen, list(saes))
    data = choose_data(args, chosen, hooks, embedded=True)
    manifest = embedded.manifest()
    facts = {"source": "embedded default", "model": manifest["model"]["model_name"], "corpus": manifest["corpus"]}
    return Inputs(model, chosen, n_tokens=args.tokens or embedded.DEFAULT_TOKENS, facts=facts,
                  hook_names=args.hook_name, hooks=hooks, **data)


def release_saes(args: argparse.Namespace, device: str) -> tuple[list[Any], str]:
    """SAEViews for the chosen ids of a registry release (they keep the Neuronpedia id), and its model."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from opt_hooks.adapters.sae import SAEView

    entry = get_pretrained_saes_directory().get(args.sae_release)
    if entry is None:
        raise ValueError(
            f"--sae-release {args.sae_release!r} is not in SAE-Lens's registry (sae_lens pretrained_saes.yaml)"
        )
    ids = args.sae_id or ids_for_layers(list(entry.saes_map), args.layers, args.sae_release)
    unknown = [i for i in ids if i not in entry.saes_map]
    if unknown:
        raise ValueError(f"release {args.sae_release!r} has no SAE id {unknown[0]!r}; e.g. {list(entry.saes_map)[:3]}")
    hook_names = args.hook_name or [None] * len(ids)
    if len(hook_names) != len(ids):
        raise UsageError(f"--hook-name gives {len(hook_names)} hook(s) for {len(ids)} SAE(s)")
    views = []
    for sae_id, hook_name in zip(ids, hook_names):
        log.info("loading SAE %s / %s", args.sae_release, sae_id)
        with hub_errors(f"the SAE {args.sae_release} / {sae_id}", "give local SAE folders (sae_lens format) with --sae-path"):
            views.append(SAEView.from_pretrained(args.sae_release, sae_id, device=device, hook_name=hook_name))
    return views, entry.model


def ids_for_layers(ids: list[str], layers: list[int] | None, release: str) -> list[str]:
    if not layers:
        raise UsageError(f"choose SAEs of {release!r} with --layers or --sae-id (it has {len(ids)}, e.g. {ids[:3]})")
    chosen = []
    for layer in layers:
        matches = [i for i in ids if layer_of(i) == layer]
        if len(matches) != 1:
            found = f"{len(matches)} ids: {matches[:4]}" if matches else "no id"
            raise UsageError(
                f"layer {layer} of {release!r} matches {found}; pick with --sae-id (a {LAYER_TEMPLATE} template works)"
            )
        chosen += matches
    return chosen


# -- what the SAEs' metadata says: hooks, dataset, context size, BOS ----------------------------

FROM_METADATA = "from the SAE's metadata"
BUNDLED = "the bundled Python-documentation corpus"


def sae_metadata(sae: Any) -> Any:
    """`cfg.metadata` of an SAE-Lens SAE, or of the one an SAEView (a release's SAE) holds."""
    from opt_hooks.adapters.sae import SAEView

    return (sae.sae if isinstance(sae, SAEView) else sae).cfg.metadata


def sae_hooks(args: argparse.Namespace, saes: list[Any], labels: list[str]) -> list[str]:
    """The hook of every SAE: --hook-name, else its own (an SAEView's, else its metadata hook_name)."""
    if args.hook_name:
        if len(args.hook_name) != len(saes):
            raise UsageError(f"--hook-name gives {len(args.hook_name)} hook(s) for {len(saes)} SAE(s)")
        hooks = list(args.hook_name)
    else:
        hooks = [getattr(sae, "hook_name", None) or sae_metadata(sae).hook_name for sae in saes]
    for label, hook in zip(labels, hooks):
        if not hook:
            raise UsageError(f"the SAE {label} names no hook point (cfg.metadata.hook_name is empty): give --hook-name")
    if isinstance(args.lam, dict):
        unknown = [hook for hook in args.lam if hook not in hooks]
        if unknown:
            raise UsageError(f"--lam {unknown[0]}=...: no SAE here is on that hook; the hooks: {', '.join(hooks)}")
    return hooks


def first_named(saes: list[Any], hooks: list[str], name: str) -> Any:
    """The metadata field `name` of the first SAE that names it (None: none does), with a warning
    when the SAEs disagree."""
    named = [(hook, value) for hook, sae in zip(hooks, saes) if (value := getattr(sae_metadata(sae), name)) is not None]
    if not named:
        return None
    first = named[0][1]
    if any(value != first for _, value in named):
        each = ", ".join(f"{hook}: {value!r}" for hook, value in named)
        log.warning("the SAEs' metadata disagree on %s (%s): using the first, %r", name, each, first)
    return first


def choose_data(args: argparse.Namespace, saes: list[Any], hooks: list[str], embedded: bool) -> dict[str, Any]:
    """The dataset, context size and prepend-BOS of the run: each flag given, else the SAEs' metadata
    (`dataset_path`, `context_size`, `prepend_bos`, as SAE-Lens's `ActivationsStore.from_sae` reads
    them), else the defaults; the embedded default always audits the bundled corpus (its SAEs'
    metadata names it by a name no hub knows). Logged in one line with where each value came from;
    returned as Inputs' fields."""
    from opt_hooks import embedded as bundled
    from opt_hooks.adapters.data import looks_like_a_path

    # only the fields no flag gives are read (and warned about when the SAEs disagree)
    flags = {"dataset_path": args.dataset, "context_size": args.context_size, "prepend_bos": args.prepend_bos}
    named = {key: None if flag is not None else first_named(saes, hooks, key) for key, flag in flags.items()}
    where = {}
    if args.dataset is not None:
        dataset, label, where["dataset"] = args.dataset, str(args.dataset), "from --dataset"
    elif embedded:
        dataset, label, where["dataset"] = bundled.load_texts(), BUNDLED, "the embedded default"
    elif named["dataset_path"]:
        dataset = label = str(named["dataset_path"])
        where["dataset"] = FROM_METADATA
        if looks_like_a_path(dataset) and not Path(dataset).expanduser().exists():
            raise FileNotFoundError(
                f"the SAE's metadata names the dataset {dataset}, which is not here: give --dataset "
                "(a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset name)"
            )
    else:
        log.warning(
            "no --dataset: auditing on the bundled Python-documentation corpus; "
            "give --dataset for text like the SAEs' training data"
        )
        dataset, label, where["dataset"] = bundled.load_texts(), BUNDLED, "no --dataset, and the SAE's metadata names none"
    if args.context_size is not None:
        context_size, where["context_size"] = args.context_size, "from --context-size"
    elif named["context_size"]:
        context_size, where["context_size"] = int(named["context_size"]), FROM_METADATA
    else:
        context_size, where["context_size"] = DEFAULT_CONTEXT, "the default"
    if args.prepend_bos is not None:
        prepend_bos = args.prepend_bos
        where["prepend_bos"] = "from --prepend-bos" if prepend_bos else "from --no-prepend-bos"
    elif named["prepend_bos"] is not None:
        prepend_bos, where["prepend_bos"] = bool(named["prepend_bos"]), FROM_METADATA
    else:
        prepend_bos, where["prepend_bos"] = True, "the default"
    shown = {"dataset": label, "context": context_size, "prepend_bos": prepend_bos}
    groups: dict[str, list[str]] = {}
    for (name, value), source in zip(shown.items(), (where["dataset"], where["context_size"], where["prepend_bos"])):
        groups.setdefault(source, []).append(f"{name} {value}")
    log.info("%s", "; ".join(f"{', '.join(items)}: {source}" for source, items in groups.items()))
    return {"dataset": dataset, "context_size": context_size, "prepend_bos": prepend_bos, "dataset_label": label,
            "data_sources": where}


def data_facts(args: argparse.Namespace, inputs: Inputs) -> dict[str, Any]:
    """meta.run.data: what was read and how, and where each of dataset, context size and BOS came from."""
    facts = {"dataset": inputs.dataset_label, "context_size": inputs.context_size, "prepend_bos": inputs.prepend_bos,
             "split": args.split, "text_column": args.text_column, "from": inputs.data_sources}
    return {key: value for key, value in facts.items() if value is not None}


# -- loading from the hub ----------------------------------------------------------------------

OFFLINE_SETTINGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# The errors of an unreachable hub, by exact class name, anywhere in the chain: huggingface_hub's
# offline errors (which datasets and transformers raise from), the ConnectionError datasets raises,
# the connection errors of requests, httpx and sockets. Subclasses (ConnectionResetError, ...) are
# not the hub's.
HUB_UNREACHABLE = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                   "ConnectTimeout", "gaierror"}


class HubUnreachable(RuntimeError):
    """A model, SAE or dataset that only the Hugging Face hub has, while the hub cannot be reached."""


def hub_unreachable(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in HUB_UNREACHABLE:
            return True
        error = error.__cause__ or error.__context__
    return False


def offline_setting() -> str | None:
    """'HF_HUB_OFFLINE=1' when one of the hub libraries' offline switches is set, else None."""
    for name in OFFLINE_SETTINGS:
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{name}={os.environ[name]}"
    return None


@contextmanager
def hub_errors(what: str, instead: str) -> Iterator[None]:
    """An unreachable hub while loading `what`: one line that says so (naming the offline switch
    when one is set) and what to give instead; other errors pass through unchanged."""
    try:
        yield
    except Exception as error:
        if not hub_unreachable(error):
            raise
        setting = offline_setting()
        why = f"the Hugging Face hub is offline ({setting} is set)" if setting else "the Hugging Face hub cannot be reached"
        raise HubUnreachable(f"cannot load {what}: {why} and it is not in the local cache; {instead} instead") from error


def check_model_name(name: str, named_by: str) -> None:
    """A model name TransformerLens does not know: one line that says to give --model (instead of
    TransformerLens's list of every name it knows)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name, make_model_alias_map

    try:
        get_official_model_name(name)
    except ValueError:
        close = difflib.get_close_matches(name.lower(), list(make_model_alias_map()), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        if named_by == "--model":
            unknown = f"--model {name!r} is not a folder, nor a model TransformerLens knows{hint}"
        else:
            unknown = f"{named_by} names the model {name!r}, which TransformerLens does not know{hint}"
        raise UsageError(
            f"{unknown}: give --model NAME (a TransformerLens model name, or a local Hugging Face model folder)"
        ) from None


def load_model(name: str, device: str, model_kwargs: dict[str, Any], named_by: str = "--model") -> Any:
    """A local folder boots a TransformerBridge; a name loads the TransformerLens model the way
    SAE-Lens trains on it (no weight processing, plus the SAE's own `model_from_pretrained_kwargs`)."""
    if Path(name).is_dir():
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(str(Path(name).resolve()), device=device)
    from sae_lens.load_model import load_model as sae_lens_load_model

    check_model_name(name, named_by)
    with hub_errors(f"the model {name}", "give --model a local Hugging Face model folder"):
        return sae_lens_load_model("HookedTransformer", name, device=device, model_from_pretrained_kwargs=model_kwargs)


def user_inputs(args: argparse.Namespace, device: str) -> Inputs:
    if args.sae_release:
        saes, registry_model = release_saes(args, device)
        labels = [f"{args.sae_release} / {view.sae_id}" for view in saes]
        hook_names = None  # given to the SAEViews already
    else:
        from sae_lens import SAE

        saes = []
        for folder in args.sae_path:
            log.info("loading SAE %s", folder)
            saes.append(SAE.load_from_disk(folder, device=device))
        registry_model, labels, hook_names = None, list(args.sae_path), args.hook_name
    hooks = sae_hooks(args, saes, labels)
    data = choose_data(args, saes, hooks, embedded=False)  # before the model: a missing dataset is found at once
    metadata = sae_metadata(saes[0])
    model_name = args.model or registry_model or metadata.model_name
    if not model_name:
        raise UsageError("the SAEs do not name their model: give --model")
    named_by = "--model" if args.model else f"the release {args.sae_release}" if registry_model else "the SAE's metadata"
    log.info("loading model %s", model_name)
    model = load_model(model_name, device, dict(metadata.model_from_pretrained_kwargs or {}), named_by)
    facts = {
        "source": "user", "model": model_name,
        "sae_release": args.sae_release, "sae_ids": args.sae_id, "sae_paths": args.sae_path,
    }
    return Inputs(model, saes, n_tokens=args.tokens or DEFAULT_TOKENS, facts={k: v for k, v in facts.items() if v},
                  hook_names=hook_names, hooks=hooks, **data)


def load_inputs(args: argparse.Namespace, device: str) -> Inputs:
    inputs = embedded_inputs(args, device) if uses_embedded(args) else user_inputs(args, device)
    inputs.facts["data"] = data_facts(args, inputs)
    return inputs


def run_kwargs(args: argparse.Namespace, inputs: Inputs) -> dict[str, Any]:
    """The keywords of `opt_hooks.audit` and `opt_hooks.repair` alike, from the flags and the inputs."""
    return {
        "n_tokens": inputs.n_tokens, "batch_size": args.batch_size, "context_size": inputs.context_size,
        "held_out": args.held_out, "device": None,  # the model and SAEs were loaded on the device already
        "hook_names": inputs.hook_names, "lam": args.lam, "text_column": args.text_column, "split": args.split,
        "prepend_bos": inputs.prepend_bos, "include_special_tokens": args.include_special_tokens,
        "options": audit_options(args),
    }


def audit_kwargs(args: argparse.Namespace, inputs: Inputs, out: Path) -> dict[str, Any]:
    """`opt_hooks.audit`'s keywords for `opt-hooks report`: run_kwargs and the report's own."""
    return {
        **run_kwargs(args, inputs), "allow_model_mismatch": args.allow_model_mismatch, "nonfinite": args.nonfinite,
        "checkpoint_dir": out / CHECKPOINT_DIR, "checkpoint_every": args.checkpoint_every, "resume": args.resume,
    }


def dataset_errors(inputs: Inputs) -> Any:
    """hub_errors for a Hugging Face dataset, which the API opens (local data never reaches the hub)."""
    if not isinstance(inputs.dataset, str) or Path(inputs.dataset).expanduser().exists():
        return nullcontext()
    named = " (named by the SAE's metadata)" if inputs.data_sources.get("dataset") == FROM_METADATA else ""
    return hub_errors(f"the dataset {inputs.dataset_label}{named}",
                      "give --dataset a local .txt, .jsonl or .parquet file or folder")


def check_out(out: Path, overwrite: bool, replaced: str, resumable: bool = False) -> None:
    """`check_out_dir` before anything slow happens, in the CLI's words (--overwrite, not overwrite=True)."""
    from opt_hooks.report import check_out_dir

    try:
        check_out_dir(out, overwrite)
    except FileExistsError:
        checkpointed = resumable and (out / CHECKPOINT_DIR).is_dir()
        resume = ", or --resume to continue the run checkpointed there" if checkpointed else ""
        raise FileExistsError(
            f"output folder {out} is not empty: give --overwrite to replace {replaced}{resume}, or choose another --out"
        ) from None


def uses_embedded(args: argparse.Namespace) -> bool:
    return not (args.model or args.sae_release or args.sae_path)


def default_out(args: argparse.Namespace) -> Path:
    """reports/embedded, or reports/<model, release or SAE folder name>; a repair's with "-repair"."""
    suffix = "-repair" if getattr(args, "command", "report") == "repair" else ""
    if uses_embedded(args):
        return Path("reports") / f"embedded{suffix}"
    name = Path(args.model or args.sae_release or args.sae_path[0]).name
    return Path("reports") / ((re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "report") + suffix)


@contextmanager
def library_prints(quiet: bool) -> Iterator[None]:
    """With --quiet, what libraries print (TransformerLens: "Moving model to device") goes to
    run.log instead of stdout."""
    if not quiet:
        yield
        return
    captured = io.StringIO()
    try:
        with redirect_stdout(captured):
            yield
    finally:
        if captured.getvalue().strip():
            log.debug("printed by libraries:\n%s", captured.getvalue().rstrip())


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch threads (None: leave as is), restoring the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def run_log(out: Path, quiet: bool, append: bool = False) -> Iterator[None]:
    """While the run lasts: run.log gets opt_hooks's messages down to DEBUG (tracebacks
    included) and every library's INFO and warnings; the console gets opt_hooks's INFO and
    warnings (only errors with --quiet). Logging is left as it was found afterwards."""
    file_handler = logging.FileHandler(out / RUN_LOG, mode="a" if append else "w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    root, package, warnings_log = logging.getLogger(), logging.getLogger("opt_hooks"), logging.getLogger("py.warnings")
    levels = root.level, package.level
    root.setLevel(logging.INFO)
    package.setLevel(logging.DEBUG)
    root.addHandler(file_handler)
    package.addHandler(console)
    warnings_log.addHandler(console)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warnings_log.removeHandler(console)
        package.removeHandler(console)
        root.removeHandler(file_handler)
        root.setLevel(levels[0])
        package.setLevel(levels[1])
        file_handler.close()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("opt_hooks", "torch", "transformer-lens", "sae-lens"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def reached(result: Any, fail_on: str) -> bool:
    """Whether any feature, pair or layer-wide condition is at tier `fail_on` or worse."""
    bad = {"certified"} if fail_on == "certified" else {"certified", "violated"}
    for layer in result.layers.values():
        tiers = {f.tier for f in layer.features} | {p.tier for p in layer.pairs}
        tiers |= {c.get("tier", "satisfied") for c in layer.layer_conditions.values()}
        if tiers & bad:
            return True
    return False


def start_run(args: argparse.Namespace, argv: list[str], name: str) -> tuple[str, str, Inputs]:
    """Log the command line and versions, seed, pick the device and load the inputs of `name`."""
    command = shlex.join(["opt-hooks", name, *argv])
    log.debug("command: %s", command)
    log.debug("versions: %s", versions())
    seed_everything(args.seed)
    device = resolve_device(args.device)
    with library_prints(args.quiet):
        inputs = load_inputs(args, device)
    return command, device, inputs


class FailureLog:
    """Around a command's run: a UsageError (found once a registry or an SAE was read) goes up to
    main(), which reports it; any other error is logged, its traceback in run.log only, and
    `failed` is set for the command to return EXIT_FAILED. Ctrl-C passes through."""

    def __init__(self, out: Path) -> None:
        self.out, self.failed = out, False

    def __enter__(self) -> "FailureLog":
        return self

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> bool:
        if isinstance(error, UsageError):
            log.debug("usage error: %s", error)
            return False
        if not isinstance(error, Exception):
            return False
        log.debug("traceback", exc_info=(kind, error, trace))
        log.error("error: %s (details in %s)", error, self.out / RUN_LOG)
        self.failed = True
        return True


def run_report(args: argparse.Namespace, argv: list[str]) -> int:
    from opt_hooks.report import REPORT_HTML, render_summary, write_report

    start = time.perf_counter()
    out = args.out or default_out(args)
    if not is_writer():  # under torchrun only rank 0 writes; the others stream their share
        return audit_share(args)
    check_out(out, args.overwrite or args.resume, "its report files", resumable=True)  # before anything slow happens
    # Imported only now (torch, TransformerLens, SAE-Lens take seconds): --help, usage errors
    # and a refused --out answer at once.
    from opt_hooks.api import audit

    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # --overwrite of an earlier run: its checkpoint is not this run's
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    # The embedded model's matrices are tiny (width 64): extra threads only add synchronisation,
    # which turns into minutes of spinning when other processes share the cores.
    with run_log(out, args.quiet, append=args.resume), torch_threads(1 if uses_embedded(args) else None), \
            FailureLog(out) as failure:
        command, device, inputs = start_run(args, argv, "report")
        log.info("auditing %d SAE(s) on %s tokens (device %s)", len(inputs.saes), f"{inputs.n_tokens:,}", device)
        with library_prints(args.quiet), dataset_errors(inputs):
            result = audit(  # progress: the API's own tqdm bars; the CLI adds none
                inputs.model, inputs.saes, inputs.dataset, **audit_kwargs(args, inputs, out), progress=not args.quiet
            )
        seconds = time.perf_counter() - start
        result.meta["run"] = {**inputs.facts, "command": command, "seed": args.seed, "seconds": round(seconds, 1)}
        write_report(result, out, overwrite=True)  # the folder was checked above; run.log is ours
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # every nonzero code: can be gigabytes
        summary = render_summary(result)
        log.debug("summary:\n%s", summary)
        log.info("report written in %.1f s: %s", seconds, out / REPORT_HTML)
    if failure.failed:
        return EXIT_FAILED
    if not args.quiet:
        print(summary)
    if args.fail_on and reached(result, args.fail_on):
        print(
            f"opt-hooks report: --fail-on {args.fail_on}: findings at that tier (exit {EXIT_FINDINGS})", file=sys.stderr
        )
        return EXIT_FINDINGS
    return EXIT_OK


CHECKPOINT_DIR = "checkpoint"  # inside --out; each torchrun rank keeps its own subfolder


def is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def audit_share(args: argparse.Namespace) -> int:
    """A non-zero torchrun rank: the same audit call (the API splits the windows by rank and
    merges the states), no output of its own."""
    from opt_hooks.api import audit

    device = resolve_device(args.device)
    with library_prints(True):
        inputs = load_inputs(args, device)
        with dataset_errors(inputs):
            audit(inputs.model, inputs.saes, inputs.dataset, **audit_kwargs(args, inputs, args.out or default_out(args)),
                  progress=False)
    return EXIT_OK


def run_repair(args: argparse.Namespace, argv: list[str]) -> int:
    """`opt-hooks repair`: the inputs of `opt-hooks report`, `opt_hooks.repair_run.repair`, then
    RepairResult.save(out) and the repair's summary."""
    start = time.perf_counter()
    out = args.out or default_out(args)
    check_out(out, args.overwrite, "its report files and saes/")  # before anything slow happens
    from opt_hooks.records import file_name
    from opt_hooks.repair_run import SAE_FOLDER, RepairOptions, repair
    from opt_hooks.report import REPORT_HTML
    from opt_hooks.report.terminal import render_repair

    out.mkdir(parents=True, exist_ok=True)
    with run_log(out, args.quiet), torch_threads(1 if uses_embedded(args) else None), FailureLog(out) as failure:
        command, device, inputs = start_run(args, argv, "repair")
        log.info("repairing %d SAE(s) on %s tokens (device %s)", len(inputs.saes), f"{inputs.n_tokens:,}", device)
        with library_prints(args.quiet), dataset_errors(inputs):
            result = repair(
                inputs.model, inputs.saes, inputs.dataset, **run_kwargs(args, inputs),
                repair_options=RepairOptions(audit_held_out=args.audit_held_out, rounds=args.rounds),
                progress=not args.quiet,
            )
        seconds = time.perf_counter() - start
        facts = {**inputs.facts, "command": command, "seed": args.seed, "seconds": round(seconds, 1)}
        result.meta["run"] = facts
        for audit in result.audits:
            audit.meta["run"] = facts
        shutil.rmtree(out / SAE_FOLDER, ignore_errors=True)  # with --overwrite: an earlier run's SAEs
        result.save(out, overwrite=True)  # the folder was checked above; run.log is ours
        folders = {hook: out / SAE_FOLDER / file_name(hook) for hook in result.saes}
        summary = render_repair(result.to_dict())
        log.debug("summary:\n%s", summary)
        for hook, folder in folders.items():
            log.debug("repaired SAE %s: %s", hook, folder)
        log.info("repair written in %.1f s: %s", seconds, out / REPORT_HTML)
    if failure.failed:
        return EXIT_FAILED
    if not args.quiet:
        print(summary)
        print("repaired SAEs (sae_lens.SAE.load_from_disk reads each folder):")
        for hook, folder in folders.items():
            print(f"  {hook}: {folder}")
    return EXIT_OK


def run_compare(args: argparse.Namespace) -> int:
    """`opt-hooks compare`: the reports' Comparison saved in --out, its table printed."""
    if len(args.reports) < 2:
        raise UsageError(f"compare needs at least two reports, got {len(args.reports)}")
    names = [name.strip() for name in args.names.split(",")] if args.names is not None else None
    if names is not None and len(names) != len(args.reports):
        raise UsageError(f"--names gives {len(names)} name(s) for {len(args.reports)} report(s)")
    if names is not None and (len(set(names)) != len(names) or not all(names)):
        raise UsageError(f"--names must be distinct and not empty, got {args.names!r}")
    out = args.out or Path("reports") / "compare"
    check_out(out, args.overwrite, "its compare.json and compare.html")
    from opt_hooks.comparison import COMPARE_HTML, COMPARE_JSON, compare

    try:
        comparison = compare(*args.reports, names=names)
    except (FileNotFoundError, ValueError) as error:
        print(f"opt-hooks compare: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    comparison.save(out, overwrite=True)  # the folder was checked above
    print(comparison.summary())
    print(f"comparison written: {out / COMPARE_JSON}, {out / COMPARE_HTML}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors, 0 on --help
    command_argv = argv[argv.index(args.command) + 1 :]
    name = f"opt-hooks {args.command}"
    try:
        if args.command == "compare":  # reads saved reports: none of the audit flags
            return run_compare(args)
        check_flags(args)
        if args.command == "repair":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UsageError("repair runs in one process; torchrun is for opt-hooks report")
            return run_repair(args, command_argv)
        from opt_hooks.distributed import process_group_from_env

        with process_group_from_env(args.device):
            return run_report(args, command_argv)
    except UsageError as error:
        print(f"{name}: error: {error} (see {name} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, NotADirectoryError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
