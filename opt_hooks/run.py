"""One audit run, its stages readable top to bottom (docs/ARCHITECTURE.md, "One look at the
audit tokens"): `audit_text` for text through a model, `audit_rows` for activations the user
has, and the `Router` both share (and `api.Monitor` with them), which sends each batch's codes
to the engine: to a lam calibration, to pass 1's `LayerAudit`s, or to pass 2's `AuditPlan`s.

Held-out tokens are whole windows (rows of a forward pass; single rows of activations), spread
evenly: window w is held out when floor((w+1) h) > floor(w h). Under an initialised
torch.distributed process group (torchrun) the windows are split across ranks and every rank
ends with the single-process result (opt_hooks/distributed.py).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from opt_hooks.adapters import CodeTap, SAEView, forward_to_deepest
from opt_hooks.adapters.data import as_tokenizer, special_token_mask, token_windows
from opt_hooks.adapters.model import model_name
from opt_hooks.checkpoint import Position, RunCheckpoint, audit_fingerprint
from opt_hooks.distributed import current_ranks, merge_pass_one, merge_pass_two, sum_over_ranks
from opt_hooks.engine import AuditOptions, AuditPlan, LamCalibration, LayerAudit, rows_of
from opt_hooks.records import LayerResult
from opt_hooks.result import AuditResult


NONFINITE_POLICIES = ("raise", "skip")


def held_out_windows(first: int, count: int, share: float) -> Tensor:
    """Bool (count,): which of windows first .. first+count-1 are held out (evenly spaced)."""
    w = torch.arange(first, first + count, dtype=torch.float64)
    return torch.floor((w + 1) * share) > torch.floor(w * share)


def check_share(held_out: float) -> None:
    if not (0 <= held_out < 1):
        raise ValueError(f"held_out is a share of the tokens in [0, 1), got {held_out!r}")


@dataclass
class Batch:
    """What the current forward pass is about: per-position flags, flattened like x and z."""

    token_index: Tensor  # (n,) global token index
    keep: Tensor  # (n,) False for special tokens
    held: Tensor  # (n,) True for held-out tokens
    window: Tensor  # (n,) window index, for error messages


class Router:
    """Receives (hook, x, z) from the tap and feeds pass 1 or pass 2 of every layer."""

    def __init__(self, views: Mapping[str, SAEView], lam: float | Mapping[str, float] | None,
                 options: AuditOptions | None, nonfinite: str) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.views, self.nonfinite, self.options = dict(views), nonfinite, options
        self.audits = {key: _layer_audit(key, view, _lam_for(lam, key, view), options) for key, view in views.items()}
        self.calibrations: dict[str, LamCalibration] = {}  # while unknown lams are being estimated
        self.replay: dict[str, list[tuple[Tensor, ...]]] | None = None  # codes seen meanwhile
        self.lam_notes: dict[str, str] = {}
        self.plans: dict[str, AuditPlan] | None = None
        self.batch: Batch | None = None
        self.skipped = {key: 0 for key in views}
        self.ranks = current_ranks()  # under torchrun: this rank streams its share of the windows

    @property
    def calibration_tokens(self) -> int:
        return (self.options or AuditOptions()).lam_calibration_tokens

    def start_calibration(self) -> bool:
        """Estimate every unknown lam before pass 1 (see engine.LamCalibration); False if none is."""
        self.calibrations = {
            key: LamCalibration(audit.atoms, audit.bias, key) for key, audit in self.audits.items() if audit.lam is None
        }
        if self.calibrations:
            self.replay = {key: [] for key in self.audits}
        return bool(self.calibrations)

    def finish_calibration(self) -> None:
        """Rebuild each calibrated SAE's pass-1 state with its estimated lam."""
        for key, calibration in self.calibrations.items():
            old = self.audits[key]
            try:
                lam, unavailable = calibration.compute(), None
            except ValueError as error:  # the lam-free conditions are audited all the same
                lam, unavailable = None, str(error)
            self.audits[key] = LayerAudit(
                old.atoms, old.bias, lam=lam, lam_estimated=lam is not None, lam_unavailable=unavailable,
                hook_name=key, architecture=old.architecture, scope=old.scope, options=old.options, meta=old.meta,
                skip=old.skip, signed=old.signed,
            )
            if lam is not None:
                self.lam_notes[key] = (
                    f"lam estimated before pass 1 as 2 x median <d_i, r_n> over the "
                    f"{calibration.n_codes} active codes of the first {calibration.n_tokens} audit tokens"
                )
        self.calibrations = {}

    def replay_calibration(self) -> None:
        """Feed pass 1 the calibration windows' codes (this rank's share): not streamed twice."""
        for key, batches in (self.replay or {}).items():
            for x, nonzero, values, index, w, inputs in batches:
                z = values.new_zeros(x.shape[0], self.audits[key].atoms.shape[0])
                z[nonzero] = values
                self.audits[key].update(x, z, index, w, inputs)
        self.replay = None

    def on_codes(self, key: str, x: Tensor, z: Tensor, w: Tensor | None = None, inputs: Tensor | None = None) -> None:
        """One batch of one SAE in theory units (x, z, the token weights w and a skip transcoder's
        inputs, see SAEView.units)."""
        batch = self.batch
        if batch is None or len(batch.token_index) != x.shape[0]:
            raise RuntimeError(
                f"{key}: the tap delivered {x.shape[0]} rows but the batch has "
                f"{0 if batch is None else len(batch.token_index)} tokens"
            )
        device = x.device
        keep = batch.keep.to(device) & self._finite_rows(key, x, z, batch)
        index, held = batch.token_index.to(device), batch.held.to(device)
        if self.replay is not None:  # calibrating: estimate, and keep this rank's rows for pass 1
            rows = keep & ~held
            if key in self.calibrations:
                self.calibrations[key].update(x[rows], z[rows], rows_of(w, rows))
            mine = rows & self.ranks.own(batch.window.to(device))
            if not bool(mine.all()):
                x, z, index, w, inputs = x[mine], z[mine], index[mine], rows_of(w, mine), rows_of(inputs, mine)
            nonzero = z.nonzero(as_tuple=True)  # the codes kept sparse until pass 1 reads them
            self.replay[key].append((x, nonzero, z[nonzero], index, w, inputs))
        elif self.plans is None:
            rows = keep & ~held
            if bool(rows.all()):  # no copy of the (n, K) codes when every row is kept
                self.audits[key].update(x, z, index, w, inputs)
            else:
                self.audits[key].update(x[rows], z[rows], index[rows], rows_of(w, rows), rows_of(inputs, rows))
        else:
            plan = self.plans[key]
            rows = keep if plan.needs_audit_tokens else keep & held
            if bool(rows.any()):
                plan.update(x[rows], z[rows], index[rows], held_out=held[rows], weight=rows_of(w, rows),
                            window=batch.window.to(device)[rows], inputs=rows_of(inputs, rows))

    def _finite_rows(self, key: str, x: Tensor, z: Tensor, batch: Batch) -> Tensor:
        z_min, z_max = z.aminmax() if z.numel() else (z.new_zeros(()), z.new_zeros(()))  # NaN propagates
        if bool(torch.isfinite(x).all() and torch.isfinite(z_min) and torch.isfinite(z_max)):
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        finite = torch.isfinite(x).all(1) & torch.isfinite(z).all(1)
        bad = int(torch.nonzero(~finite)[0])
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{key}: non-finite activation or code (NaN/inf) at token {int(batch.token_index[bad])} "
                f"(window {int(batch.window[bad])}); no verdict is computed from NaN. "
                "Pass nonfinite='skip' to leave such tokens out (they are counted in the report)"
            )
        if self.plans is None:  # count once, before pass 2, on the rank that owns the window
            counted = batch.keep & ~batch.held & self.ranks.own(batch.window)
            self.skipped[key] += int((~finite & counted.to(finite.device)).sum())
        return finite

    def start_pass_two(self) -> None:
        self.plans = {key: audit.plan() for key, audit in self.audits.items()}

    @property
    def pass_two_windows(self) -> str:
        """Which windows pass 2 streams: the held-out ones, or all of them when some SAE's lam
        was estimated (its C4 terms need the audit tokens again, see opt_hooks/engine.py)."""
        return "all" if any(plan.needs_audit_tokens for plan in self.plans.values()) else "held"

    def merge_ranks(self) -> None:
        """After each pass under torch.distributed: combine every rank's partial state of that
        pass, so that every rank holds one process's (see opt_hooks.distributed)."""
        if not self.ranks.split:
            return
        if self.plans is None:
            for audit in self.audits.values():
                merge_pass_one(audit)
            self.skipped = {key: sum_over_ranks(count) for key, count in self.skipped.items()}
        else:
            for plan in self.plans.values():
                merge_pass_two(plan)

    def state_dict(self, pass_number: int) -> dict[str, Any]:
        """The mergeable state of one pass (what a checkpoint of that pass holds)."""
        if pass_number == 1:
            return {"audits": {key: a.state_dict() for key, a in self.audits.items()}, "skipped": dict(self.skipped)}
        return {"plans": {key: plan.state_dict() for key, plan in self.plans.items()}}

    def load_state_dict(self, pass_number: int, state: dict[str, Any]) -> None:
        """Pass 1's state first: pass 2's plans are rebuilt from it before their sums are loaded."""
        if pass_number == 1:
            for key, audit in self.audits.items():
                audit.load_state_dict(state["audits"][key])
            self.skipped = dict(state["skipped"])
        else:  # as after a streamed pass 1: combine the ranks' statistics, then plan
            self.merge_ranks()
            self.start_pass_two()
            for key, plan in self.plans.items():
                plan.load_state_dict(state["plans"][key])

    def result(self, meta: dict[str, Any]) -> AuditResult:
        layers = {key: self.layer_result(key, plan) for key, plan in (self.plans or {}).items()}
        return AuditResult(layers=layers, meta=meta)

    def layer_result(self, key: str, plan: AuditPlan) -> LayerResult:
        """A finished plan's LayerResult, with the SAE's caveats and the skipped-token count."""
        layer = plan.result()
        layer.notes.extend(self.views[key].notes)
        if key in self.lam_notes:
            layer.notes.append(self.lam_notes[key])
        if self.skipped[key]:
            layer.notes.append(f"{self.skipped[key]} audit tokens with non-finite values were skipped")
        return layer


