"""Training-time audits (opt_hooks/training.py): short sae_lens training runs on the tiny model,
offline, whose logged audits must be those of `oh.audit_activations` of the SAE at each step."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata

import opt_hooks as oh
from opt_hooks.training import AuditedSAETrainer, AuditedTrainingRunner, TrainingAudits, flat_metrics

HOOK = "blocks.1.hook_resid_pre"
CONTEXT, BATCH, EVERY, STEPS = 32, 128, 25, 75
L1 = 2.0


def expected_layer(layer: oh.LayerResult) -> dict:
    """What the record of `layer` must hold, read from the audit itself."""
    return {
        "L": layer.objective["L"],
        "gaps": {name: layer.gaps[name]["share"] for name in ("codes", "decoder", "bias")},
        "certified": layer.condition_counts("certified"),
        "tiers": layer.tier_counts(),
        "absorption": len(layer.absorption),
        "lam": layer.lam,
    }


def logged_layer(record: dict) -> dict:
    layer = record["layers"][HOOK]
    return {
        "L": layer["objective"]["L"],
        "gaps": layer["gaps"],
        "certified": layer["certified"],
        "tiers": layer["tiers"],
        "absorption": layer["absorption"]["pairs"],
        "lam": layer["lam"],
    }


def assert_close(logged: dict, expected: dict, rel: float) -> None:
    assert logged.keys() == expected.keys()
    for key, value in expected.items():  # pytest.approx compares flat dicts and numbers, not nested ones
        assert logged[key] == pytest.approx(value, rel=rel), key


def test_runner_logs_audits_every_n_steps_that_equal_an_audit_of_the_trained_sae(tiny_model, tmp_path):
    tokens = torch.randint(1, 64, (450, CONTEXT), generator=torch.Generator().manual_seed(0))
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=L1),
        model_name="tiny-test-model", hook_name=HOOK, dataset_path="tokens", is_dataset_tokenized=True,
        streaming=False, context_size=CONTEXT, prepend_bos=False, training_tokens=BATCH * STEPS,
        train_batch_size_tokens=BATCH, store_batch_size_prompts=8, n_batches_in_buffer=4, lr=3e-3,
        logger=LoggingConfig(log_to_wandb=False), device="cpu", output_path=str(tmp_path / "output"),
    )
    log_path = tmp_path / "audits.jsonl"
    runner = AuditedTrainingRunner(
        cfg, every=EVERY, n_held_out_batches=4, log_path=log_path, held_out=0.25,
        override_model=tiny_model, override_dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
    )
    with torch.no_grad():  # the store's first 4 batches of 8 sequences, taken before training reads the rest
        first = tiny_model.run_with_cache(tokens[:32], names_filter=HOOK)[1][HOOK].reshape(-1, 16)
    assert torch.allclose(runner.audits.acts, first, atol=1e-6)
    sae = runner.run()
    assert list(runner.audits.last.layers) == [HOOK]  # keyed by the hook the runner trains on

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert lines == runner.audits.records
    assert [r["step"] for r in lines] == [EVERY - 1, 2 * EVERY - 1, 3 * EVERY - 1]  # sae_lens' step numbers
    assert [r["n_training_samples"] for r in lines] == [EVERY * BATCH, 2 * EVERY * BATCH, 3 * EVERY * BATCH]
    assert lines[0]["layers"][HOOK]["objective"]["L"] > lines[-1]["layers"][HOOK]["objective"]["L"]  # it trained

    # the last audit ran after the last step: it is the audit of the SAE training returned
    final = oh.audit_activations(sae, runner.audits.acts, held_out=0.25, hook_names=[HOOK]).layers[HOOK]
    assert_close(logged_layer(lines[-1]), expected_layer(final), rel=1e-9)


class SnapshotTrainer(AuditedSAETrainer):
    """Keeps a copy of the SAE's weights at every audit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def step(self, batch: torch.Tensor):
        output = super().step(batch)
        if len(self.snapshots) < len(self.audits.records):
            self.snapshots.append(copy.deepcopy(self.sae.state_dict()))
        return output


