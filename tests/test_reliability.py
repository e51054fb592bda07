"""Reliability (issue #8): every bad input of docs/ERRORS.md through the public `oh.audit`,
checkpoints that survive SIGKILL and resume to the identical report, and atomic output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import datasets
import pytest
import sae_lens
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

import opt_hooks as oh
from opt_hooks.adapters.model import explain_out_of_memory
from opt_hooks.checkpoint import atomic_torch_save
from opt_hooks.engine import AuditOptions
from test_fuzz import non_finite_numbers

HOOK = "blocks.1.hook_resid_pre"
CONTEXT = 16
N_WINDOWS = 20
AUDIT_WINDOWS = 16  # held_out 0.2 holds windows 4, 9, 14, 19
BATCH = 4
RUN = dict(n_tokens=N_WINDOWS * CONTEXT, batch_size=BATCH, context_size=CONTEXT, held_out=0.2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: torch's intra-op threads only add synchronisation, which costs
    ~10 ms per op on a busy machine. One thread also fixes the summation order across processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(tokenizer=None) -> HookedTransformer:
    """2 layers, d_model 16; seeded, so every call (and every process) builds the same weights."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=CONTEXT, d_head=4, n_heads=4, d_mlp=32,
        d_vocab=64 if tokenizer is None else tokenizer.vocab_size,
        act_fn="relu", model_name="tiny-test-model", seed=0, device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def tiny_sae(d_in: int = 16, d_sae: int = 24, hook: str = HOOK, model: str = "tiny-test-model",
             threshold: float = 0.5, n_dead: int = 3, seed: int = 0) -> sae_lens.StandardSAE:
    """A tied ReLU SAE (encoder = decoder^T, bias -threshold): shrunk codes, so lam is estimable.
    Its last `n_dead` features can never fire."""
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
        d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, model_name=model)))
    gen = torch.Generator().manual_seed(seed)
    decoder = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1)
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.W_enc.copy_(decoder.T)
        sae.b_enc.fill_(-threshold)
        sae.b_enc[d_sae - n_dead:] = -1e4
        sae.b_dec.zero_()
    return sae


def token_ids(n_windows: int = N_WINDOWS) -> torch.Tensor:
    return torch.randint(0, 64, (n_windows, CONTEXT), generator=torch.Generator().manual_seed(0))


def assert_clean(result: oh.AuditResult) -> None:
    """Every number finite, in the dataclasses themselves and in strict JSON."""
    for layer in result.layers.values():
        assert non_finite_numbers(layer) == []
    json.dumps(result.to_dict(), allow_nan=False)


# ---- bad inputs ----------------------------------------------------------------------------


def test_sae_width_differs_from_the_hook():
    with pytest.raises(ValueError, match=r"d_in=8 but the activations have width 16.*attach it to a hook of width 8"):
        oh.audit(tiny_model(), tiny_sae(d_in=8), token_ids(), **RUN)


def test_hook_name_not_in_the_model():
    with pytest.raises(ValueError, match=r"'blocks.1.hook_resid_pr' is not a hook point.*close matches: blocks.1.hook_resid_pre"):
        oh.audit(tiny_model(), tiny_sae(hook="blocks.1.hook_resid_pr"), token_ids(), **RUN)


def test_sae_of_another_model_warns_unless_allowed(recwarn):
    sae = tiny_sae(model="gpt2-small")
    with pytest.warns(UserWarning, match="trained on 'gpt2-small' but the model is 'tiny-test-model'.*allow_model_mismatch=True"):
        oh.audit(tiny_model(), sae, token_ids(), **RUN)
    recwarn.clear()
    oh.audit(tiny_model(), sae, token_ids(), allow_model_mismatch=True, **RUN)
    assert not [w for w in recwarn if "trained on" in str(w.message)]


@pytest.mark.parametrize("empty", [[], torch.zeros(0, CONTEXT, dtype=torch.long)], ids=["no documents", "no rows"])
def test_empty_dataset(empty):
    with pytest.raises(ValueError, match="dataset yielded 0 tokens"):
        oh.audit(tiny_model(), tiny_sae(), empty, **RUN)


def test_fewer_tokens_than_asked_warns_and_audits_what_there_is():
    with pytest.warns(UserWarning, match=r"ran out: auditing 160 tokens \(10 windows of 16\), fewer than the 320 asked for"):
        result = oh.audit(tiny_model(), tiny_sae(), token_ids(10), **RUN)
    assert result.meta["n_tokens"] == 160
    with pytest.raises(ValueError, match="yielded 5 tokens, fewer than one window of context_size=16"):
        oh.audit(tiny_model(), tiny_sae(), torch.arange(5), **RUN)


