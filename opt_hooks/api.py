"""The public entry points: `audit`, `audit_activations`, `monitor` (see docs/API.md).

`audit` and `audit_activations` check their inputs, attach the SAEs and hand the run to
`opt_hooks.run` (its stages, top to bottom). `Monitor` accumulates during the user's own forward
passes through the same router. Under torchrun the first two split the windows across ranks;
`monitor` stays local to its process.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from opt_hooks.adapters import CodeTap, check_attachment, make_views, model_device
from opt_hooks.adapters.model import model_name
from opt_hooks.engine import AuditOptions
from opt_hooks.result import AuditResult
from opt_hooks.run import (
    Batch, Router, audit_rows, audit_text, check_share, held_out_windows, rows_hook_names, special_tokens, versions,
)


def audit(
    model: Any,
    saes: Any,
    dataset: Any,
    n_tokens: int = 1_000_000,
    batch_size: int = 16,
    context_size: int = 128,
    held_out: float = 0.1,
    device: str | torch.device | None = None,
    *,
    hook_names: Any = None,
    lam: float | Mapping[str, float] | None = None,
    text_column: str | None = None,
    split: str = "train",
    prepend_bos: bool = True,
    include_special_tokens: bool = False,
    allow_model_mismatch: bool = False,
    nonfinite: str = "raise",
    options: AuditOptions | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> AuditResult:
    """Stream `n_tokens` tokens of `dataset` through `model` and audit every SAE.

    `saes`: an SAE, a list of SAEs, or {hook_name: SAE}; each SAE's hook point is
    `sae.cfg.metadata.hook_name` unless `hook_names` overrides it. A share `held_out` of the
    windows is kept out of the statistics and used to confirm certificates. `lam` overrides
    the L1 coefficient (one number, or {hook_name: lam}); by default it is read from the SAE's
    training configuration, else estimated on the first audit windows before pass 1
    (`AuditOptions.lam_calibration_tokens`). Special tokens (BOS, padding, ...) are left out
    unless `include_special_tokens`. `nonfinite="skip"` leaves out tokens with NaN/inf values
    (counted in the report) instead of stopping.

    Long runs: with `checkpoint_dir`, the state is saved there atomically at the end of each
    pass and every `checkpoint_every` tokens; `resume=True` continues from it (the same call,
    dataset and SAEs) and gives exactly the uninterrupted result. See opt_hooks/checkpoint.py.
    """
    check_share(held_out)
    if checkpoint_dir is None and (resume or checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need checkpoint_dir, the folder of the checkpoints")
    device = place_on(model, saes, device)
    views = make_views(saes, hook_names)
    check_attachment(model, views, allow_model_mismatch=allow_model_mismatch)
    return audit_text(
        model, views, dataset, device=device, n_tokens=n_tokens, batch_size=batch_size, context_size=context_size,
        held_out=held_out, lam=lam, text_column=text_column, split=split, prepend_bos=prepend_bos,
        include_special_tokens=include_special_tokens, nonfinite=nonfinite, options=options, progress=progress,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
    ).result


def place_on(model: Any, saes: Any, device: str | torch.device | None) -> torch.device:
    """Resolve the device; an explicit one moves the model and the SAEs there."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; use device='cpu' (or None)")
    model.to(device)
    for sae in _sae_objects(saes):
        sae.to(device)
    return device


def _sae_objects(saes: Any) -> list[Any]:
    if isinstance(saes, Mapping):
        return list(saes.values())
    if isinstance(saes, (list, tuple)):
        return list(saes)
    return [saes]


def audit_activations(
    saes: Any,
    batches: Any,
    held_out: float = 0.1,
    *,
    hook_names: Any = None,
    lam: float | Mapping[str, float] | None = None,
    nonfinite: str = "raise",
    options: AuditOptions | None = None,
    progress: bool = False,
) -> AuditResult:
    """Audit SAEs on activations you already have (cached activations, sae_lens.synthetic, ...).

    `batches`: a tensor (n, d_in), an iterable of such tensors that can be iterated twice (a
    list, a DataLoader), a zero-argument callable returning a fresh iterable, or
    {hook_name: one of those}. A bare SAE gets the key "sae". Rows are tokens; a share
    `held_out` of them (evenly spaced) confirms the certificates.
    """
    check_share(held_out)
    views = make_views(saes, rows_hook_names(saes, hook_names, batches))
    return audit_rows(
        views, batches, held_out=held_out, lam=lam, nonfinite=nonfinite, options=options, progress=progress
    ).result


# -- monitor: the user's own forward passes --------------------------------------------------


