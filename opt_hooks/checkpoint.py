"""Checkpoints of a long audit: its mergeable state, written atomically, resumed exactly.

`audit(..., checkpoint_dir=DIR, checkpoint_every=TOKENS, resume=True)` keeps one file per pass:

    DIR/pass1.pt   the pass-1 statistics of every SAE (LayerAudit.state_dict) and the count of
                   tokens skipped as non-finite, after `windows_done` of the pass-1 windows;
    DIR/pass2.pt   the pass-2 sums of every SAE (AuditPlan.state_dict), after `windows_done`
                   of the pass-2 windows. Written only once pass1.pt holds the finished pass 1,
                   from which the plans are rebuilt on resume (plan() is deterministic).

Each write goes to a temporary file in DIR and is renamed over the old one (os.replace), so a
kill at any moment leaves the previous checkpoint or the new one, never a torn file. Pass 2
rewrites only its small sums, not pass 1's sparse codes.

Every file carries the run's fingerprint (model, SAEs, lam, token windows, sizes, settings):
resuming another run is refused. Token windows are deterministic, so a resumed run re-tokenises
the dataset and skips the windows already done, on the same batch boundaries: its result equals
an uninterrupted run's exactly (on the same kind of device and torch thread count, which fix
the order of float sums). The device is not part of the fingerprint: a run may resume on
another machine, equal there up to float rounding. One run per DIR at a time; under
torch.distributed each rank keeps DIR/rank<r> (see `audit`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opt_hooks import __version__

FORMAT = 6
PASSES = (1, 2)
_NOT_OURS = "it is damaged or not an opt_hooks checkpoint; delete it to start over"


@dataclass
class Position:
    """Where a run stands: `windows_done` of pass `pass_number`'s windows, in streaming order."""

    pass_number: int
    windows_done: int


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def audit_fingerprint(
    *, model: str | None, saes: Mapping[str, Any], windows: Tensor, options: Any, **settings: Any
) -> dict[str, Any]:
    """What makes two audits the same run. `saes`: {hook_name: LayerAudit} (atoms, bias, a skip
    transcoder's W_skip, lam);
    `settings`: plain values (sizes, shares, dataset description, policies)."""
    return {
        "format": FORMAT,
        "opt_hooks_version": __version__,
        "model": model,
        "saes": {
            key: {"shape": list(layer.atoms.shape), "lam": layer.lam,
                  "weights": tensor_digest(layer.atoms, layer.bias, *([] if layer.skip is None else [layer.skip]))}
            for key, layer in saes.items()
        },
        "windows": tensor_digest(windows),
        "options": None if options is None else dataclasses.asdict(options),
        **settings,
    }


class RunCheckpoint:
    """The checkpoint folder of one audit run (see the module docstring).

    `state_of(pass_number)` returns the run's current state for that pass's file.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: dict[str, Any],
        every_tokens: int | None,
        state_of: Callable[[int], dict[str, Any]],
    ) -> None:
        if every_tokens is not None and every_tokens <= 0:
            raise ValueError(f"checkpoint_every is a number of tokens > 0 (or None: at the end of each pass), got {every_tokens}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every_tokens = every_tokens
        self.state_of = state_of
        self.saved_at: Position | None = None  # what the files hold
        self._tokens_since_save = 0

    def path(self, pass_number: int) -> Path:
        return self.directory / f"pass{pass_number}.pt"

    def restore(self, load_state: Callable[[int, dict[str, Any]], None], *, resume: bool) -> Position:
        """Load what the folder holds through `load_state(pass_number, state)`, pass 1 first, and
        return where to continue. Refuses a folder that holds a checkpoint unless `resume`, and a
        checkpoint of another run. An empty or missing folder starts the run from the beginning."""
        self.directory.mkdir(parents=True, exist_ok=True)
        records = {n: self._read(n) for n in PASSES if self.path(n).exists()}
        if records and not resume:
            raise FileExistsError(
                f"{self.directory} holds a checkpoint of an audit; pass resume=True (CLI: --resume) to "
                "continue it, or delete it / choose another checkpoint folder to start over"
            )
        if 2 in records and 1 not in records:
            raise ValueError(f"{self.path(2)} has no {self.path(1).name} beside it; delete the folder to start over")
        for stale in self.directory.glob(".pass*.pt.*.tmp"):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        for record in records.values():
            self._check_same_run(record["fingerprint"])
        for pass_number, record in sorted(records.items()):
            load_state(pass_number, record["state"])
            self.saved_at = Position(pass_number, record["windows_done"])
        return self.saved_at or Position(1, 0)

    def after_batch(self, position: Position, n_tokens: int) -> None:
        """Count a streamed batch; save when `every_tokens` tokens have streamed since the last save."""
        self._tokens_since_save += n_tokens
        if self.every_tokens is not None and self._tokens_since_save >= self.every_tokens:
            self.save(position)

    def reach(self, position: Position) -> None:
        """Save at a pass boundary, unless the files already hold this position."""
        if position != self.saved_at:
            self.save(position)

    def save(self, position: Position) -> None:
        state = self.state_of(position.pass_number)
        record = {"fingerprint": self.fingerprint, "windows_done": position.windows_done, "state": state}
        atomic_torch_save(record, self.path(position.pass_number))
        self.saved_at = position
        self._tokens_since_save = 0

    def _read(self, pass_number: int) -> dict[str, Any]:
        path = self.path(pass_number)
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # truncated or foreign
            raise ValueError(f"cannot read the checkpoint {path} ({type(error).__name__}): {_NOT_OURS}") from error
        if not (isinstance(record, dict) and {"fingerprint", "windows_done", "state"} <= record.keys()):
            raise ValueError(f"cannot read the checkpoint {path}: {_NOT_OURS}")
        return record

    def _check_same_run(self, saved: dict[str, Any]) -> None:
        now, then = _flatten(self.fingerprint), _flatten(saved)
        differ = sorted(key for key in now.keys() | then.keys() if now.get(key) != then.get(key))
        if differ:
            details = "; ".join(f"{key}: checkpoint {_short(then.get(key))}, now {_short(now.get(key))}" for key in differ)
            raise ValueError(
                f"the checkpoint in {self.directory} belongs to another run ({details}). Resume it with "
                "the same model, SAEs, dataset and settings, or use another checkpoint folder"
            )


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save so that readers see the old file or the new one, never a torn one. The folder is
    made if it is missing: under torchrun, rank 0 clears an --overwrite run's checkpoint folder
    while the other ranks may already have made theirs inside it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:12] + "..."