def test_missing_text_column():
    no_text = datasets.Dataset.from_dict({"label": [1, 2], "score": [0.5, 0.1]})
    with pytest.raises(ValueError, match=r"cannot pick the text column.*label \(int\).*pass text_column="):
        oh.audit(tiny_model(), tiny_sae(), no_text, **RUN)
    with pytest.raises(ValueError, match=r"text_column 'body' is not in the dataset; its columns: text \(string\)"):
        oh.audit(tiny_model(), tiny_sae(), datasets.Dataset.from_dict({"text": ["a b"]}), text_column="body", **RUN)


def test_text_for_a_model_without_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer in HookedTransformer.*already tokenised ids"):
        oh.audit(tiny_model(), tiny_sae(), ["some text"], **RUN)


def test_empty_strings_are_no_tokens(minilm_tokenizer):
    model = tiny_model(minilm_tokenizer)
    with pytest.raises(ValueError, match="dataset yielded 0 tokens"):
        oh.audit(model, tiny_sae(), ["", "", ""], **RUN)
    text = "The labrador is a dog. " * 20
    with pytest.warns(UserWarning, match="ran out"):
        with_empties = oh.audit(model, tiny_sae(), ["", text, "", text], **RUN)
    with pytest.warns(UserWarning, match="ran out"):
        without = oh.audit(model, tiny_sae(), [text, text], **RUN)
    assert with_empties.layers[HOOK].n_tokens == without.layers[HOOK].n_tokens > 0


def model_with_nan_token(token: int = 7) -> HookedTransformer:
    """Token `token` embeds as NaN; attention (0 * NaN values) spreads it over its whole window."""
    model = tiny_model()
    with torch.no_grad():
        model.W_E[token] = float("nan")
    return model


def audit_windows_with(token: int = 7) -> list[int]:
    """The audit windows (held_out 0.2 holds every fifth) that contain `token`."""
    ids = token_ids()
    return [w for w in range(len(ids)) if (w + 1) % 5 != 0 and bool((ids[w] == token).any())]


def test_nan_activations_stop_naming_layer_and_token():
    first = audit_windows_with()[0]
    with pytest.raises(FloatingPointError, match=(
        rf"{HOOK}: non-finite activation or code \(NaN/inf\) at token {first * CONTEXT} "
        rf"\(window {first}\); no verdict is computed from NaN. Pass nonfinite='skip'"
    )):
        oh.audit(model_with_nan_token(), tiny_sae(), token_ids(), **RUN)


def test_nan_activations_skipped_are_counted_and_left_out():
    skipped = len(audit_windows_with()) * CONTEXT
    assert 0 < skipped < AUDIT_WINDOWS * CONTEXT
    result = oh.audit(model_with_nan_token(), tiny_sae(), token_ids(), nonfinite="skip", **RUN)
    layer = result.layers[HOOK]
    assert f"{skipped} audit tokens with non-finite values were skipped" in layer.notes
    assert layer.n_tokens == AUDIT_WINDOWS * CONTEXT - skipped
    assert_clean(result)


def test_nan_in_the_sae_weights_is_refused():
    sae = tiny_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{HOOK}: the SAE's W_dec hold NaN or inf values"):
        oh.audit(tiny_model(), sae, token_ids(), **RUN)


def test_every_feature_dead():
    sae = tiny_sae(threshold=1e4)
    unknown = oh.audit(tiny_model(), sae, token_ids(), **RUN).layers[HOOK]  # lam-free conditions still audited
    assert unknown.lam is None and "cannot estimate lam: no feature was active" in unknown.skipped["C4"]
    assert "pass lam=" in unknown.skipped["C6"] and unknown.dead_features == list(range(24))
    layer = oh.audit(tiny_model(), sae, token_ids(), lam=0.5, **RUN).layers[HOOK]
    assert layer.dead_features == list(range(24))  # every feature, not only the 3 built dead
    assert layer.layer_conditions["C6"]["n_dead"] == 24
    assert_clean(oh.AuditResult(layers={HOOK: layer}))


