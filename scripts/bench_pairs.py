"""Benchmark the exact C2 pair engine against the dense K x K baseline, and the absorption
map's candidate search (not a test).

Synthetic codes: ~L0 active features per token with heavy-tailed feature frequencies (a few
features are on at most tokens, so every path of the engine runs), planted parent/child
hierarchies, and values rounded to bfloat16 so that ties occur. Each measurement runs in its
own subprocess so that its peak RSS is its own; the table is printed as markdown together
with the command line that produced it.

    python scripts/bench_pairs.py --quick
    python scripts/bench_pairs.py --k 4096 16384 65536 131072 --n 100000
    python scripts/bench_pairs.py --device cuda --k 131072 --n 1000000
    python scripts/bench_pairs.py --map --k 131072 --n 100000 --d 768   # + the absorption map

The map's row ("map") times `opt_hooks.pair_map.PairMap` after pass 1: the nearest-atom search
in blocks, the rho spread, the exact co-activation counts of the candidates, duplicates and
antipodal pairs; its last column counts the ordered pairs it will measure on held-out tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opt_hooks.pair_map import PairMap  # noqa: E402
from opt_hooks.theory.absorption import MapOptions  # noqa: E402
from opt_hooks.theory.codes import CSR  # noqa: E402
from opt_hooks.theory.pairs import pair_bounds_dense, pair_violations  # noqa: E402

GIB = 1024**3


def synthetic_codes(n_tokens: int, n_features: int, l0: float, seed: int, device: str) -> CSR:
    """Random sparse codes with ~l0 active features per token, as a CSR with rows 0..N-1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # Heavy-tailed frequencies: feature k (in a random order) fires with probability ~ 1/(k+1)^0.6.
    rank = torch.randperm(n_features, generator=gen, device=device).double() + 1
    prob = rank.pow(-0.6)
    prob = (prob * l0 / prob.sum()).clamp(max=0.97)
    counts = torch.binomial(torch.full_like(prob, n_tokens), prob, generator=gen).long()
    feature = torch.repeat_interleave(torch.arange(n_features, device=device), counts)
    token = torch.randint(n_tokens, (feature.numel(),), generator=gen, device=device)
    _plant_hierarchies(feature, token, counts, gen)
    keys = torch.unique(token * n_features + feature)  # sorted: CSR order; drops repeats
    rows, col = keys // n_features, keys % n_features
    crow = torch.zeros(n_tokens + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.bincount(rows, minlength=n_tokens).cumsum(0)
    value = torch.empty(keys.numel(), device=device).exponential_(generator=gen)
    value = value.clamp(min=2**-6).to(torch.bfloat16).float()  # bf16 rounding makes ties
    return CSR(torch.arange(n_tokens, device=device), crow, col.to(torch.int32), value, n_features)


def _plant_hierarchies(feature: Tensor, token: Tensor, counts: Tensor, gen: torch.Generator) -> None:
    """Every 64th feature becomes the child of a frequent parent: it fires only on parent tokens."""
    start = counts.cumsum(0) - counts
    frequent = torch.argsort(counts, descending=True)[: max(1, counts.numel() // 256)]
    children = torch.arange(0, counts.numel(), 64, device=counts.device)
    children = children[~torch.isin(children, frequent)]
    parent_of = torch.full_like(counts, -1)
    pick_parent = torch.randint(frequent.numel(), (children.numel(),), generator=gen, device=counts.device)
    parent_of[children] = frequent[pick_parent]
    in_child = (parent_of[feature] >= 0).nonzero().squeeze(1)
    parent = parent_of[feature[in_child]]
    pick = (torch.rand(in_child.numel(), generator=gen, device=counts.device) * counts[parent]).long()
    token[in_child] = token[start[parent] + pick]


def synthetic_atoms(n_features: int, d: int, seed: int, device: str) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    atoms = torch.randn(n_features, d, generator=gen, device=device)
    return atoms / atoms.norm(dim=1, keepdim=True)


def feature_means(codes: CSR) -> Tensor:
    return torch.bincount(codes.col.long(), weights=codes.val.double(), minlength=codes.n_features) / codes.n_tokens


def dense_codes(codes: CSR) -> Tensor:
    z = torch.zeros(codes.n_tokens, codes.n_features, device=codes.device)
    z[codes.row_ids(), codes.col.long()] = codes.val.float()
    return z


def dense_violation_count(z: Tensor, atoms: Tensor, mu: Tensor, chunk: int) -> int:
    """The baseline: K x K bounds, Gram matrix and thresholds, as a dense implementation would."""
    upper, lower, _ = pair_bounds_dense(z, chunk_elements=chunk)
    rho = atoms.double() @ atoms.double().T
    threshold = (1 - rho) * mu
    tol = 1e-6 * mu
    valid = (mu > 0) & (rho.abs() < 1) & ~torch.eye(mu.numel(), dtype=torch.bool, device=mu.device)
    valid &= ~upper.isnan()  # rows whose feature is never off
    broken = ((upper < threshold - tol) | (lower > threshold + tol)) & valid
    return int(broken.sum())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(method: str, n_features: int, n_tokens: int, args: argparse.Namespace) -> dict:
    """One measurement in this process: build inputs, then time `method` and its peak memory."""
    device = args.device
    codes = synthetic_codes(n_tokens, n_features, args.l0, args.seed, device)
    atoms = synthetic_atoms(n_features, args.d, args.seed, device)
    mu = feature_means(codes)
    z = dense_codes(codes) if method == "dense" else None
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cuda_before = torch.cuda.memory_allocated() if cuda else 0
    _reset_peak_rss()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    if method == "dense":
        n_violations = dense_violation_count(z, atoms, mu, args.chunk_elements)
    elif method == "map":
        counts = torch.bincount(codes.col.long(), minlength=n_features)
        n_violations = len(PairMap(codes, counts, n_tokens, atoms, MapOptions()))
    else:
        n_violations = len(pair_violations(codes, atoms, mu, chunk_elements=args.chunk_elements))
    if cuda:
        torch.cuda.synchronize()
    return {
        "method": method,
        "K": n_features,
        "N": n_tokens,
        "nnz": codes.nnz,
        "seconds": time.perf_counter() - started,
        "rss_delta": _peak_rss_bytes() - rss_before,
        "rss_peak": _peak_rss_bytes(),
        "cuda_delta": torch.cuda.max_memory_allocated() - cuda_before if cuda else None,
        "violations": n_violations,
    }


def dense_skip_reason(n_features: int, n_tokens: int, args: argparse.Namespace) -> str | None:
    if n_features > args.dense_max_k:
        return f"K > --dense-max-k {args.dense_max_k}"
    dense_bytes = 4 * n_tokens * n_features + 56 * n_features**2  # dense z; measured peak per pair
    if dense_bytes > args.dense_max_gib * GIB:
        return f"needs {dense_bytes / GIB:.0f} GiB > --dense-max-gib {args.dense_max_gib:g}"
    return None


def run_in_subprocess(method: str, n_features: int, n_tokens: int, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--one", method, str(n_features), str(n_tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "K": n_features, "N": n_tokens, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], device: str) -> str:
    cuda = device.startswith("cuda")
    header = ["K", "N", "nnz", "method", "time (s)", "peak RSS delta (GiB)", "process peak RSS (GiB)"]
    header += ["CUDA max allocated delta (GiB)"] if cuda else []
    header += ["violations (map: measured pairs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "skipped" in row or "error" in row:
            note = row.get("skipped") or f"failed: {row['error']}"
            cells = [f"{row['K']:,}", f"{row['N']:,}", "", row["method"], note, "", ""] + ([""] if cuda else []) + [""]
        else:
            cells = [
                f"{row['K']:,}",
                f"{row['N']:,}",
                f"{row['nnz']:,}",
                row["method"],
                f"{row['seconds']:.1f}",
                f"{row['rss_delta'] / GIB:.2f}",
                f"{row['rss_peak'] / GIB:.2f}",
            ]
            cells += [f"{row['cuda_delta'] / GIB:.2f}"] if cuda else []
            cells += [f"{row['violations']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 16384, 65536, 131072], help="dictionary sizes")
    parser.add_argument("--n", type=int, nargs="+", default=[100_000], help="token counts (e.g. 100000 1000000)")
    parser.add_argument("--l0", type=float, default=64, help="mean active features per token")
    parser.add_argument("--d", type=int, default=256, help="atom dimension")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-elements", type=int, default=1 << 21)
    parser.add_argument("--dense-max-k", type=int, default=4096, help="largest K for the dense baseline")
    parser.add_argument("--dense-max-gib", type=float, default=8.0, help="memory cap for the dense baseline")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes only: K 1024 4096, N 10000, dense baseline up to K 1024"
    )
    parser.add_argument("--map", action="store_true", help="also time the absorption map's candidate search")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "K", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.n, args.dense_max_k = [1024, 4096], [10_000], 1024
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.one:
        method, n_features, n_tokens = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(method, n_features, n_tokens, args)))
        return
    rows = []
    for n_tokens in args.n:
        for n_features in args.k:
            rows.append(run_in_subprocess("engine", n_features, n_tokens, argv))
            reason = dense_skip_reason(n_features, n_tokens, args)
            if reason:
                rows.append({"method": "dense", "K": n_features, "N": n_tokens, "skipped": f"skipped: {reason}"})
            else:
                rows.append(run_in_subprocess("dense", n_features, n_tokens, argv))
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.map:
                rows.append(run_in_subprocess("map", n_features, n_tokens, argv))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"Command: `python {shlex.join(['scripts/bench_pairs.py', *argv])}`  \n")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Device: {device_name}; torch {torch.__version__}; L0 ~ {args.l0:g}, d = {args.d}; load average {load}\n")
    print(markdown_table(rows, args.device))


if __name__ == "__main__":
    main(sys.argv[1:])
