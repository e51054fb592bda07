"""Reading activations out of TransformerLens models through their HookPoints only.

Supported models: HookedTransformer, sae_lens' HookedSAETransformer and TransformerBridge
(also sae_lens' SAETransformerBridge). Nothing is monkeypatched: `ActivationTap` adds forward
hooks with `HookPoint.add_hook` and removes exactly those on exit.

SAEs spliced into the model with `model.add_sae(sae)` are read where sae_lens runs them:
the SAE's input at `<hook>.hook_sae_input` and its codes at `<hook>.hook_sae_acts_post`, so
the SAE is not run a second time (`CodeTap`).

Transcoders read two hooks: x at `hook_name`, then y at `hook_name_out`, later in the same
forward pass. A spliced transcoder replaces its output hook with sae_lens' own module, whose
input is y before the transcoder's prediction takes its place: that module gets a forward
pre-hook (attached and removed like the HookPoint hooks), and x and the codes are read at
`<hook_name_out>.hook_sae_input` / `.hook_sae_acts_post`.
"""
from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint, LensHandle

from opt_hooks.adapters.sae import PURSUIT_ARCHITECTURES, SAEView

OnBatch = Callable[[str, torch.Tensor], None]
# (key, x, z, w, inputs): theory units (see SAEView.units)
OnCodes = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]

