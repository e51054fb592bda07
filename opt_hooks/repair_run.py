"""Repair (THEORY.md section 7): an audit's certified changes written into the SAE, each kept only
where it lowers L on tokens it was not chosen on, and the result measured on tokens neither saw.

The tokens (windows of text, or rows of activations; every part evenly spaced) fall in three parts:

- test: a share `held_out` (0.2) that neither the audit nor the repair reads until the end, where
  the before / after table (`RepairResult.table`) is measured with the SAEs' own encode / decode;
- validation: the share `RepairOptions.audit_held_out` of the rest, which the audit holds out. The
  certificates are certified there, and every step of the repair is checked there, as the SAE's
  own objective of the changed SAE against the SAE it was built from, token by token (a paired
  test, significant at Bonferroni over the layer's steps);
- audit: where the audit chose every certificate (its pass 1) and where a resampled latent's code
  rule is fitted (`PlantFit`).

One round, per layer: the audit's certified findings become steps, in this order (each one an SAE
built from the previous one, `SAEEdit`): C1 floors into b_dec ("floor"), the C5 bias step ("bias"),
a skip transcoder's C7 step on W_skip ("skip"), the C3 atom turns ("atoms"), the C4 code scales ("codes"), then "respawn": duplicate latents merged
(the pair map's duplicates that fire together) and free latents (the merged ones, and the dead ones
when C6 is certified) resampled towards the audit's worst residuals, with an encoder row that fires
where the input points that way. A step that lowers L insignificantly on the validation part is
dropped (so is a resampled latent whose own change is not significant), the chain rebuilt without
it and measured again. `rounds` > 1 audits the repaired SAEs again on the same tokens, with the
first round's lam, so every round optimises the same objective.

Transcoders are repaired in their output space (THEORY.md section 8): their rows are (input,
target) pairs, their objective the squared error of `transcoder(x)` against the output hook's y
plus lam times the L1 term; respawn does not apply to them (`sae_edit.refusal`).

Matching-pursuit SAEs are tied (a pursuit over W_dec, no W_enc or b_enc): floors, code scales and
respawn are refused (`sae_edit.refusal`), and so is the bias step where the SAE adds no b_dec. The
atom turns and the bias step they take move the pursuit's codes as well; every chain version is
measured by re-encoding with its own `encode` (`sae_objective`), so that is what is judged.

AbsTopK SAEs (signed codes, THEORY.md section 9) are audited on their doubled dictionary: the audit's
C1 and C4 certificates are per sign of a latent and are refused (`sae_edit.refusal`: a TopK floor, and
no parameter scales one sign's codes), its C3 turns are tied (one decoder row for both signs) and go
into W_dec, the bias step into b_dec and b_enc as for TopK; respawn is refused as for TopK. Items name
the latent and, for a one-sign step, its sign.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opt_hooks import policy as pol
from opt_hooks.api import place_on
from opt_hooks.adapters import InputTap, SAEView, check_attachment, forward_to_deepest, make_views
from opt_hooks.adapters.sae_edit import NotExpressible, SAEEdit, mark_modified, median_alive_norm, refusal
from opt_hooks.adapters.data import token_windows
from opt_hooks.engine import AuditOptions, AuditPlan
from opt_hooks.records import LayerResult, atomic_write_text, file_name, finite_or_none, json_safe
from opt_hooks.result import AuditResult
from opt_hooks.run import (
    AuditRun, audit_rows, audit_text, batch_sources, check_share, held_out_windows, iterate_batches, progress_bar,
    rows_hook_names, special_tokens, versions, view_rows,
)
from opt_hooks.theory.repair_sums import LatentChanges, PlantFit, VariantSums

REPAIR_JSON = "repair.json"
SAE_FOLDER = "saes"


@dataclass
class RepairOptions:
    """Settings of a repair beyond the audit's (`AuditOptions`, whose alpha every step's test uses)."""

    audit_held_out: float = 0.25  # share of the fit tokens the audit holds out: the validation part
    rounds: int = 1  # audit -> apply, repeated on the repaired SAEs
    merge_min_rho: float = 0.99  # duplicates merged only this parallel: a merge drops sqrt(1 - rho^2) of the code
    merge_min_jaccard: float = 0.5  # and only where they fire together this often
    max_planted: int = 256  # resampled latents per layer and round, at most
    plant_max_cos: float = 0.5  # resampled atoms differ at least this much from one another
    plant_quantiles: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)  # threshold grid
    max_validations: int = 3  # validation passes per round (a rebuilt chain is measured again)

    def __post_init__(self) -> None:
        check_share(self.audit_held_out)
        if self.audit_held_out == 0:
            raise ValueError("audit_held_out must be > 0: the repair checks its steps on the audit's held-out tokens")
        if self.rounds < 1 or self.max_validations < 1:
            raise ValueError("rounds and max_validations must be at least 1")


@dataclass
class RepairResult:
    """`saes` {key: repaired SAE; a new object, except where no step was applied: then the SAE given},
    `table` {key: before / after on the test tokens}, `changes` {key: the steps, applied or not, with
    their measured gains}, `audits` (one per round)."""

    saes: dict[str, Any]
    table: dict[str, dict[str, Any]]
    changes: dict[str, list[dict[str, Any]]]
    audits: list[AuditResult]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (no NaN): what repair.json holds and the report's "repair" entry."""
        return json_safe({"meta": self.meta, "table": self.table, "changes": self.changes})

    def summary(self) -> str:
        from opt_hooks.report.terminal import render_repair

        return render_repair(self.to_dict())

    def save(self, out: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """out/saes/<key>/ (each SAE's `save_model`), out/repair.json, and out/report.json +
        report.html: the first round's audit with the repair's table and steps."""
        import json

        from opt_hooks.report import write_report

        out = Path(out)
        report = self.audits[0]
        report.repair = self.to_dict()
        write_report(report, out, overwrite=overwrite)
        for key, sae in self.saes.items():
            sae.save_model(out / SAE_FOLDER / file_name(key))
        atomic_write_text(out / REPAIR_JSON, json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return out


# -- the entry points ---------------------------------------------------------------------------


def repair(model: Any, saes: Any, dataset: Any, n_tokens: int = 1_000_000, batch_size: int = 16,
           context_size: int = 128, held_out: float = 0.2, device: str | torch.device | None = None, *,
           hook_names: Any = None, lam: float | Mapping[str, float] | None = None, text_column: str | None = None,
           split: str = "train", prepend_bos: bool = True, include_special_tokens: bool = False,
           options: AuditOptions | None = None, repair_options: RepairOptions | None = None,
           progress: bool = True) -> RepairResult:
    """Audit the SAEs on `dataset` through `model` (as `oh.audit`), apply the certified changes and
    measure them (module docstring). The SAEs given are not changed: `result.saes` are new ones, except
    where no step was applied (there the SAE given)."""
    check_share(held_out)
    if held_out == 0:
        raise ValueError("held_out must be > 0: the before / after table is measured on those tokens")
    ropts = repair_options or RepairOptions()
    device = place_on(model, saes, device)
    views = make_views(saes, hook_names)
    check_attachment(model, views)
    windows = torch.cat(list(token_windows(dataset, model, context_size, n_tokens=n_tokens, batch_size=batch_size,
                                           text_column=text_column, prepend_bos=prepend_bos, split=split)))
    specials = None if include_special_tokens else special_tokens(windows, model)
    test = held_out_windows(0, len(windows), held_out)
    fit = torch.nonzero(~test).flatten()
    validation = held_out_windows(0, len(fit), ropts.audit_held_out)
    parts = _TextParts(model, windows, specials, batch_size, progress,
                       {"audit": fit[~validation], "validation": fit[validation], "test": torch.nonzero(test).flatten()})

    def audit_round(round_views: dict[str, SAEView], round_lam: Any) -> AuditRun:
        return audit_text(
            model, round_views, windows[fit], device=device, n_tokens=int(windows[fit].numel()), batch_size=batch_size,
            context_size=int(windows.shape[1]), held_out=ropts.audit_held_out, lam=round_lam, text_column=None,
            split=split, prepend_bos=prepend_bos, include_special_tokens=include_special_tokens, nonfinite="raise",
            options=options, progress=progress, checkpoint_dir=None, checkpoint_every=None, resume=False,
        )

    meta = {"source": "text", "n_tokens": int(windows.numel()), "held_out": held_out,
            "audit_held_out": ropts.audit_held_out, "rounds": ropts.rounds, **versions()}
    return _repair(views, audit_round, parts, lam, options, ropts, meta)


def repair_activations(saes: Any, batches: Any, held_out: float = 0.2, *, hook_names: Any = None,
                       lam: float | Mapping[str, float] | None = None, options: AuditOptions | None = None,
                       repair_options: RepairOptions | None = None, progress: bool = False) -> RepairResult:
    """`repair` on activations you already have (as `oh.audit_activations`): rows are tokens."""
    check_share(held_out)
    if held_out == 0:
        raise ValueError("held_out must be > 0: the before / after table is measured on those tokens")
    ropts = repair_options or RepairOptions()
    views = make_views(saes, rows_hook_names(saes, hook_names, batches))
    sources = batch_sources(views, batches)
    parts = _RowParts(views, sources, held_out, ropts.audit_held_out)

    def audit_round(round_views: dict[str, SAEView], round_lam: Any) -> AuditRun:
        fit = {key: parts.fit_source(key) for key in round_views}
        return audit_rows(round_views, fit, held_out=ropts.audit_held_out, lam=round_lam, nonfinite="raise",
                          options=options, progress=progress)

    meta = {"source": "activations", "held_out": held_out, "audit_held_out": ropts.audit_held_out,
            "rounds": ropts.rounds, **versions()}
    return _repair(views, audit_round, parts, lam, options, ropts, meta)


# -- the token parts ----------------------------------------------------------------------------


class _TextParts:
    """The SAE input rows of each part's windows, batch by batch: {key: (rows (n, d_in), window of each)}."""

    def __init__(self, model: Any, windows: Tensor, specials: Tensor | None, batch_size: int, progress: bool,
                 chosen: dict[str, Tensor]) -> None:
        self.model, self.windows, self.specials = model, windows, specials
        self.batch_size, self.progress, self.chosen = batch_size, progress, chosen

    def rows(self, part: str, views: Mapping[str, SAEView]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        chosen = self.chosen[part]
        found: dict[str, Tensor] = {}
        with InputTap(self.model, views, found.__setitem__) as tap:
            for start in progress_bar(range(0, len(chosen), self.batch_size), f"repair: {part} tokens", self.progress,
                                   total_items=len(chosen), step=self.batch_size):
                rows = chosen[start:start + self.batch_size]
                found.clear()
                forward_to_deepest(self.model, self.windows[rows], tap.hook_names)
                window = rows[:, None].expand(-1, self.windows.shape[1]).flatten()
                keep = torch.ones_like(window, dtype=torch.bool) if self.specials is None else ~self.specials[rows].flatten()
                yield {key: (_take(rows, keep), window[keep]) for key, rows in found.items()}


class _RowParts:
    """Rows of activations split like windows: row t is a test row when held_out_windows says so;
    the others (the fit rows, numbered f = 0, 1, ...) are validation rows where the audit holds out."""

    def __init__(self, views: Mapping[str, SAEView], sources: dict[str, Any], held_out: float,
                 audit_held_out: float) -> None:
        self.views, self.sources = dict(views), sources
        self.held_out, self.audit_held_out = held_out, audit_held_out

    def _parts(self, key: str) -> Iterator[tuple[Any, Tensor, Tensor, Tensor]]:
        """(rows, row index, test mask, validation mask) per batch of one SAE's source; a
        transcoder's rows are (inputs, targets) pairs."""
        seen = fit_seen = 0
        view = self.views[key]
        for acts in iterate_batches(self.sources[key], key, view.is_transcoder):
            inputs, targets = view_rows(view, acts)
            rows = inputs if targets is None else (inputs, targets)
            index = torch.arange(seen, seen + len(inputs))
            test = held_out_windows(seen, len(inputs), self.held_out)
            seen += len(inputs)
            validation = torch.zeros_like(test)
            validation[~test] = held_out_windows(fit_seen, int((~test).sum()), self.audit_held_out)
            fit_seen += int((~test).sum())
            yield rows, index, test, validation

    def fit_source(self, key: str) -> Callable[[], Iterator[Any]]:
        return lambda: (_take(rows, ~test) for rows, _, test, _ in self._parts(key) if bool((~test).any()))

    def rows(self, part: str, views: Mapping[str, SAEView]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        """{key: (rows, row index)}: every row is its own window."""
        for key in views:
            for rows, index, test, validation in self._parts(key):
                mask = {"test": test, "validation": validation, "audit": ~test & ~validation}[part]
                if bool(mask.any()):
                    yield {key: (_take(rows, mask), index[mask])}


def _take(rows: Any, mask: Tensor) -> Any:
    """The masked rows of a batch: a tensor, or a transcoder's (inputs, targets) pair."""
    if isinstance(rows, tuple):
        return tuple(_take(part, mask) for part in rows)
    return rows[mask.to(rows.device)]


def _targets(rows: Any) -> Tensor:
    """What a batch's squared error is measured against: the rows, or a transcoder's targets."""
    return rows[1] if isinstance(rows, tuple) else rows


# -- one repair ---------------------------------------------------------------------------------


@dataclass
class _Step:
    """One step of a layer's repair: a change of the SAE made by `apply` on an SAEEdit."""

    name: str
    condition: str
    apply: Callable[[SAEEdit], None]
    items: list[dict[str, Any]]
    reference: int = -1  # the chain version it is measured against (set when the chain is built)
    record: dict[str, Any] = field(default_factory=dict)


def _repair(views: dict[str, SAEView], audit_round: Callable[[dict[str, SAEView], Any], AuditRun], parts: Any,
            lam: Any, options: AuditOptions | None, ropts: RepairOptions, meta: dict[str, Any]) -> RepairResult:
    policy = (options or AuditOptions()).policy
    current = {key: view.sae for key, view in views.items()}
    changes: dict[str, list[dict[str, Any]]] = {key: [] for key in views}
    audits: list[AuditResult] = []
    lams: Any = lam
    for round_number in range(1, ropts.rounds + 1):
        round_views = views if round_number == 1 else {key: _view(sae, key, views[key]) for key, sae in current.items()}
        run = audit_round(round_views, lams)
        audits.append(run.result)
        if round_number == 1:  # every round optimises the first round's objective
            lams = {key: layer.lam for key, layer in run.result.layers.items()}
        layers = {key: _LayerRepair(key, round_views[key], run.router.plans[key], run.result.layers[key], ropts)
                  for key in views}
        _fit_plants(parts, layers)
        for _ in range(ropts.max_validations):
            for layer in layers.values():
                layer.build()
            _validate(parts, layers)
            if not any([layer.decide(policy) for layer in layers.values()]):
                break
        else:  # still dropping after the last pass: keep what it let through, never a pruned respawn
            for layer in layers.values():  # that no pass measured
                if layer.pruned:
                    layer.dropped.add("respawn")
                layer.build()
        for key, layer in layers.items():
            current[key] = layer.chain[-1]
            changes[key].extend({"round": round_number, **step} for step in layer.records())
    table = _measure_test(parts, views, current, lams)
    for key, sae in current.items():
        if sae is not views[key].sae:
            applied = sorted({c["step"] for c in changes[key] if c["applied"]})
            mark_modified(sae, f"repaired by opt_hooks (THEORY.md section 7): {', '.join(applied)}")
    return RepairResult(saes=current, table=table, changes=changes, audits=audits, meta=meta)


def _view(sae: Any, key: str, like: SAEView) -> SAEView:
    with warnings.catch_warnings():  # the original view already warned about this SAE's setup
        warnings.simplefilter("ignore")
        return SAEView(sae, hook_name=like.hook_name, lam=like.lam if like.lam_source == "argument" else None,
                       release=like.release, sae_id=like.sae_id,
                       hook_name_out=like.hook_name_out if like.is_transcoder else None)


class _LayerRepair:
    """One layer's round: its steps from the audit, the chain of SAEs they build, the decisions."""

    def __init__(self, key: str, view: SAEView, plan: AuditPlan, layer: LayerResult, ropts: RepairOptions) -> None:
        self.key, self.view, self.plan, self.layer, self.ropts = key, view, plan, layer, ropts
        self.lam = layer.lam
        self.steps = [s for s in (self._floor(), self._bias(), self._skip(), self._atoms(), self._codes()) if s is not None]
        candidates, dead = self._merges(), self._dead_to_resample()
        # why the respawn cannot be made in this class, said only where there was something to do
        self.merge_refusal = (refusal(view.sae, "merge") if candidates else None) or (
            refusal(view.sae, "plant") if candidates or dead else None)
        self.merges = [] if self.merge_refusal else candidates
        self.free = [] if self.merge_refusal else sorted({drop for _, drop, _ in self.merges} | set(dead))
        self.plants: list[dict[str, Any]] = []  # (feature, atom, beta, threshold, audit_gain) after _fit_plants
        self.dropped: set[str] = set()  # steps rejected on the validation part
        self.dropped_plants: set[int] = set()
        self.pruned = False  # the last decision pruned the respawn step's latents (not yet measured so)
        self.chain: list[Any] = []
        self.changes: dict[str, Any] = {}  # each step's latest measurement on the validation part
        self.made: dict[tuple, tuple[Any, Any]] = {}  # (id of an SAE, change) -> (that SAE, the SAE it made)

    # ---- steps from certified findings ------------------------------------------------------------
    def _certified(self, condition: str) -> tuple[list[int], list[Any]]:
        """(family indices, checks) of the certified certificates of one per-feature family. A signed
        SAE's tied C3 certificates are on the rows of the latent's signs that fire (its row d_sae + i
        for the negative one)."""
        family = self.plan.families.get(condition)
        if family is None:
            return [], []
        tied = condition == "C3" and self.layer.signed
        ks, checks = [], []
        for k, feature in enumerate(family.features.tolist()):
            rows = (feature, feature + self.layer.d_sae) if tied else (feature,)
            check = next((c for c in (self.layer.features[r].certificates.get(condition) for r in rows) if c), None)
            if check is not None and check.tier == "certified":
                ks.append(k)
                checks.append(check)
        return ks, checks

    def _item(self, feature: int, check: Any, *, tied: bool = False, **extra: Any) -> dict[str, Any]:
        """A step's item: the latent of the certificate's feature (the row `feature` of the layer's
        features) and, for one sign of a signed SAE's latent (not `tied`), that sign."""
        row = self.layer.features[feature]
        sign = {} if row.sign is None or tied else {"sign": row.sign}
        return {"feature": row.id, **sign, "step": check.step, "certified_gain": check.gain, "se": check.held_out_se,
                "p_value": check.p_value, **extra}

    def _floor(self) -> _Step | None:
        ks, checks = self._certified("C1")
        if not ks:
            return None
        family = self.plan.families["C1"]
        ids, amounts = family.features[ks].cpu(), family.step[ks].cpu()
        atoms = self.plan.atoms.double().cpu()

        def apply(edit: SAEEdit) -> None:
            edit.lower_codes(ids, amounts)  # first: it is the one a class may refuse
            edit.shift_bias((amounts[:, None] * atoms[ids]).sum(0))

        items = [self._item(int(i), c) for i, c in zip(ids.tolist(), checks)]
        return _Step("floor", "C1", apply, items)

    def _bias(self) -> _Step | None:
        c5 = self.layer.layer_conditions.get("C5", {})
        if c5.get("tier") != "certified":
            return None
        family = self.plan.families["C5"]
        delta = (float(family.step[0]) * family.direction.double()).cpu()
        check = c5["certificate"]
        item = {"step": check.step, "certified_gain": check.gain, "se": check.held_out_se, "p_value": check.p_value}
        return _Step("bias", "C5", lambda edit: edit.shift_bias(delta), [item])

    def _skip(self) -> _Step | None:
        c7 = self.layer.layer_conditions.get("C7", {})
        if c7.get("tier") != "certified":
            return None
        delta = self.plan.families["C7"].skip_change().cpu()
        check = c7["certificate"]
        item = {"step": check.step, "certified_gain": check.gain, "se": check.held_out_se, "p_value": check.p_value}
        return _Step("skip", "C7", lambda edit: edit.shift_skip(delta), [item])

    def _atoms(self) -> _Step | None:
        ks, checks = self._certified("C3")
        if not ks:
            return None
        family = self.plan.families["C3"]
        theta = family.step[ks].cpu()[:, None]
        ids = family.features[ks].cpu()
        new = torch.cos(theta) * family.atom[ks].double().cpu() + torch.sin(theta) * family.direction[ks].double().cpu()
        # a signed SAE's turns are tied: the decoder row of latent i, for both signs
        items = [self._item(int(i), c, tied=True) for i, c in zip(ids.tolist(), checks)]
        return _Step("atoms", "C3", lambda edit: edit.turn_atoms(ids, new), items)

    def _codes(self) -> _Step | None:
        ks, checks = self._certified("C4")
        if not ks:
            return None
        family = self.plan.families["C4"]
        ids, factors = family.features[ks].cpu(), 1 + family.step[ks].double().cpu()
        items = [self._item(int(i), c, factor=float(f)) for i, c, f in zip(ids.tolist(), checks, factors.tolist())]
        return _Step("codes", "C4", lambda edit: edit.scale_codes(ids, factors), items)

    def _merges(self) -> list[tuple[int, int, float]]:
        """(keep, drop, rho): the pair map's duplicates that fire together, each latent in one pair
        at most, the more active one kept, closest pairs first."""
        used: set[int] = set()
        merges = []
        for d in sorted(self.layer.duplicates, key=lambda d: -d.rho):
            if d.rho < self.ropts.merge_min_rho or d.jaccard < self.ropts.merge_min_jaccard or d.i in used or d.j in used:
                continue
            keep, drop = (d.i, d.j) if d.count_i >= d.count_j else (d.j, d.i)
            used.update((keep, drop))
            merges.append((keep, drop, d.rho))
        return merges

    def _dead_to_resample(self) -> list[int]:
        c6 = self.layer.layer_conditions.get("C6", {})
        return list(c6.get("dead", [])) if c6.get("tier") == "certified" else []

    # ---- the chain ----------------------------------------------------------------------------
    def _merge(self, edit: SAEEdit, planted: set[int] | None) -> None:
        """The merges (those freeing a latent in `planted`, unless None: all)."""
        for keep, drop, rho in self.merges:
            if planted is None or drop in planted:
                edit.merge(keep, drop, rho)

    def _plant(self, edit: SAEEdit) -> None:
        norm = median_alive_norm(self.view.sae)
        for p in self.plants:
            if p["feature"] not in self.dropped_plants:
                edit.plant(p["feature"], p["atom"], p["beta"], p["threshold"], norm)

    def merged_sae(self) -> Any:
        """The SAE after the kept exact steps and the merges: what planted latents are fitted on."""
        sae = self.view.sae
        for step in self.steps:
            sae = self._apply(step, sae)
        return self._apply_merges(sae, None)

    def _made(self, key: tuple, sae: Any, make: Callable[[SAEEdit], None]) -> Any:
        """The SAE `make` builds from `sae`, built once: every validation pass rebuilds the chain,
        and the versions whose steps did not change are the same SAEs (the key holds `sae` alive,
        so its id stays its own)."""
        key = (id(sae), *key)
        if key not in self.made:
            edit = SAEEdit(sae)
            make(edit)
            self.made[key] = (sae, edit.sae)
        return self.made[key][1]

    def _apply(self, step: _Step, sae: Any) -> Any:
        try:
            return self._made((step.name,), sae, step.apply)
        except NotExpressible as error:
            step.record = {"applied": False, "reason": str(error)}
            return sae

    def _apply_merges(self, sae: Any, planted: set[int] | None) -> Any:
        if not self.merges:
            return sae
        chosen = None if planted is None else frozenset(planted)
        return self._made(("merge", chosen), sae, lambda edit: self._merge(edit, planted))

    def build(self) -> None:
        """The chain: the SAE, then one version per kept step (each measured against the last kept
        version before it), then merged (diagnostic) and respawned versions."""
        self.chain, self.reference, self.names = [self.view.sae], [-1], ["base"]
        for step in self.steps:
            if step.name in self.dropped or step.record.get("reason"):
                continue
            sae = self._apply(step, self.chain[-1])
            if step.record.get("reason"):
                continue
            self.reference.append(len(self.chain) - 1)
            self.chain.append(sae)
            self.names.append(step.name)
        before_respawn = len(self.chain) - 1
        plants = [p for p in self.plants if p["feature"] not in self.dropped_plants]
        if "respawn" not in self.dropped and plants:  # merges only free latents for planting
            merged = self._apply_merges(self.chain[-1], {p["feature"] for p in plants})
            self.reference.append(before_respawn)
            self.chain.append(merged)
            self.names.append("merged")
            edit = SAEEdit(merged)
            self._plant(edit)
            self.reference.append(before_respawn)
            self.chain.append(edit.sae)
            self.names.append("respawn")
        self.sums = VariantSums(self.reference, self.view.d_sae, self.view.d_out)
        self.plant_sums = None
        if "respawn" in self.names:
            merged = self.chain[self.names.index("merged")]
            ids = [p["feature"] for p in plants]
            self.merged_view = _view(merged, self.key, self.view)
            self.respawn_view = _view(self.chain[-1], self.key, self.view)
            self.plant_ids = torch.tensor(ids, dtype=torch.long)
            self.plant_sums = LatentChanges(self.merged_view.atoms()[ids].cpu(), self.respawn_view.atoms()[ids].cpu())

    def decide(self, policy: pol.VerdictPolicy) -> bool:
        """Judge every step on the validation part; True when something was dropped (rebuild)."""
        sums, n = self.sums, self.sums.n_tokens
        tested = [name for name in self.names[1:] if name != "merged"]
        z = policy.critical_z(len(tested))
        est = pol.window_estimate(sums.parts["change"])
        dropped_any = self.pruned = False
        for v, name in enumerate(self.names):
            if v == 0:
                continue
            mean, se, p = float(est.mean[v]), float(est.se[v]), float(est.p_value[v])
            significant = n >= 2 and math.isfinite(se) and mean + z * se < 0
            self.changes[name] = {"gain": -mean, "se": se, "p_value": p, "n_tokens": n, "significant": significant}
            if name not in ("merged", "respawn") and not significant:
                self.dropped.add(name)
                dropped_any = True
        if "respawn" in self.names:
            # A step that holds as a whole keeps all its latents, rare ones included: a latent on 0.2% of
            # the tokens is a typical SAE feature, and such gains add up though each is too small to test
            # alone. One that does not hold is tried again with the latents that held up alone, if any.
            weak = self._weak_plants(policy)
            if not self.changes["respawn"]["significant"]:
                if len(weak) < len(self.plant_ids):
                    self.dropped_plants |= weak
                    self.pruned = True
                else:
                    self.dropped.add("respawn")
                dropped_any = True
        return dropped_any

    def _weak_plants(self, policy: pol.VerdictPolicy) -> set[int]:
        """Record each resampled latent's own validation change; the ones not significant alone
        (Bonferroni over the layer's resampled latents)."""
        est = pol.window_estimate(self.plant_sums.changes)
        z = policy.critical_z(len(self.plant_ids))
        weak = set()
        for k, feature in enumerate(self.plant_ids.tolist()):
            mean, se = float(est.mean[k]), float(est.se[k])
            record = next(p for p in self.plants if p["feature"] == feature)
            record.update(gain=-mean, se=se, p_value=float(est.p_value[k]))
            if not (math.isfinite(se) and mean + z * se < 0 and int(self.plant_sums.touched[k]) >= policy.min_touched):
                weak.add(feature)
        return weak

    def records(self) -> list[dict[str, Any]]:
        out = []
        for step in self.steps:
            measured = self.changes.get(step.name, {})
            applied = step.name in self.names
            reason = step.record.get("reason") or ("" if applied else "not significant on the validation tokens")
            out.append({"step": step.name, "condition": step.condition, "applied": applied, "reason": reason,
                        **{k: measured.get(k) for k in ("gain", "se", "p_value", "n_tokens")}, "items": step.items})
        if self.merges or self.plants or self.merge_refusal:
            measured = self.changes.get("respawn", {})
            applied = "respawn" in self.names
            planted = {p["feature"] for p in self.plants if p["feature"] not in self.dropped_plants}
            items = [{"keep": k, "drop": d, "rho": r, "kept": applied and d in planted} for k, d, r in self.merges]
            items += [{"feature": p["feature"], "threshold": p["threshold"], "scale": p["beta"],
                       "audit_gain": p["audit_gain"], "gain": p.get("gain"), "se": p.get("se"),
                       "kept": applied and p["feature"] not in self.dropped_plants} for p in self.plants]
            reason = self.merge_refusal or ("" if applied else (
                "no resampled latent lowered L on the audit tokens" if not self.plants
                else "not significant on the validation tokens"))
            merged = self.changes.get("merged", {})
            out.append({"step": "respawn", "condition": "duplicates + C6", "applied": applied, "reason": reason,
                        **{k: measured.get(k) for k in ("gain", "se", "p_value", "n_tokens")},
                        "merge_only_gain": merged.get("gain"), "merge_only_se": merged.get("se"), "items": items})
        return out


# -- the passes -----------------------------------------------------------------------------------


@torch.no_grad()
def sae_objective(sae: Any, rows: Any, lam: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per token, with the SAE's own encode and decode on its input rows (n, d_in): (loss, squared error
    summed over the input dimensions, L1 term sum_i |f_i| ||W_dec[i]||, L0), and (K,) bool of the latents
    that fired. loss = squared error + lam * L1 (lam None: the squared error alone). A transcoder's rows
    are (inputs, targets): its own decode plus its skip W_skip x (what its forward computes, the codes
    encoded once) is compared with the targets."""
    if isinstance(rows, tuple):
        rows, target = rows
        codes = sae.encode(rows)
        out = sae.decode(codes)
        if hasattr(sae, "W_skip"):  # as a SkipTranscoder's forward: its skip reads the raw input
            out = out + rows @ sae.W_skip.T
    else:
        sae_in = rows[:, None, :] if sae.hook_z_reshaping_mode else rows
        codes = sae.encode(sae_in)
        if codes.is_sparse:
            codes = codes.to_dense()
        out, target = sae.decode(codes).reshape(len(rows), -1), rows
    codes = codes.reshape(len(rows), -1)
    mse = ((out.double() - target.double()) ** 2).sum(-1)
    scaled = codes.double() if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else \
        codes.double() * sae.W_dec.detach().double().norm(dim=1)
    l1 = scaled.abs().sum(-1)  # |f|: an AbsTopK SAE's codes keep their sign
    loss = mse + (0.0 if lam is None else lam) * l1
    return loss, mse, l1, (codes != 0).sum(-1), (codes != 0).any(0)


def _add_variants(sums: VariantSums, saes: list[Any], rows: Tensor, windows: Tensor, lam: float | None) -> None:
    parts = [sae_objective(sae, rows, lam) for sae in saes]
    loss, mse, l1, l0 = (torch.stack([p[i] for p in parts], 1) for i in range(4))
    sums.update(loss, mse, l1, l0, torch.stack([p[4] for p in parts]), _targets(rows), windows)


def _fit_plants(parts: Any, layers: dict[str, _LayerRepair]) -> None:
    """Fit every layer's resampled latents on the audit tokens: candidate atoms from the audit's worst
    residuals, each one's threshold and scale by `PlantFit` on the SAE after the exact steps and merges."""
    wanted = {key: layer for key, layer in layers.items() if layer.free and layer.lam is not None}
    if not wanted:
        return
    fits: dict[str, tuple[SAEView, Tensor, PlantFit | None]] = {}
    for key, layer in wanted.items():
        view = _view(layer.merged_sae(), key, layer.view)
        fits[key] = (view, _candidate_atoms(layer), None)
    for batch in parts.rows("audit", {key: layers[key].view for key in wanted}):
        for key, (rows, _) in batch.items():
            view, atoms, fit = fits[key]
            x, z, w = view.encode(rows)
            bias = view.bias()
            if fit is None:  # thresholds from the first batch's projections
                p = ((x.double() - bias.double()) @ atoms.to(x.device).T)
                q = torch.tensor(layers[key].ropts.plant_quantiles, dtype=torch.float64, device=p.device)
                fit = PlantFit(atoms.to(x.device), torch.quantile(p, q, dim=0).T.contiguous())
                fits[key] = (view, atoms, fit)
            fit.update(x, x - bias - z @ view.atoms(), bias, w)
    for key, (view, atoms, fit) in fits.items():
        layer = layers[key]
        if fit is None:
            continue
        threshold, beta, gain = fit.best(layer.lam)
        order = torch.argsort(gain, descending=True, stable=True)
        good = [r for r in order.tolist() if float(gain[r]) > 0][: len(layer.free)]
        layer.plants = [{"feature": f, "atom": atoms[r].cpu(), "beta": float(beta[r]), "threshold": float(threshold[r]),
                         "audit_gain": float(gain[r]) / max(int(layer.plan.stats.n_tokens), 1)}
                        for f, r in zip(layer.free, good)]


def _candidate_atoms(layer: _LayerRepair) -> Tensor:
    """Directions of the audit's worst residuals, worst first, each at most `plant_max_cos` from the
    ones before it (cosine), as many as there are free latents (up to `max_planted`)."""
    stats = layer.plan.stats
    residuals = stats.worst_residual[stats.worst_rnorm > 0].double().cpu()
    directions = residuals / residuals.norm(dim=1, keepdim=True)
    chosen: list[Tensor] = []
    limit = min(4 * len(layer.free), layer.ropts.max_planted)  # a pool: the best of them are planted
    for direction in directions:
        if len(chosen) >= limit:
            break
        if not chosen or float((torch.stack(chosen) @ direction).abs().max()) <= layer.ropts.plant_max_cos:
            chosen.append(direction)
    return torch.stack(chosen) if chosen else torch.zeros(0, directions.shape[1], dtype=torch.float64)


def _validate(parts: Any, layers: dict[str, _LayerRepair]) -> None:
    """One pass over the validation tokens: every chain version's objective, and each planted latent's
    own change."""
    for batch in parts.rows("validation", {key: layer.view for key, layer in layers.items()}):
        for key, (rows, windows) in batch.items():
            layer = layers[key]
            _add_variants(layer.sums, layer.chain, rows, windows, layer.lam)
            if layer.plant_sums is not None:
                x, z_old, w = layer.merged_view.encode(rows)
                _, z_new, _ = layer.respawn_view.encode(rows)
                r = x - layer.merged_view.bias() - z_old @ layer.merged_view.atoms()
                ids = layer.plant_ids.to(z_old.device)
                layer.plant_sums.update(r, z_old[:, ids], z_new[:, ids], w, layer.lam or 0.0, windows)


def _measure_test(parts: Any, views: dict[str, SAEView], repaired: dict[str, Any], lams: Any) -> dict[str, dict[str, Any]]:
    """Before / after on the test tokens, with the SAEs' own encode / decode."""
    sums = {key: VariantSums([-1, 0], view.d_sae, view.d_out) for key, view in views.items()}
    for batch in parts.rows("test", views):
        for key, (rows, windows) in batch.items():
            _add_variants(sums[key], [views[key].sae, repaired[key]], rows, windows, lams.get(key))
    return {key: _table(s, lams.get(key)) for key, s in sums.items()}


def _table(sums: VariantSums, lam: float | None) -> dict[str, Any]:
    n = sums.n_tokens
    spread = sums.spread()
    estimates = {part: pol.window_estimate(sums.parts[part]) for part in VariantSums.PARTS}
    sides = {}
    for v, side in enumerate(("before", "after")):
        row: dict[str, Any] = {}
        for part in ("loss", "mse", "l1", "l0"):
            key = "L" if part == "loss" else part
            row[key], row[f"{key}_se"] = finite_or_none(estimates[part].mean[v]), finite_or_none(estimates[part].se[v])
        if lam is None:
            row["l1"] = row["l1_se"] = None
        else:
            row["l1"], row["l1_se"] = (None if row[k] is None else lam * row[k] for k in ("l1", "l1_se"))
        row["explained_variance"] = 1 - float(sums.parts["mse"].total[v]) / spread if spread > 0 else None
        row["dead"] = int((sums.fired[v] == 0).sum())
        sides[side] = row
    change = estimates["change"]
    return {**sides, "change": {"L": finite_or_none(change.mean[1]), "se": finite_or_none(change.se[1]),
                                "p_value": finite_or_none(change.p_value[1])},
            "n_tokens": n, "n_windows": int(sums.parts["loss"].n_windows), "lam": lam,
            "objective": "mse + lam * l1" if lam is not None else "mse (no lam)"}

