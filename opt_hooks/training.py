"""Audits of an SAE while sae_lens trains it: every N steps, on a fixed set of held-out activations.

    audits = oh.TrainingAudits(held_out_acts, every=500, log_path="audits.jsonl")
    sae = audits.trainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()
    # or, with sae_lens' runner: the held-out activations taken once from its store
    sae = AuditedTrainingRunner(runner_cfg, every=500, log_path="audits.jsonl").run()

Where it hooks in. sae_lens' `SAETrainer.fit` runs its `evaluator` only when it logs to W&B
(`_run_and_log_evals` sits under `cfg.logger.log_to_wandb`), so an evaluator would never run in
an offline run. The audit therefore sits in `SAETrainer.step`, the public per-step seam `fit`
calls once per training step (sae_lens' own evaluator, logging and checkpoints are untouched):
`AuditedSAETrainer` is an `SAETrainer` whose `step` audits after the optimiser update of every
step whose `n_training_steps + 1` is a multiple of `every` (sae_lens' own schedule test for its
evals). `AuditedTrainingRunner` is a `LanguageModelSAETrainingRunner` that trains with an
`AuditedSAETrainer` built from the same arguments as the trainer its `run` made.

What an audit is. `opt_hooks.audit_activations` of the SAE being trained (its training class:
for a standard SAE lam is its `l1_coefficient`, the objective sae_lens optimises once the
coefficient's warm-up is over) on the held-out activations passed through the trainer's
`activation_scaler`, the space the SAE is trained in. (sae_lens folds a scaling factor c into
the weights only at the end of training; the folded SAE on raw activations is the same audit
with lam = l1_coefficient / c, every L divided by c^2.) The activations are never training
batches: given by the user, or taken once from the activations store before training starts
(`held_out_activations`). Inside them a share `held_out` confirms the certificates, as in every
audit.

Where it is logged. Each record's "step" is the trainer's `n_training_steps` during the step
(0-based, the number sae_lens' own W&B logs of that step use; the SAE has had step + 1
updates). When the trainer logs to W&B (`cfg.logger.log_to_wandb`), `wandb.log` of the flat
numbers under `prefix`, at that step; otherwise one JSON object per audit appended to
`log_path`. Either way `TrainingAudits.records` keeps every record, and `last` the latest
audit itself (an `AuditResult`: `last.save(folder)` writes its report).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from opt_hooks.api import audit_activations
from opt_hooks.engine import AuditOptions
from opt_hooks.records import LayerResult
from opt_hooks.result import AuditResult

GAPS = ("codes", "decoder", "bias")


class TrainingAudits:
    """The audits of one SAE during its training: when to audit, on what, and where to log.

    `acts`: (n, d_in) held-out activations, raw (as the activations store yields them); the
    trainer's activation scaler is applied at each audit. `every`: audit after each training
    step whose `n_training_steps + 1` is a multiple of it. `log_path`: the JSON lines file of a
    run that does not log to W&B (required then). `options`, `held_out`: as `audit_activations`.
    """

    def __init__(
        self,
        acts: torch.Tensor,
        every: int,
        *,
        log_path: str | os.PathLike | None = None,
        held_out: float = 0.1,
        options: AuditOptions | None = None,
        prefix: str = "opt_hooks",
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be a number of training steps >= 1, got {every!r}")
        if acts.ndim != 2 or len(acts) < 2:
            raise ValueError(f"acts must be held-out activations of shape (n >= 2, d_in), got {tuple(acts.shape)}")
        self.acts = acts.detach()
        self.every = every
        self.log_path = None if log_path is None else Path(log_path)
        self.held_out = held_out
        self.options = options
        self.prefix = prefix
        self.records: list[dict[str, Any]] = []
        self.last: AuditResult | None = None  # only the latest: an audit holds every feature's row

    @classmethod
    def from_store(cls, store: ActivationsStore, every: int, *, n_batches: int = 1, **kwargs: Any) -> "TrainingAudits":
        """Held-out activations taken once from `store` (see `held_out_activations`)."""
        return cls(held_out_activations(store, n_batches), every, **kwargs)

    def trainer(self, **trainer_kwargs: Any) -> "AuditedSAETrainer":
        """An `SAETrainer(**trainer_kwargs)` that runs these audits."""
        return AuditedSAETrainer(audits=self, **trainer_kwargs)

    def due(self, trainer: SAETrainer) -> bool:
        """Whether the step the trainer has just taken is an audit step."""
        return (trainer.n_training_steps + 1) % self.every == 0

    @torch.no_grad()
    def audit(self, trainer: SAETrainer) -> dict[str, Any]:
        """Audit the trainer's SAE now, log the record and return it."""
        sae = trainer.sae
        hook_name = sae.cfg.metadata.hook_name or "sae"
        acts = trainer.activation_scaler(self.acts.to(sae.device, sae.W_dec.dtype))
        was_training = sae.training
        sae.eval()
        try:
            with warnings.catch_warnings():
                # The scaler was just applied: the SAE is audited in the space it is trained in,
                # which is what the view's warning about unfolded normalisation asks for.
                warnings.filterwarnings("ignore", message=r".*is applied outside the SAE by sae_lens")
                result = audit_activations(
                    sae, acts, held_out=self.held_out, hook_names=[hook_name], options=self.options
                )
        finally:
            sae.train(was_training)
        record = {
            "step": trainer.n_training_steps,
            "n_training_samples": trainer.n_training_samples,
            "layers": {key: layer_record(layer) for key, layer in result.layers.items()},
        }
        self.last = result
        self.records.append(record)
        self._log(trainer, record)
        return record

    def _log(self, trainer: SAETrainer, record: dict[str, Any]) -> None:
        if trainer.cfg.logger.log_to_wandb:
            import wandb

            wandb.log(flat_metrics(record, self.prefix), step=record["step"])
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, allow_nan=False) + "\n")