def test_a_single_feature():
    result = oh.audit(tiny_model(), tiny_sae(d_sae=1, threshold=0.0, n_dead=0), token_ids(), lam=0.5, **RUN)
    layer = result.layers[HOOK]
    assert layer.d_sae == 1 and len(layer.features) == 1 and layer.pairs == []
    assert_clean(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda():
    with pytest.raises(RuntimeError, match="device='cuda' was asked for but CUDA is not available here; use device='cpu'"):
        oh.audit(tiny_model(), tiny_sae(), token_ids(), device="cuda", **RUN)


@pytest.mark.parametrize("argument, message", [
    (dict(held_out=1.0), "held_out is a share of the tokens in"),
    (dict(n_tokens=0), "n_tokens must be positive"),
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(context_size=0), "context_size must be positive"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
    (dict(lam=0.0), "lam must be a finite number > 0"),
])
def test_bad_arguments(argument, message):
    with pytest.raises(ValueError, match=message):
        oh.audit(tiny_model(), tiny_sae(), token_ids(), **{**RUN, **argument})


def raise_in_batches(error: Exception):
    """A hook for the SAE's codes that raises `error` in the audit's batches (not in the
    one-token attachment probe), as an allocation in the SAE encoder would."""
    def hook(acts, hook):
        if acts.shape[0] > 1:
            raise error
    return hook


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"),
], ids=["cuda", "mps", "cpu"])
def test_out_of_memory_says_to_lower_the_batch_size(error):
    sae = tiny_sae()
    sae.hook_sae_acts_post.add_hook(raise_in_batches(error))
    with pytest.raises(torch.OutOfMemoryError, match=(
        r"out of memory on cpu in the forward pass of 4 windows x 16 tokens.*"
        r"Lower batch_size \(CLI: --batch-size\)"
    )) as caught:
        oh.audit(tiny_model(), sae, token_ids(), **RUN)
    assert caught.value.__cause__ is error
    assert str(error).splitlines()[0] in str(caught.value)


def test_other_runtime_errors_pass_through_unchanged():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    sae = tiny_sae()
    sae.hook_sae_acts_post.add_hook(raise_in_batches(error))
    with pytest.raises(RuntimeError) as caught:
        oh.audit(tiny_model(), sae, token_ids(), **RUN)
    assert caught.value is error
    assert explain_out_of_memory(error, torch.zeros(4, 16)) is None


# ---- checkpoints ---------------------------------------------------------------------------


def audit_run(checkpoint_dir=None, *, resume=False, stop_after_passes=None, seconds_per_pass=0.0, **changes):
    """The reference run, forward passes of 4 windows after one probe: one estimating lam (its
    codes are pass 1's too), 3 more for pass 1, one for pass 2 (the held-out windows).

    `stop_after_passes` interrupts it (an exception from inside the model) once that many
    forward passes ran; `seconds_per_pass` slows every forward pass down without changing it.
    """
    model = tiny_model()
    calls = []

    def interfere(module, args, output):
        calls.append(1)
        time.sleep(seconds_per_pass)
        if stop_after_passes is not None and len(calls) > stop_after_passes:
            raise KeyboardInterrupt

    model.blocks[0].register_forward_hook(interfere)
    options = dict(checkpoint_dir=checkpoint_dir, resume=resume,
                   options=AuditOptions(lam_calibration_tokens=BATCH * CONTEXT))
    if checkpoint_dir is not None:
        options["checkpoint_every"] = 2 * BATCH * CONTEXT  # every second batch
    sae = tiny_sae(seed=changes.pop("sae_seed", 0))
    return oh.audit(model, sae, token_ids(), **{**RUN, **options, **changes})


def comparable(result: oh.AuditResult) -> dict:
    """report.json content without the timings."""
    data = result.to_dict()
    del data["meta"]["seconds"]
    return data


@pytest.fixture(scope="module")
def uninterrupted():
    return comparable(audit_run())


def test_checkpointing_does_not_change_the_result(tmp_path, uninterrupted):
    assert comparable(audit_run(tmp_path)) == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pass1.pt", "pass2.pt"]  # no temporary files left


@pytest.mark.parametrize("stop_after_passes", [1 + 3, 1 + 1 + 3], ids=["in pass 1", "in pass 2"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, uninterrupted, stop_after_passes):
    with pytest.raises(KeyboardInterrupt):
        audit_run(tmp_path, stop_after_passes=stop_after_passes)
    assert comparable(audit_run(tmp_path, resume=True)) == uninterrupted
    assert comparable(audit_run(tmp_path, resume=True)) == uninterrupted  # a finished run resumes to its result


CHILD = """
import sys
import torch
torch.set_num_threads(1)  # as in this process: the same summation order
sys.path.insert(0, {tests!r})
from test_reliability import audit_run
audit_run({checkpoint_dir!r}, seconds_per_pass=0.3)
"""


def test_sigkilled_run_resumes_to_the_same_report(tmp_path, uninterrupted):
    checkpoint_dir = tmp_path / "checkpoint"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = CHILD.format(tests=str(Path(__file__).parent), checkpoint_dir=str(checkpoint_dir))
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint_dir / "pass1.pt").exists():
            assert child.poll() is None, f"the audit ended before its first checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    saved = torch.load(checkpoint_dir / "pass1.pt", weights_only=True)
    assert 0 < saved["windows_done"] < AUDIT_WINDOWS and not (checkpoint_dir / "pass2.pt").exists()  # killed mid-run
    assert comparable(audit_run(checkpoint_dir, resume=True)) == uninterrupted


def rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: the run interrupted in pass 2 and resumed, and the run whole."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        try:  # each rank streams 2 pass-1 and 3 pass-2 batches; checkpoints every second batch
            audit_run(f"{out_dir}/checkpoint", stop_after_passes=1 + 1 + 2)
        except KeyboardInterrupt:
            pass
        runs = [comparable(audit_run(f"{out_dir}/checkpoint", resume=True)), comparable(audit_run())]
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(runs))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or "fork" not in mp.get_all_start_methods(),
                    reason="needs gloo and forked processes")
def test_distributed_ranks_checkpoint_apart_and_resume_together(tmp_path):
    """Under torchrun every rank keeps its own checkpoint folder; on resume the ranks combine
    their pass-1 statistics again before rebuilding the plans, as after a streamed pass 1."""
    mp.start_processes(rank_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="fork")
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["rank0", "rank1"]
    for rank in range(2):
        resumed, uninterrupted = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert resumed == uninterrupted


def test_resume_needs_a_checkpoint_dir_and_every_is_positive(tmp_path):
    with pytest.raises(ValueError, match="resume and checkpoint_every need checkpoint_dir"):
        audit_run(resume=True)
    with pytest.raises(ValueError, match="checkpoint_every is a number of tokens > 0"):
        audit_run(tmp_path, checkpoint_every=0)


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, uninterrupted):
    assert comparable(audit_run(tmp_path / "new", resume=True)) == uninterrupted


def test_an_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        audit_run(tmp_path, stop_after_passes=1 + 3)
    before = (tmp_path / "pass1.pt").read_bytes()
    with pytest.raises(FileExistsError, match="holds a checkpoint of an audit; pass resume=True \\(CLI: --resume\\)"):
        audit_run(tmp_path)
    assert (tmp_path / "pass1.pt").read_bytes() == before


@pytest.mark.parametrize("change, named", [
    (dict(n_tokens=10 * CONTEXT), r"n_tokens: checkpoint 320, now 160.*windows: checkpoint"),
    (dict(sae_seed=1), rf"saes\.{HOOK}\.weights"),
    (dict(held_out=0.1), r"held_out: checkpoint 0.2, now 0.1"),
    (dict(lam=0.3), rf"saes\.{HOOK}\.lam: checkpoint None, now 0.3"),
])
def test_resuming_another_run_is_refused(tmp_path, change, named):
    with pytest.raises(KeyboardInterrupt):
        audit_run(tmp_path, stop_after_passes=1 + 3)
    with pytest.raises(ValueError, match=rf"belongs to another run \(.*{named}"):
        audit_run(tmp_path, resume=True, **change)


def test_a_damaged_checkpoint_is_reported(tmp_path):
    (tmp_path / "pass1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint .*pass1.pt.*delete it to start over"):
        audit_run(tmp_path, resume=True)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "pass1.pt"
    atomic_torch_save({"windows_done": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"windows_done": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"windows_done": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["pass1.pt"]


# ---- report files --------------------------------------------------------------------------


def test_reports_are_not_written_over_unless_asked(tmp_path):
    result = oh.audit(tiny_model(), tiny_sae(), token_ids(10), **{**RUN, "n_tokens": 10 * CONTEXT})
    out = tmp_path / "out"
    result.save(out, overwrite=False)
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert sorted(written) == ["report.html", "report.json"]  # and no temporary file
    assert sorted(p.name for p in (out / "tables").iterdir()) == sorted(result.layers)  # one folder per layer
    assert json.loads(written["report.json"]) == result.to_dict()
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True \\(CLI: --overwrite\\)"):
        result.save(out, overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    result.save(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "tables"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        result.save(tmp_path / "file")


def test_a_checkpoint_save_remakes_a_folder_removed_under_it(tmp_path):
    """Under torchrun, rank 0 clears an --overwrite run's checkpoint folder while another rank may
    have made its own inside it already: that rank's next save must still land."""
    import shutil

    from opt_hooks.checkpoint import atomic_torch_save

    path = tmp_path / "checkpoint" / "rank1" / "pass2.pt"
    path.parent.mkdir(parents=True)
    shutil.rmtree(tmp_path / "checkpoint")
    atomic_torch_save({"state": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["state"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["pass2.pt"]  # no temporary file left
