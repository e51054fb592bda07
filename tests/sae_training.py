"""Shared by the acceptance tests: small SAEs trained with sae_lens' own training step, and
a comparison of two audits' layer results.

`train_sae` runs `TrainingSAE.training_forward_pass` (the loss sae_lens optimises, its
coefficients taken from the SAE's own `get_coefficients`, without warm-up) with Adam on a
fixed tensor of activations. `to_inference` turns a trained SAE into the inference SAE that
sae_lens itself would publish (`save_inference_model`, then `SAE.load_from_disk`).
`assert_layers_match` checks that two audits of the same tokens report the same thing.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainStepInput

from opt_hooks.records import LayerResult

# architecture -> (training SAE class, its config class, architecture-specific config fields)
TRAINING_KINDS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "standard": (sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig, {"l1_coefficient": 0.5}),
    "gated": (sae_lens.GatedTrainingSAE, sae_lens.GatedTrainingSAEConfig, {"l1_coefficient": 0.5}),
    "jumprelu": (sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig, {"l0_coefficient": 0.05}),
    "topk": (sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig, {"k": 4}),
    "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig, {"k": 4}),
    "matryoshka_batchtopk": (
        sae_lens.MatryoshkaBatchTopKTrainingSAE,
        sae_lens.MatryoshkaBatchTopKTrainingSAEConfig,
        {"k": 4, "matryoshka_widths": [8]},  # the last width, d_sae, is appended below
    ),
    # a pursuit of at most 4 steps, stopped early below residual norm 0.1 (sae_lens sets
    # decoder_init_norm to 1.0 for it, with a warning unless it is given)
    "matching_pursuit": (
        sae_lens.MatchingPursuitTrainingSAE,
        sae_lens.MatchingPursuitTrainingSAEConfig,
        {"residual_threshold": 0.1, "max_iterations": 4, "decoder_init_norm": 1.0},
    ),
    # signed codes: the k pre-activations of largest magnitude, with their sign
    "abstopk": (sae_lens.AbsTopKTrainingSAE, sae_lens.AbsTopKTrainingSAEConfig, {"k": 4}),
}


def train_sae(
    kind: str,
    acts: torch.Tensor,
    *,
    hook_name: str,
    d_sae: int = 32,
    steps: int = 30,
    batch_size: int = 128,
    lr: float = 3e-3,
    dtype: str = "float64",
    model_name: str | None = None,
    seed: int = 0,
    **fields: Any,
) -> sae_lens.TrainingSAE:
    """A `kind` training SAE (see TRAINING_KINDS) trained on `acts` (n, d_in)."""
    sae_class, config_class, defaults = TRAINING_KINDS[kind]
    config = {**defaults, **fields}
    if kind == "matryoshka_batchtopk":
        config["matryoshka_widths"] = [*config["matryoshka_widths"], d_sae]
    torch.manual_seed(seed)
    sae = sae_class(config_class(
        d_in=acts.shape[-1], d_sae=d_sae, dtype=dtype,
        metadata=SAEMetadata(hook_name=hook_name, model_name=model_name), **config,
    ))
    coefficients = {
        name: value.value if isinstance(value, TrainCoefficientConfig) else value
        for name, value in sae.get_coefficients().items()
    }
    data = acts.detach().reshape(-1, acts.shape[-1]).to(sae.W_dec.dtype)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        output = sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients=coefficients, dead_neuron_mask=None,
            n_training_steps=step, is_logging_step=False,
        ))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return sae.eval()


def to_inference(sae: sae_lens.TrainingSAE, folder: Path) -> sae_lens.SAE:
    """The inference SAE sae_lens saves for `sae` (BatchTopK and Matryoshka become JumpReLU, matching
    pursuit stays a MatchingPursuitSAE)."""
    sae.save_inference_model(folder)
    return sae_lens.SAE.load_from_disk(folder, dtype=str(sae.W_dec.dtype).removeprefix("torch.")).eval()


# LayerResult fields that hold code values themselves (not sums of them): two audits that
# computed the same codes must agree on them bit for bit.
CODE_VALUE_FIELDS = frozenset({"max_code", "min_code", "bound", "top_values", "sample_i", "sample_j", "hull_min", "hull_max"})


def assert_layers_match(
    a: LayerResult, b: LayerResult, *, exact_code_values: bool = True, rtol: float = 1e-7, atol: float = 1e-12
) -> None:
    """Every integer, string and verdict equal; code values (CODE_VALUE_FIELDS) equal exactly
    when `exact_code_values`; every other float (sums, means, margins, certificate changes)
    close. Pairs are matched by (i, j): their order follows float ties of the margins."""
    left, right = dataclasses.asdict(a), dataclasses.asdict(b)
    for side in (left, right):
        side["pairs"] = {(p["i"], p["j"]): p for p in side["pairs"]}
    _assert_match(left, right, "layer", exact=False, exact_code_values=exact_code_values, rtol=rtol, atol=atol)


def _assert_match(x: Any, y: Any, path: str, **how: Any) -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), f"{path}: keys {sorted(map(str, x))} != {y!r}"
        for key in x:
            exact = how["exact"] or (how["exact_code_values"] and key in CODE_VALUE_FIELDS)
            _assert_match(x[key], y[key], f"{path}.{key}", **{**how, "exact": exact})
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), f"{path}: lengths {len(x)} != {len(y)}"
        for k, (u, v) in enumerate(zip(x, y)):
            _assert_match(u, v, f"{path}[{k}]", **how)
    elif isinstance(x, float) and not how["exact"]:
        assert isinstance(y, float) and math.isclose(x, y, rel_tol=how["rtol"], abs_tol=how["atol"]), f"{path}: {x!r} != {y!r}"
    else:
        assert x == y, f"{path}: {x!r} != {y!r}"


TRANSCODER_CLASSES = {
    "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
    "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
    "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
}


def transcoder_loss(transcoder: sae_lens.Transcoder, x: torch.Tensor, y: torch.Tensor, l1_coefficient: float) -> torch.Tensor:
    """Per token: the squared error of the prediction of y plus l1_coefficient sum_i f_i ||W_dec[i]||,
    sae_lens' standard L1 training loss with the target at the output hook (THEORY.md section 8)."""
    features = transcoder.encode(x)
    error = ((transcoder(x) - y) ** 2).sum(-1)
    return error + l1_coefficient * (features * transcoder.W_dec.norm(dim=1)).sum(-1)