def _layer_audit(key: str, view: SAEView, lam: float | None, options: AuditOptions | None) -> LayerAudit:
    meta = {"sae_id": view.sae_id, "neuronpedia_id": view.neuronpedia_id, "release": view.release}
    if view.is_transcoder:  # the atoms live in the output space: d_in is the input's width
        meta.update(hook_name_out=view.hook_name_out, d_in=view.d_in)
    return LayerAudit(
        view.atoms(), view.bias(), lam=lam, hook_name=key, architecture=view.architecture,
        scope=view.scope, options=options, meta=meta, skip=view.skip_weight(), signed=view.signed,
    )


def _lam_for(lam: float | Mapping[str, float] | None, key: str, view: SAEView) -> float | None:
    if isinstance(lam, Mapping):
        return lam.get(key, view.lam)
    return view.lam if lam is None else float(lam)


@dataclass
class AuditRun:
    """A finished audit: its result, and the router holding every layer's plan (the certificates
    with their steps, which `opt_hooks.repair_run` applies)."""

    result: AuditResult
    router: Router


def audit_text(model: Any, views: dict[str, SAEView], dataset: Any, *, device: torch.device, n_tokens: int,
               batch_size: int, context_size: int, held_out: float, lam: float | Mapping[str, float] | None,
               text_column: str | None, split: str, prepend_bos: bool, include_special_tokens: bool,
               nonfinite: str, options: AuditOptions | None, progress: bool,
               checkpoint_dir: str | os.PathLike | None, checkpoint_every: int | None, resume: bool) -> AuditRun:
    """`api.audit`'s run, its stages in order: token windows; lam calibration (unknown lams, on the
    first audit windows); checkpoint restore; pass 1 (statistics); rank merge; the plans; pass 2
    (held-out windows, or every window when a lam was estimated after pass 1); rank merge; the
    layer results with their context snippets."""
    started = time.perf_counter()
    windows = torch.cat(list(token_windows(
        dataset, model, context_size, n_tokens=n_tokens, batch_size=batch_size,
        text_column=text_column, prepend_bos=prepend_bos, split=split,
    )))
    specials = None if include_special_tokens else special_tokens(windows, model)
    held = held_out_windows(0, len(windows), held_out)
    router = Router(views, lam, options, nonfinite)
    progress = progress and router.ranks.rank == 0
    checkpoint, position = None, Position(1, 0)
    if checkpoint_dir is not None:
        fingerprint = audit_fingerprint(
            model=model_name(model), saes=router.audits, windows=windows, options=options,
            dataset=_describe(dataset), n_tokens=n_tokens, batch_size=batch_size, context_size=context_size,
            held_out=held_out, include_special_tokens=include_special_tokens, nonfinite=nonfinite,
            rank=router.ranks.rank, world_size=router.ranks.world_size,
        )
        if router.ranks.split:  # every rank checkpoints its own partial state
            checkpoint_dir = os.path.join(checkpoint_dir, f"rank{router.ranks.rank}")
    timings: dict[str, float] = {}  # of this process's work only, on a resumed run
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    with CodeTap(model, views, router.on_codes) as tap:
        calibrated = 0  # this rank's pass-1 windows already streamed while estimating lam
        if router.start_calibration():  # on every rank alike: all of them get the same lam
            chosen = _stream_windows(model, tap, router, windows, specials, held, batch_size, which="calibration",
                                     desc="estimating lam", progress=progress)
            calibrated = int(router.ranks.own(chosen).sum())
            router.finish_calibration()
        if checkpoint_dir is not None:
            checkpoint = RunCheckpoint(checkpoint_dir, fingerprint, checkpoint_every, router.state_dict)
            position = checkpoint.restore(router.load_state_dict, resume=resume)
        if position == Position(1, 0):
            router.replay_calibration()
            position = Position(1, calibrated)
        router.replay = None
        lap("setup_s")  # lam calibration and checkpoint restore
        if position.pass_number == 1:
            _stream_windows(model, tap, router, windows, specials, held, batch_size, which="audit",
                            desc="pass 1/2: statistics", progress=progress,
                            first=position.windows_done, checkpoint=checkpoint)
            lap("pass1_s")
            router.merge_ranks()
            router.start_pass_two()
            position = Position(2, 0)
            if checkpoint is not None:
                checkpoint.reach(position)
            lap("plan_s")
        _stream_windows(model, tap, router, windows, specials, held, batch_size, which=router.pass_two_windows,
                        desc="pass 2/2: held-out tokens", progress=progress,
                        first=position.windows_done, checkpoint=checkpoint)
        router.merge_ranks()
        lap("pass2_s")
    meta = {
        "model": model_name(model),
        "dataset": _describe(dataset),
        "n_tokens": int(windows.numel()),
        "context_size": int(windows.shape[1]) if windows.ndim == 2 else context_size,
        "batch_size": batch_size,
        "held_out": held_out,
        "device": str(device),
        "include_special_tokens": include_special_tokens,
        "seconds": timings,
        **versions(),
    }
    result = router.result(meta)
    shown = {key: _context_features(layer) for key, layer in result.layers.items()}
    result.token_texts, result.token_pieces = _token_texts(result, windows, model, shown)
    if result.token_pieces:  # a model with a tokenizer: its contexts are shown, shaded
        _context_codes(result, windows, model, views, batch_size, shown)
    lap("result_s")
    timings["total_s"] = time.perf_counter() - started
    return AuditRun(result, router)