def batches(acts: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield acts[torch.randint(0, len(acts), (BATCH,), generator=generator)]


def test_each_audit_is_of_the_sae_at_its_step_in_the_space_it_trains_in(tiny_model, tmp_path):
    """sae_lens scales the activations ("expected_average_only_in") while training and folds the
    factor into the weights at the end: each audit is of the SAE at its step on the scaled
    held-out activations, and the last one is also the audit of the folded SAE on raw ones."""
    with torch.no_grad():
        acts = tiny_model.run_with_cache(
            torch.randint(0, 64, (80, CONTEXT), generator=torch.Generator().manual_seed(3)), names_filter=HOOK
        )[1][HOOK].reshape(-1, 16)
    train_acts, held_acts = acts[:2048], acts[2048:]
    sae_cfg = StandardTrainingSAEConfig(
        d_in=16, d_sae=32, l1_coefficient=L1, normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(hook_name=HOOK),
    )
    torch.manual_seed(0)
    sae = StandardTrainingSAE(sae_cfg)
    log_path = tmp_path / "audits.jsonl"
    audits = TrainingAudits(held_acts, every=EVERY, log_path=log_path, held_out=0.25)
    trainer = SnapshotTrainer(
        cfg=SAETrainerConfig(total_training_samples=2 * EVERY * BATCH, train_batch_size_samples=BATCH, lr=3e-3, lr_end=3e-3,
                             n_batches_for_norm_estimate=4),
        sae=sae, data_provider=batches(train_acts, seed=1), audits=audits,
    )
    trainer.fit()

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [EVERY - 1, 2 * EVERY - 1]
    assert len(trainer.snapshots) == 2
    assert trainer.activation_scaler.scaling_factor is None  # folded into the weights by fit()
    # the factor fit() estimated from the first 4 training batches, as sae_lens computes it
    first = batches(train_acts, seed=1)
    mean_norm = torch.cat([next(first) for _ in range(4)]).norm(dim=-1).mean().item()
    factor = (16 ** 0.5) / mean_norm
    for record, weights in zip(lines, trainer.snapshots):
        at_step = StandardTrainingSAE(sae_cfg)
        at_step.load_state_dict(weights)
        layer = oh.audit_activations(at_step, held_acts * factor, held_out=0.25, hook_names=[HOOK]).layers[HOOK]
        assert_close(logged_layer(record), expected_layer(layer), rel=1e-5)
    assert lines[0] != lines[1]

    folded = oh.audit_activations(sae, held_acts, held_out=0.25, hook_names=[HOOK], lam=L1 / factor).layers[HOOK]
    last = lines[-1]["layers"][HOOK]
    assert folded.tier_counts() == last["tiers"] and folded.condition_counts("certified") == last["certified"]
    assert folded.objective["L"] * factor**2 == pytest.approx(last["objective"]["L"], rel=1e-4)
    assert last["gaps"] == pytest.approx({name: folded.gaps[name]["share"] for name in last["gaps"]}, rel=1e-3)


def test_flat_metrics_name_every_number_under_the_prefix():
    record = {"step": 9, "layers": {HOOK: {"objective": {"L": 1.5, "l1": None}, "gaps": {"codes": 0.25},
                                           "certified": {"C2": 3}, "absorption": {"pairs": 2}}}}
    assert flat_metrics(record, "audit") == {
        f"audit/{HOOK}/objective/L": 1.5, f"audit/{HOOK}/gaps/codes": 0.25,
        f"audit/{HOOK}/certified/C2": 3, f"audit/{HOOK}/absorption/pairs": 2,
    }


def test_an_offline_run_without_a_log_file_is_refused_before_training():
    acts = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=L1))
    with pytest.raises(ValueError, match="needs log_path"):
        TrainingAudits(acts, every=2).trainer(
            cfg=SAETrainerConfig(total_training_samples=4 * BATCH, train_batch_size_samples=BATCH, lr_end=3e-4),
            sae=sae, data_provider=batches(acts, seed=0),
        )


def test_a_run_that_logs_to_wandb_gets_the_audits_there_at_the_trainers_steps(tiny_model, monkeypatch, tmp_path):
    """wandb.log is the one thing replaced: it records what sae_lens and the audits send it."""
    import wandb

    logged: list[tuple[dict, int]] = []
    monkeypatch.setattr(wandb, "log", lambda data, step: logged.append((data, step)))
    monkeypatch.chdir(tmp_path)
    acts = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0))
    audits = TrainingAudits(acts[:512], every=EVERY, held_out=0.25, prefix="audit")
    trainer = audits.trainer(
        cfg=SAETrainerConfig(total_training_samples=2 * EVERY * BATCH, train_batch_size_samples=BATCH, lr_end=3e-4,
                             logger=LoggingConfig(log_to_wandb=True, wandb_log_frequency=5, eval_every_n_wandb_logs=2)),
        sae=StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=L1)),
        data_provider=batches(acts[512:], seed=0),
    )
    trainer.fit()

    ours = [(data, step) for data, step in logged if any(key.startswith("audit/") for key in data)]
    assert [step for _, step in ours] == [r["step"] for r in audits.records] == [EVERY - 1, 2 * EVERY - 1]
    assert [data for data, _ in ours] == [flat_metrics(r, "audit") for r in audits.records]
    assert "audit/sae/gaps/codes" in ours[0][0] and "audit/sae/certified/C4" in ours[0][0]
    steps = [step for _, step in logged]
    assert steps == sorted(steps) and len(logged) > len(ours)  # sae_lens' own logs, W&B steps never go back
    assert list(tmp_path.iterdir()) == []  # no JSON lines file
