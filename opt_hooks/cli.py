"""The `opt-hooks` command line.

- `opt-hooks report`: audit SAEs on a model and write report.json, report.html and run.log;
- `opt-hooks repair`: the same inputs; audit, write the certified changes into the SAEs
  (`opt_hooks.repair`, THEORY.md section 7) and write report.json and report.html (the audit with
  a Repair section), repair.json, the repaired SAEs (saes/<hook>/, sae_lens folders) and run.log.

The commands only gather inputs (model, SAEs, text), call the API (`opt_hooks.api.audit`,
`opt_hooks.repair_run.repair`) and write the results; all maths lives behind the API. `main(argv)`
returns the exit code, so tests and `scripts/layer_report.py` can call it in-process.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import random
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_hooks.policy import VerdictPolicy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FINDINGS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUN_LOG = "run.log"
DEFAULT_TOKENS = 1_000_000  # as opt_hooks.audit; the embedded default uses its own, smaller count
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
  --dataset defaults to the bundled text corpus (Python documentation).

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

output, in --out (default reports/<name>; refused if not empty, unless --overwrite):
  report.json  everything, described by opt_hooks/report/schema.json
  report.html  one self-contained page (works offline): plots, sortable tables, pair figures
  run.log      the run's log: arguments, versions, timings, warnings, errors with tracebacks

exit codes:
  0    report written
  1    the run failed: a model, SAE or dataset could not be loaded, --out is not empty and
       --overwrite was not given, or an internal error (the message and run.log say which)
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
    data = command.add_argument_group("data")
    data.add_argument(
        "--dataset", metavar="NAME|PATH",
        help="Hugging Face dataset name, or a local .txt/.jsonl/.parquet file or folder of them",
    )
    data.add_argument(
        "--tokens", type=parse_count, metavar="N",
        help=f"tokens to {'audit' if name == 'report' else 'read in all'}, e.g. 200000, 200k, 2M "
        f"(default {DEFAULT_TOKENS:,}; embedded: 32,768)",
    )
    data.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward pass (default 16)")
    data.add_argument("--context-size", type=int, default=128, metavar="N", help="tokens per sequence (default 128)")
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
    run.add_argument("--quiet", action="store_true", help="no progress bars and no summary; errors only")
    verdicts = command.add_argument_group("verdicts (THEORY.md section 3)")
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
    """Everything audit() needs, plus what the report says about where it came from."""

    model: Any
    saes: list[Any]
    dataset: Any
    n_tokens: int
    facts: dict[str, Any] = field(default_factory=dict)


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
        if value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    try:
        audit_options(args)
    except ValueError as error:
        raise UsageError(f"--alpha / --min-share / --min-layer-share: {error}") from error
    if args.sae_id:
        args.sae_id = expand(args.sae_id, args.layers, "--sae-id")
    if args.sae_path:
        args.sae_path = expand(args.sae_path, args.layers, "--sae-path")


def audit_options(args: argparse.Namespace) -> Any:
    from opt_hooks.engine import AuditOptions

    return AuditOptions(alpha=args.alpha, min_share=args.min_share, min_layer_share=args.min_layer_share)


def embedded_inputs(args: argparse.Namespace, device: str) -> Inputs:
    from opt_hooks import embedded

    model, saes, texts = embedded.load_default(device=device)
    if args.layers is not None:
        saes = {hook: sae for hook, sae in saes.items() if layer_of(hook) in args.layers}
        if not saes:
            raise ValueError(
                f"the embedded model has no SAE at layers {args.layers}; it has layers 0-{model.cfg.n_layers - 1}"
            )
    manifest = embedded.manifest()
    facts = {"source": "embedded default", "model": manifest["model"]["model_name"], "corpus": manifest["corpus"]}
    dataset = args.dataset or texts
    return Inputs(model, list(saes.values()), dataset, args.tokens or embedded.DEFAULT_TOKENS, facts)


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
    views = []
    for sae_id in ids:
        log.info("loading SAE %s / %s", args.sae_release, sae_id)
        views.append(SAEView.from_pretrained(args.sae_release, sae_id, device=device))
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


def load_model(name: str, device: str, model_kwargs: dict[str, Any]) -> Any:
    """A local folder boots a TransformerBridge; a name loads the TransformerLens model the way
    SAE-Lens trains on it (no weight processing, plus the SAE's own `model_from_pretrained_kwargs`)."""
    if Path(name).is_dir():
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(str(Path(name).resolve()), device=device)
    from sae_lens.load_model import load_model as sae_lens_load_model

    return sae_lens_load_model("HookedTransformer", name, device=device, model_from_pretrained_kwargs=model_kwargs)


def user_inputs(args: argparse.Namespace, device: str) -> Inputs:
    if args.sae_release:
        saes, registry_model = release_saes(args, device)
        metadata = saes[0].sae.cfg.metadata
    else:
        from sae_lens import SAE

        saes = []
        for folder in args.sae_path:
            log.info("loading SAE %s", folder)
            saes.append(SAE.load_from_disk(folder, device=device))
        metadata = saes[0].cfg.metadata
        registry_model = None
    model_name = args.model or registry_model or metadata.model_name
    if not model_name:
        raise UsageError("the SAEs do not name their model: give --model")
    log.info("loading model %s", model_name)
    model = load_model(model_name, device, dict(metadata.model_from_pretrained_kwargs or {}))
    if args.dataset is None:
        from opt_hooks import embedded

        log.warning(
            "no --dataset: auditing on the bundled Python-documentation corpus; "
            "give --dataset for text like the SAEs' training data"
        )
        dataset = embedded.load_texts()
    else:
        dataset = args.dataset
    facts = {
        "source": "user", "model": model_name,
        "sae_release": args.sae_release, "sae_ids": args.sae_id, "sae_paths": args.sae_path,
    }
    return Inputs(model, saes, dataset, args.tokens or DEFAULT_TOKENS, {k: v for k, v in facts.items() if v})


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
        inputs = embedded_inputs(args, device) if uses_embedded(args) else user_inputs(args, device)
    return command, device, inputs


def run_report(args: argparse.Namespace, argv: list[str]) -> int:
    from opt_hooks.report import REPORT_HTML, check_out_dir, render_summary, write_report

    start = time.perf_counter()
    out = args.out or default_out(args)
    if not is_writer():  # under torchrun only rank 0 writes; the others stream their share
        return audit_share(args)
    check_out_dir(out, args.overwrite or args.resume)  # before anything slow happens
    # Imported only now (torch, TransformerLens, SAE-Lens take seconds): --help, usage errors
    # and a refused --out answer at once.
    from opt_hooks.api import audit

    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # --overwrite of an earlier run: its checkpoint is not this run's
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    # The embedded model's matrices are tiny (width 64): extra threads only add synchronisation,
    # which turns into minutes of spinning when other processes share the cores.
    with run_log(out, args.quiet, append=args.resume), torch_threads(1 if uses_embedded(args) else None):
        try:
            command, device, inputs = start_run(args, argv, "report")
            log.info("auditing %d SAE(s) on %s tokens (device %s)", len(inputs.saes), f"{inputs.n_tokens:,}", device)
            with library_prints(args.quiet):
                result = audit(  # device=None: the model and SAEs were loaded on `device` already
                    inputs.model, inputs.saes, inputs.dataset, n_tokens=inputs.n_tokens, batch_size=args.batch_size,
                    context_size=args.context_size, held_out=args.held_out, device=None, options=audit_options(args),
                    progress=not args.quiet,  # the API's own tqdm bars; the CLI adds none
                    checkpoint_dir=out / CHECKPOINT_DIR, checkpoint_every=args.checkpoint_every, resume=args.resume,
                )
            seconds = time.perf_counter() - start
            result.meta["run"] = {**inputs.facts, "command": command, "seed": args.seed, "seconds": round(seconds, 1)}
            write_report(result, out, overwrite=True)  # the folder was checked above; run.log is ours
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # every nonzero code: can be gigabytes
            summary = render_summary(result)
            log.debug("summary:\n%s", summary)
            log.info("report written in %.1f s: %s", seconds, out / REPORT_HTML)
        except UsageError as error:  # found only once the registry was read; main() reports it
            log.debug("usage error: %s", error)
            raise
        except Exception as error:
            log.debug("traceback", exc_info=True)
            log.error("error: %s (details in %s)", error, out / RUN_LOG)
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
        inputs = embedded_inputs(args, device) if uses_embedded(args) else user_inputs(args, device)
        audit(inputs.model, inputs.saes, inputs.dataset, n_tokens=inputs.n_tokens, batch_size=args.batch_size,
              context_size=args.context_size, held_out=args.held_out, device=None, progress=False,
              options=audit_options(args),
              checkpoint_dir=(args.out or default_out(args)) / CHECKPOINT_DIR,
              checkpoint_every=args.checkpoint_every, resume=args.resume)
    return EXIT_OK


def run_repair(args: argparse.Namespace, argv: list[str]) -> int:
    """`opt-hooks repair`: the inputs of `opt-hooks report`, `opt_hooks.repair_run.repair`, then
    RepairResult.save(out) and the repair's summary."""
    from opt_hooks.report import check_out_dir

    start = time.perf_counter()
    out = args.out or default_out(args)
    check_out_dir(out, args.overwrite)  # before anything slow happens
    from opt_hooks.repair_run import SAE_FOLDER, RepairOptions, folder_name, repair
    from opt_hooks.report import REPORT_HTML
    from opt_hooks.report.terminal import render_repair

    out.mkdir(parents=True, exist_ok=True)
    with run_log(out, args.quiet), torch_threads(1 if uses_embedded(args) else None):
        try:
            command, device, inputs = start_run(args, argv, "repair")
            log.info("repairing %d SAE(s) on %s tokens (device %s)", len(inputs.saes), f"{inputs.n_tokens:,}", device)
            with library_prints(args.quiet):
                result = repair(  # device=None: the model and SAEs were loaded on `device` already
                    inputs.model, inputs.saes, inputs.dataset, n_tokens=inputs.n_tokens, batch_size=args.batch_size,
                    context_size=args.context_size, held_out=args.held_out, device=None, options=audit_options(args),
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
            folders = {hook: out / SAE_FOLDER / folder_name(hook) for hook in result.saes}
            summary = render_repair(result.to_dict())
            log.debug("summary:\n%s", summary)
            for hook, folder in folders.items():
                log.debug("repaired SAE %s: %s", hook, folder)
            log.info("repair written in %.1f s: %s", seconds, out / REPORT_HTML)
        except UsageError as error:  # found only once the registry was read; main() reports it
            log.debug("usage error: %s", error)
            raise
        except Exception as error:
            log.debug("traceback", exc_info=True)
            log.error("error: %s (details in %s)", error, out / RUN_LOG)
            return EXIT_FAILED
    if not args.quiet:
        print(summary)
        print("repaired SAEs (sae_lens.SAE.load_from_disk reads each folder):")
        for hook, folder in folders.items():
            print(f"  {hook}: {folder}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors, 0 on --help
    command_argv = argv[argv.index(args.command) + 1 :]
    name = f"opt-hooks {args.command}"
    try:
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