def _stream_windows(model, tap, router: Router, windows: Tensor, specials: Tensor | None, held: Tensor,
                    batch_size: int, *, which: str, desc: str, progress: bool,
                    first: int = 0, checkpoint: RunCheckpoint | None = None) -> Tensor:
    """Stream the pass's windows ("audit", "held" or "all"; "calibration": the first audit
    windows holding `router.calibration_tokens`, on every rank) from its `first` one on (a
    resumed run skips those done). Returns the pass's windows."""
    context = windows.shape[1]
    chosen = {"held": held, "all": torch.ones_like(held)}.get(which, ~held).nonzero().flatten()
    if which == "calibration":
        chosen = chosen[: -(-router.calibration_tokens // context)]
    else:
        chosen = chosen[router.ranks.own(chosen)]
    pass_number = 1 if which == "audit" else 2
    batches = range(first, len(chosen), batch_size)
    for start in progress_bar(batches, desc, progress, total_items=len(chosen) - first, step=batch_size):
        rows = chosen[start:start + batch_size]
        tokens = windows[rows]
        positions = torch.arange(context)
        router.batch = Batch(
            token_index=(rows[:, None] * context + positions).flatten(),
            keep=(torch.ones_like(tokens, dtype=torch.bool) if specials is None else ~specials[rows]).flatten(),
            held=held[rows][:, None].expand(-1, context).flatten(),
            window=rows[:, None].expand(-1, context).flatten(),
        )
        forward_to_deepest(model, tokens, tap.hook_names)
        if checkpoint is not None:
            checkpoint.after_batch(Position(pass_number, start + len(rows)), tokens.numel())
    router.batch = None
    if checkpoint is not None:
        checkpoint.reach(Position(pass_number, len(chosen)))
    return chosen


def special_tokens(windows: Tensor, model: Any) -> Tensor | None:
    """Special-token positions; None for a model without a tokenizer (ids given directly,
    where no token is known to be special)."""
    try:
        tokenizer = as_tokenizer(model)
    except ValueError:
        return None
    return special_token_mask(windows, tokenizer)


CONTEXT_FEATURES = 200  # per layer: the top-ranked features whose top tokens get context snippets
CONTEXT_MAP_ROWS = 100  # per layer: absorption trees, duplicates and antipodal pairs whose latents get them too


def _map_latents(layer: Any) -> set[int]:
    """The feature rows of the latents of the pair map's first CONTEXT_MAP_ROWS trees, duplicates and
    antipodal pairs (their ids; a signed SAE's negative signs: `LayerResult.row`)."""
    trees = list(layer.absorption_trees().items())[:CONTEXT_MAP_ROWS]
    latents = {f for parent, rows in trees for f in (parent, *(layer.row(r.child, r.child_sign) for r in rows))}
    for row in [*layer.duplicates[:CONTEXT_MAP_ROWS], *layer.antipodal[:CONTEXT_MAP_ROWS]]:
        latents.update((layer.row(row.i, row.sign_i), layer.row(row.j, row.sign_j)))
    return latents


def _context_features(layer: Any) -> list[int]:
    """The features whose top tokens get contexts: every certified one, the top-ranked others (at least
    CONTEXT_FEATURES) and the latents of the pair map (`_map_latents`)."""
    chosen = [feature_id for rank, feature_id in enumerate(layer.flagged())
              if layer.features[feature_id].tier == "certified" or rank < CONTEXT_FEATURES]
    return sorted(set(chosen) | _map_latents(layer))


CONTEXT_BEFORE, CONTEXT_AFTER = 16, 8  # tokens of a context on either side of its token


def _token_texts(result: AuditResult, windows: Tensor, model: Any,
                 features: Mapping[str, list[int]]) -> tuple[dict[int, str], dict[int, tuple[list[str], int]]]:
    """(snippets, pieces) of the top tokens of `features` ({key: ids}, `_context_features`) and of
    the worst residuals: {token: "left[[token]]right"} and {token: (the same window decoded token by
    token, the token's position in it)}; empty for a model without a tokenizer."""
    try:
        tokenizer = as_tokenizer(model)
    except ValueError:
        return {}, {}
    wanted = {t for key, layer in result.layers.items() for f in features[key] for t in layer.features[f].top_tokens}
    wanted |= {t for layer in result.layers.values() for t in layer.layer_conditions.get("C6", {}).get("worst_tokens", [])}
    texts, pieces = {}, {}
    for token in sorted(wanted):
        row, lo, pos, hi = _context_span(token, windows.shape[1])
        ids = windows[row]
        left, mid, right = (tokenizer.decode(ids[a:b].tolist()) for a, b in ((lo, pos), (pos, pos + 1), (pos + 1, hi)))
        texts[token] = f"{left}[[{mid}]]{right}"
        pieces[token] = ([tokenizer.decode([i]) for i in ids[lo:hi].tolist()], pos - lo)
    return texts, pieces


def _context_span(token: int, context: int) -> tuple[int, int, int, int]:
    """(window, first position, the token's position, last position + 1) of a token's context."""
    row, pos = divmod(token, context)
    return row, max(0, pos - CONTEXT_BEFORE), pos, min(context, pos + 1 + CONTEXT_AFTER)


def _context_codes(result: AuditResult, windows: Tensor, model: Any, views: Mapping[str, SAEView],
                   batch_size: int, features: Mapping[str, list[int]]) -> None:
    """Each of `features`' ({key: ids}) code on every token of its contexts
    (`FeatureRow.top_context_values`), read by running the model and the SAEs once more over the
    windows that hold those contexts (at most a few hundred features' top tokens per layer)."""
    context = windows.shape[1]
    spans = {t: _context_span(t, context) for key, layer in result.layers.items() for f in features[key]
             for t in layer.features[f].top_tokens}
    rows = torch.tensor(sorted({span[0] for span in spans.values()}), dtype=torch.long)
    columns = {key: torch.tensor(features[key], dtype=torch.long) for key in result.layers}
    codes: dict[str, dict[int, Tensor]] = {key: {} for key in result.layers}  # key -> window -> (context, F)
    batch = rows[:0]  # the windows of the forward pass in progress

    def keep(key: str, x: Tensor, z: Tensor, w: Tensor | None = None, inputs: Tensor | None = None) -> None:
        picked = z[:, columns[key].to(z.device)].reshape(len(batch), context, -1).cpu()
        for window, values in zip(batch.tolist(), picked):
            codes[key][window] = values

    with CodeTap(model, views, keep) as tap:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            forward_to_deepest(model, windows[batch], tap.hook_names)
    for key, layer in result.layers.items():
        for slot, f in enumerate(features[key]):
            feature = layer.features[f]
            feature.top_context_values = []
            for token in feature.top_tokens:
                row, lo, _, hi = spans[token]
                # 4 significant digits: they shade a context, they are not measurements
                feature.top_context_values.append([float(f"{v:.4g}") for v in codes[key][row][lo:hi, slot].tolist()])


def audit_rows(views: dict[str, SAEView], batches: Any, *, held_out: float, lam: float | Mapping[str, float] | None,
               nonfinite: str, options: AuditOptions | None, progress: bool) -> AuditRun:
    """`api.audit_activations`'s run: lam calibration on the first audit rows, pass 1, rank merge,
    the plans, pass 2, rank merge, the layer results. Every row is a window."""
    sources = batch_sources(views, batches)
    router = Router(views, lam, options, nonfinite)
    if router.start_calibration():  # every rank alike, from the first audit rows
        for key in router.calibrations:
            _calibrate_on_rows(router, views[key], key, sources[key], held_out)
        router.finish_calibration()
        router.replay = None  # pass 1 reads those rows again: activations cost no forward pass
    for pass_two in (False, True):
        if pass_two:
            router.start_pass_two()
        for key, source in sources.items():
            seen = 0
            desc = f"{key}: pass {2 if pass_two else 1}/2"
            for acts in progress_bar(iterate_batches(source, key, views[key].is_transcoder), desc, progress):
                rows, out = view_rows(views[key], acts)  # (n, d_in), one row per token, as encode reads them
                index = torch.arange(seen, seen + len(rows))
                held = held_out_windows(seen, len(rows), held_out)
                seen += len(rows)
                mine = router.ranks.own(index)  # this rank's rows only (each row is a window here)
                if pass_two and not router.plans[key].needs_audit_tokens:
                    mine &= held  # pass 1 already measured the audit rows
                if not bool(mine.any()):
                    continue
                rows, out, index, held = rows[mine.to(rows.device)], rows_of(out, mine.to(rows.device)), index[mine], held[mine]
                router.batch = Batch(index, torch.ones(len(index), dtype=torch.bool), held, index)
                router.on_codes(key, *views[key].units(rows, out))
            if seen == 0:
                raise ValueError(f"{key}: the activation batches are empty; nothing to audit")
        router.merge_ranks()
    router.batch = None
    return AuditRun(router.result({"source": "activations", "held_out": held_out, **versions()}), router)


def _calibrate_on_rows(router: Router, view: SAEView, key: str, source: Any, held_out: float) -> None:
    """Feed one SAE's lam calibration the first `router.calibration_tokens` audit rows."""
    seen = audit_seen = 0
    for acts in iterate_batches(source, key, view.is_transcoder):
        rows, out = view_rows(view, acts)
        held = held_out_windows(seen, len(rows), held_out)
        index = torch.arange(seen, seen + len(rows))
        seen += len(rows)
        take = ~held & (audit_seen + torch.cumsum((~held).long(), 0) <= router.calibration_tokens)
        audit_seen += int((~held).sum())
        if bool(take.any()):
            router.batch = Batch(index[take], torch.ones(int(take.sum()), dtype=torch.bool), held[take], index[take])
            take = take.to(rows.device)
            router.on_codes(key, *view.units(rows[take], rows_of(out, take)))
        if audit_seen >= router.calibration_tokens:
            break
    router.batch = None


def rows_hook_names(saes: Any, hook_names: Any, batches: Any) -> Any:
    """The hook names of activations given without a model: a bare sae_lens SAE with one stream of
    batches is keyed "sae" (its metadata may name no hook); an SAEView keeps its hook name."""
    if isinstance(saes, SAE) and hook_names is None and not isinstance(batches, Mapping):
        return ["sae"]
    return hook_names


def batch_sources(views: Mapping[str, SAEView], batches: Any) -> dict[str, Any]:
    if isinstance(batches, Mapping):  # by key, or by hook name for every SAE on that hook
        found = {key: batches[key] if key in batches else batches.get(view.hook_name) for key, view in views.items()}
        missing = sorted(key for key, source in found.items() if source is None)
        if missing:
            raise ValueError(f"no activation batches for {missing}; batches has keys {sorted(batches)}")
        return found
    if len(views) != 1:
        raise ValueError(
            f"{len(views)} SAEs but one stream of batches: pass batches as {{hook_name: batches}} for {sorted(views)}"
        )
    return {next(iter(views)): batches}


def view_rows(view: SAEView, acts: Any) -> tuple[Tensor, Tensor | None]:
    """(rows (n, d_in), a transcoder's target rows (n, d_out) or None) of one batch."""
    if not view.is_transcoder:
        return view.rows(acts), None
    rows = view.rows(acts[0])
    return rows, view.rows_out(acts[1], len(rows))


def iterate_batches(source: Any, key: str, pairs: bool = False) -> Iterator[Any]:
    """The batches of one source: tensors (n, d_in); with `pairs` (a transcoder), (x, y) pairs of
    tensors, from a pair of tensors, a pair of streams, or a stream of pairs."""
    if pairs:
        yield from _iterate_pairs(source, key)
        return
    if isinstance(source, Tensor):
        yield source
        return
    for acts in _fresh(source, key, "a list, a tensor"):
        if not isinstance(acts, Tensor):
            raise TypeError(f"{key}: activation batches must be tensors (n, d_in), got {type(acts).__name__}")
        yield acts


def _iterate_pairs(source: Any, key: str) -> Iterator[tuple[Tensor, Tensor]]:
    """A tuple is (inputs, outputs): two tensors or two streams read in step; a list or any other
    iterable yields (x, y) pairs (a transcoder's d_in often equals its d_out, so shapes cannot tell)."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise TypeError(f"{key}: a transcoder's tuple of batches is (inputs, outputs); got {len(source)} items")
        inputs, outputs = source
        if isinstance(inputs, Tensor) and isinstance(outputs, Tensor):
            yield inputs, outputs
            return
        inputs, outputs = iterate_batches(inputs, key), iterate_batches(outputs, key)
        for pair in zip(inputs, outputs, strict=True):
            yield pair
        return
    for pair in _fresh(source, key, "a list of (x, y) pairs, a tuple of two tensors or lists"):
        if not _is_pair(pair):
            raise TypeError(
                f"{key}: a transcoder's batches are (x, y) pairs: x (n, d_in) at its hook_name, y (n, d_out) at "
                f"its hook_name_out; got {type(pair).__name__}"
            )
        yield pair[0], pair[1]


def _fresh(source: Any, key: str, instead: str) -> Iterable:
    """An iterable of the source's batches for this pass: a zero-argument callable is called (a
    fresh iterable every pass: a generator is fine there); a one-shot iterator is refused."""
    if callable(source):
        return source()
    if iter(source) is source:
        raise TypeError(
            f"{key}: the audit reads the activations twice (statistics, then certificates), but a "
            f"one-shot iterator or generator was given; pass {instead}, or a zero-argument "
            "function that returns a fresh iterator"
        )
    return source


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)


def progress_bar(items: Iterable, desc: str, enabled: bool, total_items: int | None = None, step: int = 1) -> Iterable:
    """A tqdm bar over `items`: the notebook widget where Jupyter's widgets are installed, text
    otherwise (tqdm.auto without ipywidgets prints an "IProgress not found" warning in every notebook)."""
    if not enabled:
        return items
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

    total = None if total_items is None else math.ceil(total_items / step)
    return tqdm(items, desc=desc, total=total, leave=False)


def _describe(dataset: Any) -> str:
    if isinstance(dataset, str):
        return dataset
    if isinstance(dataset, (list, tuple)):
        return f"{len(dataset)} in-memory documents"
    return type(dataset).__name__


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("opt_hooks", "torch", "transformer_lens", "sae_lens"):
        try:
            out[f"{package}_version"] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            out[f"{package}_version"] = "unknown"
    return out
