"""Check an accelerator's audit against the CPU's: the same audit, two devices, every number compared.

    python scripts/check_device.py                          # cuda against cpu (float64), ~1 min on a GPU box
    python scripts/check_device.py --device mps --dtype float32
    python scripts/check_device.py --device cpu --reference-batch-size 4   # CPU self-check: batch split only

The test suite runs on the CPU only (tests/conftest.py hides CUDA), so this script is where the
CUDA paths are checked: the streaming sums on the device, the pair engine, the map's neighbour
search (bfloat16 screening on devices of compute capability 8.0 and above), the certificates'
line searches and the exact lasso codes. It audits the embedded default (tiny model, three SAEs
and a skip transcoder; offline) on `--device` and on `--reference`, with the model and SAEs in
`--dtype`, and walks the two results' `to_dict()` (every layer: features, pairs, findings, gaps,
the absorption map and its score):

- integers, booleans, strings and ids must be equal;
- floats must agree within `--rtol` of the larger magnitude or within `--atol`
  (`math.isclose`); NaN matches NaN.

In float64 (the default) both devices round the same activations to ~1e-16, so a count that
differs means the device computed something else: a bug. In float32 the model's forward pass
itself differs in its last bits between devices, so a code near its threshold can flip: expect a
few differences there, and read them rather than count them. Exit status 1 when anything differs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opt_hooks as oh  # noqa: E402
from opt_hooks.embedded import load_default  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def audit_on(device: str, dtype: torch.dtype, n_tokens: int, batch_size: int) -> tuple[dict[str, Any], float]:
    """The embedded default's audit on `device` in `dtype`: its result as a dict, and its seconds."""
    model, saes, texts = load_default(device)
    model = model.to(dtype)
    saes = {hook: sae.to(dtype) for hook, sae in saes.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = oh.audit(model, saes, texts, n_tokens=n_tokens, batch_size=batch_size, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result.to_dict(), time.perf_counter() - start


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) for every scalar in a nested dict / list; a container's length is a leaf too,
    so a list that lost an entry differs even where the entries it kept agree."""
    if isinstance(value, dict):
        yield f"{path}{{keys}}", tuple(sorted(value))
        for key in sorted(value):
            yield from leaves(value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        yield f"{path}[len]", len(value)
        for k, item in enumerate(value):
            yield from leaves(item, f"{path}[{k}]")
    else:
        yield path, value


def differences(a: Any, b: Any, rtol: float, atol: float) -> tuple[int, float, list[tuple[str, Any, Any]]]:
    """Compare two nested results leaf by leaf: (leaves compared, largest relative difference of
    the finite floats, the leaves that differ). Paths present in one only count as differences."""
    left, right = dict(leaves(a)), dict(leaves(b))
    worst, wrong = 0.0, []
    for path in sorted(left.keys() | right.keys()):
        x, y = left.get(path, "<absent>"), right.get(path, "<absent>")
        if (isinstance(x, float) or isinstance(y, float)) and number(x) and number(y):
            x, y = float(x), float(y)
            if math.isnan(x) and math.isnan(y):
                continue
            if math.isfinite(x) and math.isfinite(y) and max(abs(x), abs(y)) > 0:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
            if not math.isclose(x, y, rel_tol=rtol, abs_tol=atol):  # inf only matches itself
                wrong.append((path, x, y))
        elif (isinstance(x, bool), x) != (isinstance(y, bool), y):  # True == 1 in Python, not in a report
            wrong.append((path, x, y))
    return len(left.keys() | right.keys()), worst, wrong


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to check (default cuda)")
    parser.add_argument("--reference", default="cpu", help="the device it is checked against (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                        help="the model's and SAEs' dtype (default float64: counts must agree exactly)")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens to audit (default 16,384)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass on --device")
    parser.add_argument("--reference-batch-size", type=int, default=None,
                        help="sequences per forward pass on --reference (default: --batch-size)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance for floats (default 1e-7 in float64, 1e-3 in float32)")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute tolerance for floats (default 1e-9 in float64, 1e-5 in float32)")
    parser.add_argument("--show", type=int, default=20, help="differences to print (default 20)")
    args = parser.parse_args(argv)
    for device in (args.device, args.reference):
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device/--reference {device}: CUDA is not available here (check CUDA_VISIBLE_DEVICES); "
                         "use --device cpu for a CPU self-check")
        if device.startswith("mps") and not torch.backends.mps.is_available():
            parser.error(f"{device}: MPS is not available here")
    if args.dtype == "float64" and args.device.startswith("mps"):
        parser.error("MPS has no float64: use --dtype float32")
    float64 = args.dtype == "float64"
    rtol = args.rtol if args.rtol is not None else (1e-7 if float64 else 1e-3)
    atol = args.atol if args.atol is not None else (1e-9 if float64 else 1e-5)
    dtype = DTYPES[args.dtype]

    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"device {args.device} ({name}) against {args.reference}; {args.dtype}; {args.tokens:,} tokens; "
          f"torch {torch.__version__}")
    checked, seconds = audit_on(args.device, dtype, args.tokens, args.batch_size)
    reference, reference_seconds = audit_on(args.reference, dtype, args.tokens,
                                            args.reference_batch_size or args.batch_size)
    print(f"audit: {seconds:.1f} s on {args.device}, {reference_seconds:.1f} s on {args.reference}")

    status = 0
    for hook in sorted(checked["layers"].keys() | reference["layers"].keys()):
        a, b = checked["layers"].get(hook), reference["layers"].get(hook)
        if a is None or b is None:
            print(f"  {hook}: audited on one device only")
            status = 1
            continue
        n, worst, wrong = differences(a, b, rtol, atol)
        print(f"  {hook}: {n:,} values compared, largest relative difference {worst:.2g}, "
              f"{len(wrong)} differ{'' if wrong else ' (none)'}")
        for path, x, y in wrong[:args.show]:
            print(f"    {path}: {x!r} on {args.device}, {y!r} on {args.reference}")
        status = status or int(bool(wrong))
    print("same results" if status == 0 else "results differ")
    return status


if __name__ == "__main__":
    sys.exit(main())