class Monitor:
    """Accumulates during whatever forward passes run inside `with monitor(model, saes):`.

    It keeps each SAE's inputs and sparse codes it saw (on the CPU) so that `result()` can
    measure the certificates exactly; on exit the model's hooks are exactly as before.
    """

    def __init__(self, model: Any, saes: Any, *, held_out: float = 0.1, hook_names: Any = None,
                 lam: float | Mapping[str, float] | None = None, include_special_tokens: bool = False,
                 nonfinite: str = "raise", options: AuditOptions | None = None) -> None:
        check_share(held_out)
        self.model, self.held_out = model, held_out
        self.views = make_views(saes, hook_names)
        check_attachment(model, self.views)
        self.include_special_tokens = include_special_tokens
        self.router = Router(self.views, lam, options, nonfinite)
        # (x, z, index, held, w, window, inputs) per batch
        self.seen: dict[str, list[tuple[Tensor, ...]]] = {key: [] for key in self.views}
        self._tap: CodeTap | None = None  # while attached: it holds self._on_codes
        self._input_handle = None
        self._windows = self._tokens = 0
        self._pending_tokens: Tensor | None = None  # ids seen at the embedding, not yet numbered
        self._batch: Batch | None = None  # the current forward pass
        self._consumed: set[str] = set()  # SAEs that already saw the current pass

    def __enter__(self) -> "Monitor":
        # A forward pre-hook on the token embedding (attached, removed on exit) sees the token
        # ids of every forward pass, generate()'s steps included, so special tokens and windows
        # are known as in `audit`. Models without an `embed` module are hooked at the top.
        embed = getattr(self.model, "embed", None)
        target = embed if isinstance(embed, torch.nn.Module) else self.model
        self._input_handle = target.register_forward_pre_hook(self._on_input, with_kwargs=True)
        self._tap = CodeTap(self.model, self.views, self._on_codes).__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._tap is not None:
            self._tap.__exit__(*exc_info)
        self._tap = None  # a tap kept after the block would hold this monitor in a reference cycle
        if self._input_handle is not None:
            self._input_handle.remove()
            self._input_handle = None

    def _on_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(tokens, (str, list)) and hasattr(module, "to_tokens"):
            tokens = module.to_tokens(tokens)
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            self._pending_tokens = None  # embeddings or other inputs: positions counted from the codes
            return
        self._pending_tokens = tokens.cpu().reshape(-1, tokens.shape[-1])

    def _on_codes(self, key: str, x: Tensor, z: Tensor, w: Tensor | None = None, inputs: Tensor | None = None) -> None:
        batch = self._batch
        if batch is None or key in self._consumed or len(batch.token_index) != x.shape[0]:
            batch = self._start_pass(x.shape[0])
        self._consumed.add(key)
        self.router.batch = batch
        self.router.on_codes(key, x, z, w, inputs)
        keep = batch.keep.to(x.device) & torch.isfinite(x).all(1) & torch.isfinite(z).all(1)
        kept = lambda t: None if t is None else t[keep].cpu()  # noqa: E731
        self.seen[key].append((x[keep].cpu(), z[keep].to_sparse().cpu(), batch.token_index[keep.cpu()],
                               batch.held[keep.cpu()], kept(w), batch.window[keep.cpu()], kept(inputs)))

    def _start_pass(self, n: int) -> Batch:
        """Number the n tokens of a new forward pass, when its codes first arrive.

        Token ids are numbered here, not at the embedding: generate() embeds every sampled
        token, the last one too, which no pass ever reads. The ids embedded since the last
        pass are this pass's when their count is n; otherwise (embeddings passed in, a
        generate() without KV cache re-reading the whole sequence) every row is a window.
        """
        pending, self._pending_tokens = self._pending_tokens, None
        tokens = pending if pending is not None and pending.numel() == n else None
        rows, context = (n, 1) if tokens is None else tokens.shape
        specials = None if tokens is None or self.include_special_tokens else special_tokens(tokens, self.model)
        keep = torch.ones(n, dtype=torch.bool) if specials is None else ~specials.flatten()
        windows = torch.arange(self._windows, self._windows + rows)
        self._batch = Batch(
            token_index=torch.arange(self._tokens, self._tokens + n),
            keep=keep,
            held=held_out_windows(self._windows, rows, self.held_out).repeat_interleave(context),
            window=windows.repeat_interleave(context),
        )
        self._windows += rows
        self._tokens += n
        self._consumed = set()
        return self._batch

    def result(self) -> AuditResult:
        """The audit of every token seen so far (callable any number of times)."""
        results = {}
        for key, audit in self.router.audits.items():
            if audit.n_tokens == 0:
                raise ValueError(f"{key}: the monitor has seen no audit tokens yet; run a forward pass first")
            plan = audit.plan()
            device = audit.atoms.device
            to = lambda t: None if t is None else t.to(device)  # noqa: E731
            for x, z, index, held, w, window, inputs in self.seen[key]:
                if not (plan.needs_audit_tokens or bool(held.any())):
                    continue
                plan.update(x.to(device), z.to_dense().to(device), index.to(device), held_out=held.to(device),
                            weight=to(w), window=window.to(device), inputs=to(inputs))
            results[key] = self.router.layer_result(key, plan)
        meta = {"model": model_name(self.model), "source": "monitor", "n_tokens": self._tokens,
                "held_out": self.held_out, **versions()}
        return AuditResult(layers=results, meta=meta)


def monitor(model: Any, saes: Any, **kwargs: Any) -> Monitor:
    """`with monitor(model, saes) as mon: ...; mon.result()` — see `Monitor`."""
    return Monitor(model, saes, **kwargs)