def layer_record(layer: LayerResult) -> dict[str, Any]:
    """What a training audit logs of one layer: held-out objective, gap shares, counts."""
    return {
        "objective": {key: _finite(layer.objective.get(key)) for key in ("L", "mse", "l1", "l0", "explained_variance")},
        "gaps": {name: _finite((layer.gaps.get(name) or {}).get("share")) for name in GAPS},
        "certified": layer.condition_counts("certified"),
        "tiers": layer.tier_counts(),
        "absorption": {"pairs": len(layer.absorption), "parents": len(layer.absorption_trees())},
        "duplicates": len(layer.duplicates),
        "lam": layer.lam,
        "n_tokens": layer.n_tokens,
        "n_held_out": layer.n_held_out,
    }


def _finite(value: float | None) -> float | None:
    """None for a number JSON cannot hold (a diverged run's inf or nan): the log must not stop training."""
    return value if value is None or math.isfinite(value) else None


def flat_metrics(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The record's numbers as W&B keys `prefix/<hook>/<group>/<name>` (None left out)."""
    out: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                walk(inner, f"{key}/{name}")
        elif isinstance(value, (int, float)):
            out[key] = value

    for hook_name, layer in record["layers"].items():
        walk(layer, f"{prefix}/{hook_name}")
    return out


def held_out_activations(store: ActivationsStore, n_batches: int = 1) -> torch.Tensor:
    """(n, d_in) activations of `n_batches` fresh store batches (special tokens left out, as the
    store's training batches), taken before training: the store's stream moves past them, so the
    trainer does not see them again within the epoch."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches!r}")
    return torch.cat([store.get_filtered_llm_batch() for _ in range(n_batches)]).cpu()


class AuditedSAETrainer(SAETrainer):
    """sae_lens' `SAETrainer` that runs `audits` after the steps they are due (see the module)."""

    def __init__(self, *args: Any, audits: TrainingAudits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if audits.log_path is None and not self.cfg.logger.log_to_wandb:
            raise ValueError("this run does not log to W&B: TrainingAudits needs log_path, the JSON lines file of the audits")
        self.audits = audits

    def step(self, batch: torch.Tensor) -> Any:
        output = super().step(batch)
        if self.audits.due(self):
            self.audits.audit(self)
        return output


class AuditedTrainingRunner(LanguageModelSAETrainingRunner):
    """sae_lens' `LanguageModelSAETrainingRunner` whose training runs `TrainingAudits`.

    The audits' held-out activations are `n_held_out_batches` batches taken from the runner's
    activations store when it is built, before training; `every`, `log_path`, `held_out`,
    `options`, `prefix` are `TrainingAudits`'. `self.audits` holds the records afterwards.
    """

    def __init__(self, cfg: Any, *, every: int, n_held_out_batches: int = 1, log_path: str | os.PathLike | None = None,
                 held_out: float = 0.1, options: AuditOptions | None = None, prefix: str = "opt_hooks",
                 **runner_kwargs: Any) -> None:
        super().__init__(cfg, **runner_kwargs)
        self.audits = TrainingAudits.from_store(
            self.activations_store, every, n_batches=n_held_out_batches, log_path=log_path, held_out=held_out,
            options=options, prefix=prefix,
        )

    def run_trainer_with_interruption_handling(self, trainer: SAETrainer) -> Any:
        """Train with an `AuditedSAETrainer` of the same arguments as the `trainer` `run` built
        (its resumed state loaded again when the run resumes from a checkpoint)."""
        audited = self.audits.trainer(
            cfg=trainer.cfg, sae=trainer.sae, data_provider=trainer.data_provider, evaluator=trainer.evaluator,
            save_checkpoint_fn=trainer.save_checkpoint_fn,
        )
        if self.cfg.resume_from_checkpoint is not None:
            audited.load_trainer_state(self.cfg.resume_from_checkpoint)
        return super().run_trainer_with_interruption_handling(audited)
