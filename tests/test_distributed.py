"""An audit split across torch.distributed ranks equals the single-process audit.

Two ranks on the CPU with the gloo backend. The workers are forked from the test process, so
they reuse its imports, its tiny model and its SAEs; each runs the same audits as the test
process runs alone and saves what it got for the test process to compare: exactly on counts,
minima, maxima, codes, pairs and tiers, closely on float sums (their order of additions
differs). Both ranks must also end with the same result.
"""
from __future__ import annotations

import dataclasses
import pickle
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import opt_hooks as oh
from opt_hooks.distributed import Ranks, current_ranks, merge_pass_one, merge_pass_two
from opt_hooks.engine import LayerAudit
from sae_training import assert_layers_match, train_sae

WORLD_SIZE = 2
HOOK1, HOOK2 = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"
CONTEXT, BATCH, HELD_OUT = 16, 3, 0.25

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs gloo and forked processes",
)


@pytest.fixture(scope="module")
def setting(tiny_model):
    """Token windows, activations and two trained SAEs (layers 1 and 2) of the tiny model."""
    windows = torch.randint(0, 64, (22, CONTEXT), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(windows, names_filter=[HOOK1, HOOK2])
    saes = [train_sae("standard", cache[hook], hook_name=hook, model_name="tiny-test-model", steps=20, seed=k)
            for k, hook in enumerate((HOOK1, HOOK2))]
    return windows, cache[HOOK1].reshape(-1, 16).double(), saes


def audits(model, windows, acts, saes) -> dict:
    """What every rank (and the single process) computes."""
    text = oh.audit(model, saes, windows, n_tokens=windows.numel(), batch_size=BATCH, context_size=CONTEXT,
                    held_out=HELD_OUT, progress=False)
    activations = oh.audit_activations(saes[0], list(acts.split(50)), held_out=HELD_OUT)
    return {"audit": text.layers, "activations": activations.layers, "engine": engine_states(saes[0], acts)}


def engine_states(sae, acts) -> dict:
    """The two merge steps on a LayerAudit / AuditPlan fed directly (lam estimated, so the
    lam-estimate projections are exchanged too); rank r takes the rows n % world_size == r."""
    atoms = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    with torch.no_grad():
        z = sae.encode(acts) * sae.W_dec.norm(dim=1)
    ranks, token = current_ranks(), torch.arange(len(acts))
    mine = ranks.own(token)
    held = token % 5 == 4
    audit = LayerAudit(atoms, sae.b_dec.detach(), lam=None, options=oh.AuditOptions(worst_k=6))
    rows = mine & ~held
    audit.update(acts[rows], z[rows], token[rows])
    if ranks.split:
        merge_pass_one(audit)
    plan = audit.plan()
    plan.update(acts[mine], z[mine], token[mine], held_out=held[mine])
    if ranks.split:
        merge_pass_two(plan)
    statistics = audit.stats.compute()
    return {"statistics": statistics, "pass_two": plan.state.state_dict(), "lam": plan.lam}


def worker(rank: int, init_file: str, out_dir: str, model, windows, acts, saes) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        assert current_ranks() == Ranks(rank, WORLD_SIZE)
        got = audits(model, windows, acts, saes)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump(got, f)


@pytest.fixture(scope="module")
def runs(tiny_model, setting, tmp_path_factory):
    """(single-process results, [results of rank 0, rank 1])."""
    windows, acts, saes = setting
    folder = tmp_path_factory.mktemp("distributed")
    # Forked workers share this process's objects; results come back through files, since a
    # worker blocked on a full pipe would never exit.
    mp.start_processes(worker, args=(str(folder / "rendezvous"), str(folder), tiny_model, windows, acts, saes),
                       nprocs=WORLD_SIZE, start_method="fork")
    ranked = []
    for rank in range(WORLD_SIZE):
        with open(folder / f"rank{rank}.pkl", "rb") as f:
            ranked.append(pickle.load(f))
    return audits(tiny_model, windows, acts, saes), ranked


@pytest.mark.parametrize("job", ["audit", "activations"])
def test_every_rank_reports_what_one_process_reports(runs, job):
    single, ranked = runs
    assert set(ranked[0][job]) == set(single[job])
    for key, layer in single[job].items():
        for rank in range(WORLD_SIZE):
            assert_layers_match(ranked[rank][job][key], layer)  # codes identical: extremes exact
        assert dataclasses.asdict(ranked[1][job][key]) == dataclasses.asdict(ranked[0][job][key])
        assert layer.pairs and layer.tier_counts()["certified"], "nothing flagged: the comparison would be weak"


def test_merged_statistics_are_exactly_one_process_statistics(runs):
    single, ranked = (run["engine"] for run in (runs[0], runs[1][0]))
    a, b = single["statistics"], ranked["statistics"]
    assert a.n_tokens == b.n_tokens > 0
    for name in ("active_count", "min_z", "max_z", "worst_token", "worst_rnorm", "worst_residual"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("token_index", "crow", "col", "val"):
        assert torch.equal(getattr(a.codes, name), getattr(b.codes, name)), f"codes.{name}"
    assert torch.equal(a.active_projections.sort().values, b.active_projections.sort().values)
    assert single["lam"] == ranked["lam"]
    for name in ("sum_z", "sum_z2", "sum_z_rnorm", "sum_z_r", "sum_r"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12)
    single_sample, ranked_sample = single["pass_two"].pop("sample"), ranked["pass_two"].pop("sample")
    for name, value in single_sample.items():  # the code gap's tokens, gathered from both ranks: exact
        assert value == ranked_sample[name] if isinstance(value, int) else torch.equal(value, ranked_sample[name]), name
    for name, value in single["pass_two"].items():
        if value.dtype == torch.int64:
            assert torch.equal(ranked["pass_two"][name], value), name
        else:
            torch.testing.assert_close(ranked["pass_two"][name], value, rtol=1e-12, atol=1e-12)
    other = runs[1][1]["engine"]["statistics"]
    assert torch.equal(other.codes.val, b.codes.val) and torch.equal(other.sum_z_r, b.sum_z_r), "ranks differ"


def test_torchrun_report_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m opt_hooks.cli report` (gloo on the CPU, as the README shows for
    several GPUs) writes the report one process writes: the same per-feature counts, maxima and minima,
    exactly, and the same token counts."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "opt_hooks.cli", "report", "--tokens", "8k", "--quiet"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    failures = []
    for _ in range(2):  # its standalone rendezvous can fail to start on a loaded machine: one more try
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              *common, "--out", str(tmp_path / "two"), "--overwrite"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        if two.returncode == 0:
            break
        failures.append(two.stderr[-3000:])
    assert two.returncode == 0, "\n---\n".join(failures)
    if failures:
        print("torchrun needed a second try; the first said:", failures[0])
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert list(reports[0]["layers"]) == list(reports[1]["layers"]) and reports[0]["layers"]
    for hook, layer in reports[0]["layers"].items():
        other = reports[1]["layers"][hook]
        assert (layer["n_tokens"], layer["n_held_out"]) == (other["n_tokens"], other["n_held_out"])
        for mine, theirs in zip(layer["features"], other["features"], strict=True):
            for name in ("id", "active_count", "max_code", "min_code"):
                assert mine[name] == theirs[name], (hook, mine["id"], name)
        assert layer["dead_features"] == other["dead_features"]
