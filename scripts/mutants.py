"""Mutation check of the decision code (not a test): does the suite fail when a rule is changed?

Each mutant changes one line of the package: a comparison turned round, a Bonferroni count, a
conjunction made a disjunction. For each, alone, the script copies the checkout (the files git
tracks and the untracked ones it does not ignore) into a temporary folder, applies the mutant there,
and runs pytest on the mutant's test files with the copy first on the import path, stopping at the
first failure. A mutant is *killed* when a test fails, and the test is named; a *survivor* means
no test notices the change. The working tree is never touched.

    python scripts/mutants.py                      # every mutant below (about 13 minutes on 2 cores)
    python scripts/mutants.py --only repair        # the mutants whose name contains "repair"
    python scripts/mutants.py --list

Exit status 1 when a mutant survives (or its line is no longer in the source: update the list).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # the exact text, which must occur once in the file
    new: str
    tests: tuple[str, ...]  # the test files that should kill it


REPAIR_TESTS = ("tests/test_repair_decisions.py", "tests/test_repair.py")
MAP_TESTS = ("tests/test_map_rules.py", "tests/test_absorption.py", "tests/test_validation.py")
SIGNED_TESTS = ("tests/test_abstopk.py",)
C2_TESTS = ("tests/test_c2_certificate.py", "tests/test_theory.py", "tests/test_pairs.py")

MUTANTS = (
    # the five that survived the suite before (the repair's step rule and its Bonferroni count, C2's
    # shifted bound, the antipodal rule's density conjunction and its overlap bound)
    Mutant("repair: step kept at mean - z se", "opt_hooks/repair_run.py",
           "significant = n >= 2 and math.isfinite(se) and mean + z * se < 0",
           "significant = n >= 2 and math.isfinite(se) and mean - z * se < 0", REPAIR_TESTS),
    Mutant("repair: Bonferroni over every chain version", "opt_hooks/repair_run.py",
           "z = policy.critical_z(len(tested))", "z = policy.critical_z(len(self.names))", REPAIR_TESTS),
    Mutant("c2: hierarchy's shifted bound T min(1, c)", "opt_hooks/theory/c2_pairs.py",
           "t * torch.clamp(c, min=1), t * torch.clamp(c, max=1)", "t * torch.clamp(c, max=1), t * torch.clamp(c, max=1)",
           C2_TESTS),
    Mutant("map: antipodal when either latent is dense", "opt_hooks/pair_map.py",
           "anti = (count[anti_i] >= dense) & (count[anti_j] >= dense)",
           "anti = (count[anti_i] >= dense) | (count[anti_j] >= dense)", MAP_TESTS),
    Mutant("map: antipodal overlap bound by the larger count", "opt_hooks/pair_map.py",
           "torch.minimum(self.count[i], self.count[j])", "torch.maximum(self.count[i], self.count[j])", MAP_TESTS),
    # the same kind of change elsewhere in the repair's decisions
    Mutant("repair: a resampled latent kept at mean - z se", "opt_hooks/repair_run.py",
           "if not (math.isfinite(se) and mean + z * se < 0 and",
           "if not (math.isfinite(se) and mean - z * se < 0 and", REPAIR_TESTS),
    Mutant("repair: resampled latents' Bonferroni count plus one", "opt_hooks/repair_run.py",
           "z = policy.critical_z(len(self.plant_ids))", "z = policy.critical_z(len(self.plant_ids) + 1)", REPAIR_TESTS),
    Mutant("repair: a resampled latent kept on fewer touched tokens", "opt_hooks/repair_run.py",
           "int(self.plant_sums.touched[k]) >= policy.min_touched", "int(self.plant_sums.touched[k]) > policy.min_touched",
           REPAIR_TESTS),
    # ... and in the map's rules
    Mutant("map: absorbing band as a disjunction", "opt_hooks/pair_map.py",
           "absorbing = (near.rho >= self.rho_min) & (near.rho < options.duplicate_rho)",
           "absorbing = (near.rho >= self.rho_min) | (near.rho < options.duplicate_rho)", MAP_TESTS),
    Mutant("map: a pair kept where the parent is on at every child token", "opt_hooks/pair_map.py",
           "keep = co < count[child]", "keep = co <= count[child]", MAP_TESTS),
    Mutant("map: evidence significant without its touched tokens", "opt_hooks/pair_map.py",
           "passes = ((n_evidence >= policy.min_touched) & (ratio.z >= z_crit)",
           "passes = ((n_evidence >= policy.min_touched) | (ratio.z >= z_crit)", MAP_TESTS),
    Mutant("map: orientation not required", "opt_hooks/pair_map.py",
           "& (ab.orientation_z(ratio, reverse) >= z_crit))", "| (ab.orientation_z(ratio, reverse) >= z_crit))",
           MAP_TESTS),
    Mutant("map: rho threshold the smaller of the floor and the spread's", "opt_hooks/pair_map.py",
           "self.rho_min = max(options.min_rho, options.spread_z * self.spread)",
           "self.rho_min = min(options.min_rho, options.spread_z * self.spread)", MAP_TESTS),
    Mutant("map: evidence on more than min_touched tokens", "opt_hooks/pair_map.py",
           "passes = ((n_evidence >= policy.min_touched)", "passes = ((n_evidence > policy.min_touched)", MAP_TESTS),
    Mutant("map: antipodal overlap strictly below its bound", "opt_hooks/pair_map.py",
           "apart = co <= self.options", "apart = co < self.options", MAP_TESTS),
    Mutant("map: evidence valid where either count is positive", "opt_hooks/theory/absorption.py",
           "valid = (m_a > 0) & (pair_count > 0)", "valid = (m_a > 0) | (pair_count > 0)", MAP_TESTS),
    # ... and in the layer's absorption score
    Mutant("map: score sums a latent's leans instead of taking the largest", "opt_hooks/theory/absorption.py",
           '0.0).clamp(min=0), "amax")', '0.0).clamp(min=0), "sum")', MAP_TESTS),
    Mutant("map: score's parent as frequent as its child", "opt_hooks/theory/absorption.py",
           "more_frequent = count[parent] > count[child]", "more_frequent = count[parent] >= count[child]", MAP_TESTS),
    Mutant("map: score's parent the rarer latent", "opt_hooks/theory/absorption.py",
           "more_frequent = count[parent] > count[child]", "more_frequent = count[parent] < count[child]", MAP_TESTS),
    Mutant("map: score averaged over every alive latent", "opt_hooks/theory/absorption.py",
           "leaning = leaning & (count > 0)", "leaning = count > 0", MAP_TESTS),
    Mutant("map: score's leaning latents counted after a kept hierarchy's pairs are dropped", "opt_hooks/pair_map.py",
           "leaning[child] = True", "leaning[self.child] = True", MAP_TESTS),
    Mutant("map: score weighs by the share with the parent on", "opt_hooks/theory/absorption.py",
           "off = (count[child] - co.double()) / count[child]", "off = co.double() / count[child]", MAP_TESTS),
    # ... and in the ties of a signed SAE's doubled dictionary (THEORY.md section 9)
    Mutant("signed: C3's tied gradient adds the negative atom's sum", "opt_hooks/theory/c3_decoder.py",
           "sum_zr, sum_zr_norm, atoms = tied(sum_zr, -1)", "sum_zr, sum_zr_norm, atoms = tied(sum_zr, 1)",
           SIGNED_TESTS),
    Mutant("signed: C3's certificate sums without the negative sign's tokens", "opt_hooks/theory/c3_decoder.py",
           "zr, z2 = zr - stats.sum_z_r[partner], z2 + stats.sum_z2[partner]",
           "zr, z2 = zr, z2 + stats.sum_z2[partner]", SIGNED_TESTS),
    Mutant("signed: C2 keeps pairs whose moved latent fires with both signs", "opt_hooks/theory/c2_pairs.py",
           "& (active_count.to(partner.device)[partner[violations.j]] == 0)",
           "& (active_count.to(partner.device)[partner[violations.j]] >= 0)", SIGNED_TESTS),
    Mutant("signed: a latent's two signs an antipodal pair", "opt_hooks/pair_map.py",
           "anti &= anti_j != partners(n_features, anti_i.device)[anti_i]",
           "anti &= anti_j != anti_i", SIGNED_TESTS),
    Mutant("map: noise-free evidence at the threshold fails", "opt_hooks/theory/absorption.py",
           "torch.where(value >= threshold, math.inf, -math.inf)", "torch.where(value > threshold, math.inf, -math.inf)",
           MAP_TESTS),
)


def checkout_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def run_mutant(mutant: Mutant, files: list[str], workers: str) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome 'killed', 'survived' or 'stale' (its line is gone)."""
    source = (REPO / mutant.path).read_text(encoding="utf-8")
    if source.count(mutant.old) != 1:
        return "stale", f"{mutant.old!r} occurs {source.count(mutant.old)} times in {mutant.path}", 0.0
    with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
        root = Path(folder)
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
        (root / mutant.path).write_text(source.replace(mutant.old, mutant.new), encoding="utf-8")
        tests = [t for t in mutant.tests if (root / t).is_file()]
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", workers, *tests]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if done.returncode == 0:
        return "survived", f"{len(tests)} test files passed", seconds
    return "killed", failed[0] if failed else f"pytest exit {done.returncode}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("-n", "--workers", default="2", help="pytest-xdist workers per run (default 2)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.old!r} -> {m.new!r}")
        return 0
    files = checkout_files()
    print(f"| mutant | change | outcome | test | seconds |\n|---|---|---|---|---:|")
    bad = 0
    for m in chosen:
        outcome, detail, seconds = run_mutant(m, files, args.workers)
        bad += outcome != "killed"
        print(f"| {m.name} | `{m.old}` -> `{m.new}` | {outcome} | {detail} | {seconds:.0f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