def train_transcoder(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    hook_name: str,
    hook_name_out: str,
    l1_coefficient: float | None = 0.05,
    d_sae: int = 32,
    steps: int = 150,
    batch_size: int = 128,
    lr: float = 5e-3,
    model_name: str | None = "tiny-test-model",
    seed: int = 0,
) -> sae_lens.Transcoder:
    """A float64 `kind` transcoder (TRANSCODER_CLASSES) trained with Adam on `transcoder_loss`,
    predicting y (n, d_out) from x (n, d_in). sae_lens has no transcoder trainer: the l1
    coefficient is recorded in metadata.training_architecture_details as a trained SAE's is
    (None: no record, lam unknown)."""
    transcoder_class, config_class = TRANSCODER_CLASSES[kind]
    details = None if l1_coefficient is None else {"l1_coefficient": l1_coefficient}
    torch.manual_seed(seed)
    transcoder = transcoder_class(config_class(
        d_in=x.shape[-1], d_sae=d_sae, d_out=y.shape[-1], dtype="float64", apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook_name, hook_name_out=hook_name_out, model_name=model_name,
                             training_architecture_details=details),
    ))
    inputs, targets = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    optimizer = torch.optim.Adam(transcoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = transcoder_loss(transcoder, inputs[rows], targets[rows], l1_coefficient or 0.05).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return transcoder.eval()