# TransformerBridge refuses stop_at_layer on models whose blocks live under these names.
_BRIDGE_BLOCK_LISTS_WITHOUT_STOP = ("L_blocks", "H_blocks", "encoder_blocks", "decoder_blocks")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model wants its input tokens (cfg.device, else its first parameter's device)."""
    device = getattr(getattr(model, "cfg", None), "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def model_name(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "cfg", None), "model_name", None)


def hook_point(model: torch.nn.Module, name: str) -> HookPoint:
    """The HookPoint called `name`, aliases included (TransformerBridge), or a clear error."""
    hooks = getattr(model, "hook_dict", None)
    if hooks is None:
        raise TypeError(
            f"{type(model).__name__} has no HookPoints: pass a HookedTransformer, a "
            "HookedSAETransformer or a TransformerBridge"
        )
    found = hooks.get(name)
    if found is None and hasattr(model, "get_hook_point"):
        # TransformerBridge resolves aliases (blocks.0.hook_resid_pre -> blocks.0.hook_in) here
        # even where hook_dict leaves them out (SAETransformerBridge once an SAE is spliced in).
        found = model.get_hook_point(name)
    if isinstance(found, HookPoint):
        return found
    spliced = spliced_saes(model)
    if name in spliced:
        sae_input = spliced_hook_name(model, name, spliced[name], "hook_sae_input")
        hint = f"an SAE is spliced in there; its input is {sae_input!r}"
    else:
        close = difflib.get_close_matches(name, list(hooks), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "see model.hook_dict for the hook names"
    raise ValueError(f"{name!r} is not a hook point of {model_name(model) or type(model).__name__}; {hint}")


def spliced_saes(model: torch.nn.Module) -> dict[str, Any]:
    """{hook_name: SAE} spliced in with model.add_sae (HookedSAETransformer, SAETransformerBridge)."""
    return dict(getattr(model, "acts_to_saes", None) or {})


def spliced_hook_name(model: torch.nn.Module, hook_name: str, sae: Any, internal: str) -> str:
    """Name of a spliced SAE's own HookPoint, e.g. 'blocks.0.hook_resid_pre.hook_sae_acts_post'; a
    spliced transcoder's live at its output hook ('blocks.0.hook_mlp_out.hook_sae_acts_post')."""
    if hasattr(model, "get_sae_hook_name"):  # SAETransformerBridge files them under the canonical name
        return model.get_sae_hook_name(sae, internal)
    return f"{_output_hook(sae) or hook_name}.{internal}"


def _output_hook(sae: Any) -> str | None:
    """A transcoder's output hook (where sae_lens splices it), None for an SAE."""
    out = sae.cfg.metadata.hook_name_out
    return out if out and out != sae.cfg.metadata.hook_name else None


def spliced_wrappers(model: torch.nn.Module, views: Mapping[str, SAEView]) -> dict[str, torch.nn.Module]:
    """{key: the module sae_lens put at the output hook} for every transcoder spliced into the model:
    that module's input is the output hook's activations y, before the transcoder replaces them."""
    keys = {id(view.sae): key for key, view in views.items() if view.is_transcoder}
    spliced = {id(sae) for sae in spliced_saes(model).values()}
    return {keys[id(module.sae)]: module for module in model.modules()
            if id(getattr(module, "sae", None)) in keys and id(module.sae) in spliced}


class ActivationTap:
    """Context manager: calls `on_batch(hook_name, activations)` at the named hook points.

    It fires during every forward pass inside the block (run_with_hooks, generate, the user's
    own loops). Its hooks are permanent so that a `model.reset_hooks()` inside the block does
    not silently end the tap; on exit exactly these hooks are removed, every other hook stays
    as it was. The tap sees the value after the hooks registered before it.
    """

    def __init__(self, model: torch.nn.Module, hook_names: Iterable[str], on_batch: OnBatch):
        self.model = model
        self.hook_names = list(dict.fromkeys(hook_names))
        self.on_batch = on_batch
        self._added: list[tuple[HookPoint, LensHandle]] = []

    def __enter__(self) -> ActivationTap:
        points = [(name, hook_point(self.model, name)) for name in self.hook_names]
        try:
            for name, point in points:
                point.add_hook(self._hook_for(name), dir="fwd", is_permanent=True)
                self._added.append((point, point.fwd_hooks[-1]))  # add_hook appends its handle
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()

    def _hook_for(self, name: str) -> Callable[..., None]:
        def tap(activations: torch.Tensor, hook: HookPoint) -> None:
            self.on_batch(name, activations.detach())

        return tap

    def _remove(self) -> None:
        for point, handle in reversed(self._added):
            handle.hook.remove()
            for i, candidate in enumerate(point.fwd_hooks):
                if candidate is handle:
                    del point.fwd_hooks[i]
                    break
        self._added.clear()


def sae_routes(model: torch.nn.Module, views: Mapping[str, SAEView]) -> dict[str, list[tuple[str, str]]]:
    """{tapped hook name: [(view key, role), ...]}, in the order the roles must be read.

    An SAE spliced into the model is read at its own hook_sae_input ("input") and
    hook_sae_acts_post ("codes"); a spliced transcoder at its hook_sae_input ("source") and
    hook_sae_acts_post ("spliced codes"), its target y at the module sae_lens put at its output
    hook (`spliced_wrappers`). Otherwise the hook's activations are read where they flow: at the
    hook itself, or, where another SAE is spliced, at that SAE's hook_sae_input. An SAE reads them
    as "acts"; a transcoder reads its input hook as "source" and its output hook as "target" (that
    fires later in the same forward pass)."""
    routes: dict[str, list[tuple[str, str]]] = {}
    spliced = spliced_saes(model)
    replaced = {_output_hook(sae): sae for sae in spliced.values() if _output_hook(sae)}

    def carrying(hook_name: str, key: str) -> str:
        if hook_name in replaced:
            raise ValueError(
                f"{key}: a transcoder spliced into the model replaces the activations at {hook_name!r} with its "
                "own prediction, so the model no longer shows them; audit this one beside the model without "
                "that transcoder spliced in (model.reset_saes())"
            )
        other = spliced.get(hook_name)
        if other is None or _output_hook(other):  # a transcoder leaves its input hook as it was
            return hook_name
        return spliced_hook_name(model, hook_name, other, "hook_sae_input")

    for key, view in views.items():
        own_splice = next((hook for hook, sae in spliced.items() if sae is view.sae), None)
        if own_splice is not None and view.is_transcoder:
            routes.setdefault(spliced_hook_name(model, own_splice, view.sae, "hook_sae_input"), []).append((key, "source"))
            routes.setdefault(spliced_hook_name(model, own_splice, view.sae, "hook_sae_acts_post"), []).append(
                (key, "spliced codes"))
        elif own_splice is not None:
            if view.architecture in PURSUIT_ARCHITECTURES:
                raise ValueError(
                    f"{key}: a matching-pursuit SAE spliced into the model computes its codes without "
                    "hook_sae_acts_post (its pursuit runs no hook), so its codes cannot be read where it runs; "
                    "audit it beside the model instead: model.reset_saes(), then oh.audit(model, sae, ...) reads "
                    f"{own_splice!r} and encodes it once"
                )
            routes.setdefault(spliced_hook_name(model, own_splice, view.sae, "hook_sae_input"), []).append((key, "input"))
            routes.setdefault(spliced_hook_name(model, own_splice, view.sae, "hook_sae_acts_post"), []).append((key, "codes"))
        elif view.is_transcoder:
            routes.setdefault(carrying(view.hook_name, key), []).append((key, "source"))
            routes.setdefault(carrying(view.hook_name_out, key), []).append((key, "target"))
        else:
            routes.setdefault(carrying(view.hook_name, key), []).append((key, "acts"))
    return routes


class _TargetTap:
    """Forward pre-hooks on the modules of spliced transcoders (`spliced_wrappers`): each one's input,
    the output hook's activations, goes to `on_target(key, y)`. Removed on exit."""

    def __init__(self, model: torch.nn.Module, views: Mapping[str, SAEView],
                 on_target: Callable[[str, torch.Tensor], None]) -> None:
        self.wrappers, self.on_target = spliced_wrappers(model, views), on_target
        self._handles: list[Any] = []

    def __enter__(self) -> "_TargetTap":
        for key, wrapper in self.wrappers.items():
            hook = lambda module, args, key=key: self.on_target(key, args[0].detach())  # noqa: E731
            self._handles.append(wrapper.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Taps:
    """A tap that reads SAEs along `routes` (`sae_routes`): its HookPoint hooks (an ActivationTap
    calling the subclass's `_dispatch(tapped_name, activations)`) and the pre-hooks on spliced transcoders' modules, attached together,
    removed together, with what one forward pass leaves pending between two hooks: a spliced SAE's
    or a transcoder's input, a spliced transcoder's target (read before its input)."""

    def __init__(self, model: torch.nn.Module, views: Mapping[str, SAEView],
                 routes: dict[str, list[tuple[str, str]]]) -> None:
        self.views, self._routes = dict(views), routes
        self._pending_input: dict[str, Any] = {}
        self._pending_target: dict[str, torch.Tensor] = {}
        self.model = model
        self._tap: ActivationTap | None = None  # while attached: it holds self._dispatch
        self._targets = _TargetTap(model, views, self._pending_target.__setitem__)

    @property
    def hook_names(self) -> list[str]:
        """The hook points actually tapped (pass these to `forward_to_deepest`)."""
        return list(self._routes)

    def __enter__(self):
        self._targets.__enter__()
        try:
            self._tap = ActivationTap(self.model, self._routes, self._dispatch).__enter__()
        except BaseException:
            self._targets.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._pending_input.clear()
        self._pending_target.clear()
        if self._tap is not None:
            self._tap.__exit__(*exc_info)
        # The tap holds this object's bound _dispatch: kept after the block, that reference cycle held
        # every view, statistic and plan of a finished audit until a full garbage collection (about
        # 2 GB per audit at Gemma-2-2B widths; each later audit in the same process ran slower)
        self._tap = None
        self._targets.__exit__(*exc_info)


class CodeTap(_Taps):
    """Context manager: calls `on_codes(key, x, z, w, inputs)` (theory units, see SAEView.units)
    for every SAE and transcoder.

    `views` maps hook names to SAEViews (see `opt_hooks.adapters.sae.make_views`). An SAE that is
    spliced into the model is read at its own hook_sae_input / hook_sae_acts_post; if another
    SAE is spliced at the hook, the activations are read at that SAE's hook_sae_input (they
    are the hook's activations) and encoded; otherwise the hook itself is tapped and encoded.
    A transcoder's input is kept until its output hook fires, then both are encoded.
    """

    def __init__(self, model: torch.nn.Module, views: Mapping[str, SAEView], on_codes: OnCodes):
        super().__init__(model, views, sae_routes(model, views))
        self.on_codes = on_codes

    def _dispatch(self, tapped_name: str, activations: torch.Tensor) -> None:
        for key, role in self._routes[tapped_name]:
            view = self.views[key]
            if role == "acts":
                self.on_codes(key, *view.units(activations))
            elif role == "source":  # a transcoder's input hook fires before its output hook
                self._pending_input[key] = activations
            elif role == "target":
                if key not in self._pending_input:
                    raise RuntimeError(
                        f"{key}: the transcoder's output hook {view.hook_name_out!r} fired before its input hook "
                        f"{view.hook_name!r}; hook_name_out must come later in the forward pass"
                    )
                self.on_codes(key, *view.units(self._pending_input.pop(key), activations))
            elif role == "spliced codes":  # sae_lens ran the transcoder on the input it captured
                x, y = self._pending_input.pop(key), self._pending_target.pop(key)
                self.on_codes(key, *view.units(x, y, feature_acts=activations))
            elif role == "input":  # hook_sae_input fires first, then hook_sae_acts_post
                self._pending_input[key] = view.internal_input(activations)
            else:
                x, w = self._pending_input.pop(key)
                self.on_codes(key, x, view.codes(activations), w, None)


class InputTap(_Taps):
    """Context manager: calls `on_rows(key, rows)` with each SAE's input rows (n, d_in), read where
    `CodeTap` reads them (a spliced SAE's own hook_sae_input, else the hook), before any
    normalisation: what `sae.encode` takes; for a transcoder, rows is the pair (inputs (n, d_in),
    targets (n, d_out)) of its two hooks. The repair runs several versions of an SAE on them."""

    def __init__(self, model: torch.nn.Module, views: Mapping[str, SAEView],
                 on_rows: Callable[[str, Any], None]):
        wanted = ("acts", "input", "source", "target")  # a spliced transcoder's codes are not needed
        routes = {name: [(key, role) for key, role in pairs if role in wanted]
                  for name, pairs in sae_routes(model, views).items()}
        super().__init__(model, views, {name: pairs for name, pairs in routes.items() if pairs})
        self.on_rows = on_rows

    def _dispatch(self, tapped_name: str, activations: torch.Tensor) -> None:
        for key, role in self._routes[tapped_name]:
            view = self.views[key]
            if role == "source" and key in self._pending_target:  # a spliced transcoder: y came first
                rows = view.rows(activations)
                self.on_rows(key, (rows, view.rows_out(self._pending_target.pop(key), len(rows))))
            elif role == "source":
                self._pending_input[key] = view.rows(activations)
            elif role == "target":
                rows = self._pending_input.pop(key)
                self.on_rows(key, (rows, view.rows_out(activations, len(rows))))
            else:
                self.on_rows(key, view.rows(activations))


def stop_layer(hook_names: Iterable[str]) -> int | None:
    """The `stop_at_layer` that still runs every named hook, None if one is outside the blocks."""
    layers = [_block_index(name) for name in hook_names]
    if not layers or any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # stop_at_layer is exclusive: blocks 0 .. stop - 1 run


@torch.no_grad()
def forward_to_deepest(model: torch.nn.Module, tokens: torch.Tensor, hook_names: Iterable[str]) -> None:
    """One forward pass of `tokens`, stopped after the deepest hooked block where possible.

    HookedTransformer (and HookedSAETransformer) honour `stop_at_layer`. TransformerBridge
    honours it on decoder models whose blocks are `blocks` (it raises for other block lists,
    and encoder models such as BERT run to the end); otherwise the pass is a full one.
    Hooks outside the blocks (embeddings, ln_final, unembed) also need a full pass.
    """
    tokens = tokens.to(model_device(model))
    stop = stop_layer(hook_names)
    try:
        if stop is not None and _supports_stop_at_layer(model):
            model(tokens, stop_at_layer=stop, return_type=None)
        else:
            model(tokens, return_type=None)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        explained = explain_out_of_memory(error, tokens)
        if explained is None:
            raise
        raise explained from error


def explain_out_of_memory(error: RuntimeError, tokens: torch.Tensor) -> torch.OutOfMemoryError | None:
    """An OutOfMemoryError that says what to change, for an out-of-memory error raised by the
    forward pass of `tokens` (the model and every SAE's encode); None for any other error."""
    message = str(error)
    # CUDA and MPS say "out of memory"; the CPU allocator says "can't allocate memory".
    if not isinstance(error, torch.OutOfMemoryError) and not any(
        words in message for words in ("out of memory", "can't allocate memory")
    ):
        return None
    n_windows, context = tokens.shape[0], tokens.shape[-1]
    return torch.OutOfMemoryError(
        f"out of memory on {tokens.device} in the forward pass of {n_windows} windows x {context} tokens "
        "(model and SAE encoders). Lower batch_size (CLI: --batch-size) to fit it, or context_size, "
        f"or audit fewer SAEs at a time. The error was: {message.splitlines()[0] if message else type(error).__name__}"
    )


def check_attachment(
    model: torch.nn.Module, views: Mapping[str, SAEView], *, allow_model_mismatch: bool = False
) -> None:
    """Fail early and clearly: unknown hook names, SAE widths that differ from the hook's width
    (one-token probe through the same code path as the audit), and SAEs trained on another
    model (a warning, silenced by allow_model_mismatch=True)."""
    if not allow_model_mismatch:
        name = model_name(model)
        for key, view in views.items():
            if view.model_name and name and not _same_model(view.model_name, name):
                warnings.warn(
                    f"{key}: the SAE was trained on {view.model_name!r} but the model is {name!r}; "
                    "pass allow_model_mismatch=True if this is intended",
                    UserWarning,
                    stacklevel=2,
                )
    tap = CodeTap(model, views, on_codes=lambda key, x, z, w, inputs: None)
    probe = torch.zeros((1, 1), dtype=torch.long)
    with tap:
        forward_to_deepest(model, probe, tap.hook_names)


def _block_index(hook_name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None


def _supports_stop_at_layer(model: torch.nn.Module) -> bool:
    if isinstance(model, HookedTransformer):
        return True
    return hasattr(model, "blocks") and not any(hasattr(model, name) for name in _BRIDGE_BLOCK_LISTS_WITHOUT_STOP)


def _same_model(a: str, b: str) -> bool:
    """Names of one model: TransformerLens aliases ('gpt2-small' = 'gpt2') and hub paths
    ('openai-community/gpt2' = 'gpt2') compare equal."""
    return _canonical_model_name(a) == _canonical_model_name(b)


def _canonical_model_name(name: str) -> str:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        name = get_official_model_name(name)
    except ValueError:
        pass
    return name.rsplit("/", 1)[-1].lower()
