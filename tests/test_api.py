"""Acceptance tests of the public API (audit, audit_activations, monitor), end to end, offline.

The SAEs are trained with sae_lens' own training step (tests/sae_training.py) on activations of
the model they are audited on. The statistics are checked against a brute-force recomputation
that follows THEORY.md directly: activations from `run_with_cache`, codes from `sae.encode`,
everything else in float64 on dense tensors.
"""
from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

import opt_hooks as oh
from opt_hooks.adapters.data import token_windows
from opt_hooks.adapters.sae import SAEView
from opt_hooks.engine import LayerAudit
from opt_hooks.records import LayerResult
from sae_training import TRAINING_KINDS, assert_layers_match, to_inference, train_sae

HOOK1, HOOK2 = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"
CONTEXT, BATCH, HELD_OUT = 16, 4, 0.25
N_WINDOWS = 24
PAIR_REL_TOL = 1e-6  # AuditOptions.pair_rel_tol, the default


def random_tokens(rows: int, seed: int, context: int = CONTEXT) -> Tensor:
    return torch.randint(0, 64, (rows, context), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached(model, tokens: Tensor, hook: str) -> Tensor:
    return model.run_with_cache(tokens, names_filter=hook)[1][hook]


def audit_tokens(model, saes, windows: Tensor, **kwargs) -> oh.AuditResult:
    return oh.audit(model, saes, windows, n_tokens=windows.numel(), batch_size=BATCH, context_size=CONTEXT,
                    held_out=HELD_OUT, progress=False, **kwargs)


@pytest.fixture(scope="module")
def windows() -> Tensor:
    return random_tokens(N_WINDOWS, seed=1)


@pytest.fixture(scope="module")
def sae1(tiny_model):
    """A standard L1 SAE on layer 1 with a planted child: feature 1 copies feature 0's encoder
    behind a higher threshold, so it fires only where feature 0 does (a hierarchy for C2)."""
    sae = train_sae("standard", cached(tiny_model, random_tokens(64, seed=2), HOOK1), hook_name=HOOK1,
                    model_name="tiny-test-model")
    with torch.no_grad():
        sae.W_enc[:, 1] = sae.W_enc[:, 0]
        sae.b_enc[1] = sae.b_enc[0] - 0.3
    return sae


@pytest.fixture(scope="module")
def sae2(tiny_model):
    return train_sae("standard", cached(tiny_model, random_tokens(64, seed=3), HOOK2), hook_name=HOOK2,
                     model_name="tiny-test-model")


# ---- brute force ---------------------------------------------------------------------------


def held_out_windows(n_windows: int, share: float) -> Tensor:
    """The documented rule: window w is held out when floor((w + 1) h) > floor(w h)."""
    return torch.tensor([math.floor((w + 1) * share) > math.floor(w * share) for w in range(n_windows)])


@dataclass
class Batch:
    acts: Tensor  # (n, d) hook activations, one row per token of the forward pass
    token: Tensor  # (n,) global token index
    keep: Tensor  # (n,) False for special tokens


def audit_batches(model, windows: Tensor, hook: str, specials: Tensor | None = None) -> Iterator[Batch]:
    """Pass 1 of `oh.audit` redone by hand: the audit windows in the same batches (so that the
    forward passes compute the same activations bit for bit), through run_with_cache."""
    context = windows.shape[1]
    for rows in torch.nonzero(~held_out_windows(len(windows), HELD_OUT)).flatten().split(BATCH):
        acts = cached(model, windows[rows], hook)
        token = rows[:, None] * context + torch.arange(context)
        keep = torch.ones_like(token, dtype=torch.bool) if specials is None else ~specials[rows]
        yield Batch(acts.reshape(-1, acts.shape[-1]), token.flatten(), keep.flatten())


@dataclass
class Expected:
    """THEORY.md's quantities on the audit tokens, from dense float64 tensors."""

    z: Tensor
    r: Tensor
    token: Tensor
    atoms: Tensor

    @property
    def n(self) -> int:
        return len(self.z)

    @property
    def mu(self) -> Tensor:
        return self.z.mean(0)

    @property
    def q(self) -> Tensor:
        return self.r @ self.atoms.T

    def lam_estimate(self) -> float:
        return 2 * float(self.q[self.z > 0].median())

    def dead_features(self) -> list[int]:
        """Latents that never fire."""
        return torch.nonzero((self.z > 0).sum(0) == 0).flatten().tolist()

    def c3_size(self) -> Tensor:
        mean_zr = self.z.T @ self.r / self.n
        g = mean_zr - (mean_zr * self.atoms).sum(-1, keepdim=True) * self.atoms
        scale = (self.z * self.r.norm(dim=-1, keepdim=True)).sum(0) / self.n
        return torch.where(scale > 0, g.norm(dim=-1) / scale, 0.0)

    def c4_gain(self, lam: float) -> Tensor:
        slack = 2 * self.q - lam
        return torch.where(self.z > 0, slack.abs(), slack.clamp(min=0)).sum(0) / self.n

    def pairs(self, rel_tol: float = PAIR_REL_TOL) -> dict[tuple[int, int], tuple[str, float]]:
        """{(i, j): (kind, bound)} for every ordered pair breaking C2, by its definition."""
        z, mu, rho = self.z, self.mu, self.atoms @ self.atoms.T
        n_features = z.shape[1]
        found = {}
        for i in range(n_features):
            off = z[:, i] == 0
            if not off.any():
                continue
            upper, lower = z[off].max(0).values, z[off].min(0).values  # over j, on the tokens A_i
            threshold, tol = (1 - rho[i]) * mu, rel_tol * mu
            eligible = (torch.arange(n_features) != i) & (mu > 0) & (rho[i].abs() < 1)
            for kind, bound, broken in (
                ("hierarchy", upper, upper < threshold - tol),
                ("complementary", lower, lower > threshold + tol),
            ):
                for j in torch.nonzero(eligible & broken).flatten().tolist():
                    found[(i, j)] = (kind, float(bound[j]))
        return found


@torch.no_grad()
def brute_force(sae, batches: Iterable[Batch], encode=None) -> Expected:
    """Codes z = sae.encode * ||W_dec|| (sae.encode where the SAE decodes f / ||W_dec|| times W_dec,
    `rescale_acts_by_decoder_norm`) and residuals r = x - b_dec - z @ atoms of the kept tokens, in
    float64, each batch encoded whole as the audit does. `encode` replaces the mapping acts -> (x, z)
    for SAEs whose codes are not that (SAEView.encode). An AbsTopK SAE's signed codes are the
    nonnegative codes [relu(z), relu(-z)] of the doubled dictionary [d; -d] (THEORY.md section 9)."""
    norms = sae.W_dec.double().norm(dim=1)
    atoms, bias = sae.W_dec.double() / norms[:, None], sae.b_dec.double()
    units = 1.0 if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else norms
    signed = sae.cfg.architecture() == "abstopk"
    if signed:
        atoms = torch.cat([atoms, -atoms])
    zs, rs, tokens = [], [], []
    for batch in batches:
        if encode is None:
            x = batch.acts.double()
            z = sae.encode(x.to(sae.W_dec.dtype)).double() * units
            z = torch.cat([z.clamp(min=0), (-z).clamp(min=0)], 1) if signed else z
        else:
            x, z, *_ = encode(batch.acts)
        x, z = x[batch.keep], z[batch.keep]
        zs.append(z)
        rs.append(x - bias - z @ atoms)
        tokens.append(batch.token[batch.keep])
    return Expected(torch.cat(zs), torch.cat(rs), torch.cat(tokens), atoms)


def assert_matches_brute_force(layer: LayerResult, expected: Expected) -> None:
    z, n = expected.z, expected.n
    features = layer.features
    assert layer.n_tokens == n
    assert [f.active_count for f in features] == (z > 0).sum(0).tolist()
    assert [f.max_code for f in features] == z.max(0).values.tolist()
    assert [f.min_code for f in features] == z.min(0).values.tolist()
    close = lambda got, want, rtol=1e-9: torch.testing.assert_close(  # noqa: E731
        torch.tensor(got, dtype=torch.float64), want, rtol=rtol, atol=1e-12)
    close([f.mean_code for f in features], expected.mu, rtol=1e-12)
    close([f.c3_size for f in features], expected.c3_size())
    alive = (z > 0).any(0)  # C4 is evaluated on features active somewhere, dead ones are C6's
    assert [f.c4_gain is None for f in features] == (~alive).tolist()
    close([f.c4_gain for f in features if f.c4_gain is not None], expected.c4_gain(layer.lam)[alive])
    # features by their row (their id, or for a signed SAE latent id + d_sae for its negative sign)
    assert {k for k, f in enumerate(features) if "C1" in f.conditions} == set(torch.nonzero(z.min(0).values > 0).flatten().tolist())
    assert layer.dead_features == expected.dead_features()

    mean_r, rnorm = expected.r.mean(0), expected.r.norm(dim=-1)
    c5, c6 = layer.layer_conditions["C5"], layer.layer_conditions["C6"]
    close([c5["norm"], c5["size"]], torch.stack([mean_r.norm(), mean_r.norm() / rnorm.mean()]))
    by_token = torch.argsort(expected.token)
    worst = by_token[torch.argsort(rnorm[by_token], descending=True, stable=True)][: len(c6["worst_tokens"])]
    assert c6["worst_tokens"] == expected.token[worst].tolist()  # ties: ascending token index
    close(c6["worst_rnorms"], rnorm[worst])
    assert c6["n_over_threshold"] == int((rnorm > layer.lam / 2).sum())

    # C2 violations between near-duplicate latents are the pair map's duplicates, not pairs
    duplicate_rho = oh.AuditOptions().pair_map.duplicate_rho
    pairs, duplicates = {}, set()
    for (i, j), violation in expected.pairs().items():
        if float(expected.atoms[i] @ expected.atoms[j]) >= duplicate_rho:
            duplicates.add((min(i, j), max(i, j)))
        else:
            pairs[(i, j)] = violation
    rows = lambda r: (layer.row(r.i, r.sign_i), layer.row(r.j, r.sign_j))  # noqa: E731
    assert {rows(p): (p.kind, p.bound) for p in layer.pairs} == pairs
    assert duplicates <= {tuple(sorted(rows(d))) for d in layer.duplicates}
    on = z > 0
    for p in layer.pairs:
        i, j = rows(p)
        rho = float(expected.atoms[i] @ expected.atoms[j])
        counts = (int(on[:, i].sum()), int(on[:, j].sum()), int((on[:, i] & on[:, j]).sum()))
        assert (p.count_i, p.count_j, p.co_count) == counts
        assert p.rho == pytest.approx(rho, rel=1e-12, abs=1e-12)
        assert p.threshold == pytest.approx((1 - rho) * float(expected.mu[j]), rel=1e-9)


# ---- audit: tiny model, real model, forward passes ----------------------------------------


def test_audit_equals_brute_force_on_a_tiny_model(tiny_model, windows, sae1):
    result = audit_tokens(tiny_model, sae1, windows)
    layer = result.layers[HOOK1]
    held = held_out_windows(N_WINDOWS, HELD_OUT)
    assert (layer.n_tokens, layer.n_held_out) == (int((~held).sum()) * CONTEXT, int(held.sum()) * CONTEXT)
    assert (layer.scope, layer.lam, layer.lam_estimated) == ("L1 objective (exact)", 0.5, False)
    expected = brute_force(sae1, audit_batches(tiny_model, windows, HOOK1))
    assert_matches_brute_force(layer, expected)
    assert (0, 1) in {(p.i, p.j) for p in layer.pairs if p.kind == "hierarchy"}, "the planted child is missed"


CORPUS = [
    "The labrador is a dog that loves to swim in cold lakes.",
    "A poodle is a dog with curly hair and a proud walk.",
    "Cats sleep for most of the day and hunt at night.",
    "The river flows past the old mill towards the sea.",
    "She planted tomatoes, beans and basil in the garden.",
    "Rain fell on the roof all night long.",
    "The train to the city leaves at seven in the morning.",
    "He read the letter twice before he answered it.",
    "Bread rises when the yeast has enough warmth and sugar.",
    "The children built a sandcastle near the water.",
    "Mountains in the north are covered with snow in winter.",
    "A beagle follows a scent for hours without rest.",
    "The library opens late on Sundays.",
    "Bees carry pollen from flower to flower.",
    "The old clock in the hall stopped at midnight.",
    "Fresh coffee filled the kitchen with a warm smell.",
    "The team won the match in the last minute.",
    "Stars are hard to see from the middle of a big city.",
    "The farmer counted his sheep before the storm.",
    "A golden retriever waited at the door for its owner.",
    "The bridge was closed for repairs during the summer.",
    "Owls can turn their heads almost all the way around.",
    "The market sells apples, pears and honey every Saturday.",
    "Her bicycle had a basket and a small bell.",
    "The museum shows paintings from many centuries.",
    "Snow covered the fields and the quiet roads.",
    "The baker wakes up at four to make the bread.",
    "A small boat drifted slowly across the bay.",
    "The dog barked at the postman every single morning.",
    "Wind turbines turned slowly on the green hills.",
    "The teacher wrote the date on the board.",
    "Wolves live and hunt together in packs.",
    "The soup needed more salt and a little pepper.",
    "Lightning struck the tall tree near the school.",
    "A puppy chewed the corner of the old blanket.",
    "The ship arrived in the harbour after a long journey.",
]


def test_audit_of_minilm_equals_brute_force(minilm_bridge, tmp_path):
    hook, context = "blocks.2.hook_resid_post", CONTEXT
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))  # the .txt reader takes one document per paragraph
    n_tokens = 12 * context
    windows = torch.cat(list(token_windows(str(corpus), minilm_bridge, context, n_tokens=n_tokens, batch_size=BATCH)))
    specials = torch.isin(windows, torch.tensor(minilm_bridge.tokenizer.all_special_ids))
    assert specials[:, 0].all() and (~specials).sum() > 150, "windows start with [CLS]; most tokens are text"
    acts = cached(minilm_bridge, windows, hook)[~specials]
    sae = train_sae("standard", acts, hook_name=hook, d_sae=64, l1_coefficient=0.05)

    layer = oh.audit(minilm_bridge, sae, str(corpus), n_tokens=n_tokens, batch_size=BATCH, context_size=context,
                     held_out=HELD_OUT, progress=False).layers[hook]

    expected = brute_force(sae, audit_batches(minilm_bridge, windows, hook, specials))
    held = held_out_windows(len(windows), HELD_OUT)
    assert layer.n_held_out == int((~specials[held]).sum())
    assert (layer.scope, layer.lam, layer.lam_estimated) == ("L1 objective (exact)", 0.05, False)
    assert_matches_brute_force(layer, expected)


def batch_shapes(n_windows: int) -> list[tuple[int, int]]:
    return [(min(BATCH, n_windows - start), CONTEXT) for start in range(0, n_windows, BATCH)]


@pytest.mark.parametrize("estimated", [False, True], ids=["lam known", "one lam estimated"])
def test_two_saes_on_two_layers_share_every_forward_pass(tiny_model, windows, sae1, sae2, estimated):
    passes: list[tuple[int, ...]] = []
    handle = tiny_model.embed.register_forward_hook(lambda module, args, output: passes.append(tuple(args[0].shape)))
    saes = {HOOK1: sae1, HOOK2: sae2}
    lams = {HOOK1: None, HOOK2: SAEView(sae2).lam} if estimated else None
    try:
        result = audit_tokens(tiny_model, saes, windows, lam=lams,
                              options=oh.AuditOptions(lam_calibration_tokens=BATCH * CONTEXT))
    finally:
        handle.remove()
    held = held_out_windows(N_WINDOWS, HELD_OUT)
    n_audit = int((~held).sum())
    calibration = BATCH if estimated else 0
    # A one-token probe (check_attachment); with a lam to estimate, the first audit windows
    # (whose codes also serve pass 1); pass 1 over the other audit windows; pass 2 over the
    # held-out windows. Every forward pass feeds both SAEs.
    assert passes == [(1, 1), *batch_shapes(calibration), *batch_shapes(n_audit - calibration),
                      *batch_shapes(int(held.sum()))]
    for hook in (HOOK1, HOOK2):
        layer = result.layers[hook]
        assert (layer.n_tokens, layer.n_held_out) == (n_audit * CONTEXT, int(held.sum()) * CONTEXT)
        assert layer.lam_estimated == (estimated and hook == HOOK1)


def test_two_saes_on_one_hook_share_every_forward_pass(tiny_model, windows, sae1):
    """Two widths of SAE on one hook, audited together: one forward pass per batch, keys that name
    the SAEs, each layer equal to its own audit, and the report and tables keep both."""
    wide = train_sae("standard", cached(tiny_model, random_tokens(64, seed=4), HOOK1), hook_name=HOOK1, d_sae=48,
                     model_name="tiny-test-model")
    passes: list[tuple[int, ...]] = []
    handle = tiny_model.embed.register_forward_hook(lambda module, args, output: passes.append(tuple(args[0].shape)))
    try:
        result = audit_tokens(tiny_model, [SAEView(sae1, sae_id="narrow"), SAEView(wide, sae_id="wide")], windows)
    finally:
        handle.remove()
    held = held_out_windows(N_WINDOWS, HELD_OUT)
    assert passes == [(1, 1), *batch_shapes(int((~held).sum())), *batch_shapes(int(held.sum()))]
    assert list(result.layers) == [f"{HOOK1}/narrow", f"{HOOK1}/wide"]
    assert (result.layers[f"{HOOK1}/narrow"].d_sae, result.layers[f"{HOOK1}/wide"].d_sae) == (32, 48)
    for key, sae in ((f"{HOOK1}/narrow", sae1), (f"{HOOK1}/wide", wide)):
        alone = audit_tokens(tiny_model, sae, windows).layers[HOOK1]
        assert result.layers[key].hook_name == key  # a layer's hook_name is its key: it names the SAE too
        alone.hook_name, alone.sae_id = key, result.layers[key].sae_id
        assert_layers_match(result.layers[key], alone)
    frame = result.to_pandas()
    assert sorted(set(frame["hook"])) == [f"{HOOK1}/narrow", f"{HOOK1}/wide"] and len(frame) == 32 + 48


# ---- monitor -------------------------------------------------------------------------------

TORCH_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def hook_state(model) -> dict[str, tuple]:
    """Every hook of every module: torch's hook dicts and TransformerLens' HookPoint lists."""
    return {
        name: (
            *(tuple(getattr(module, attr).items()) for attr in TORCH_HOOK_DICTS),
            tuple(getattr(module, "fwd_hooks", ())),
            tuple(getattr(module, "bwd_hooks", ())),
        )
        for name, module in model.named_modules()
    }


def test_monitor_leaves_the_hooks_as_they_were_and_equals_the_audit(tiny_model, windows, sae1):
    # The user's own hooks (a permanent HookPoint hook, a torch pre-hook) must survive it.
    tiny_model.blocks[0].hook_resid_post.add_hook(lambda acts, hook: None, is_permanent=True)
    user_handle = tiny_model.blocks[1].register_forward_pre_hook(lambda module, args: None)
    try:
        before = hook_state(tiny_model)
        with oh.monitor(tiny_model, sae1, held_out=HELD_OUT) as mon:
            for k, batch in enumerate(windows.split(BATCH)):
                if k % 2:  # run_with_hooks resets non-permanent hooks at its end: the monitor stays
                    tiny_model.run_with_hooks(batch, return_type=None)
                else:
                    tiny_model(batch, return_type=None)
                if k == 1:
                    partial = mon.result()
            assert hook_state(tiny_model) != before
        assert hook_state(tiny_model) == before
    finally:
        user_handle.remove()
        tiny_model.reset_hooks(including_permanent=True)
    monitored = mon.result()
    audited = audit_tokens(tiny_model, sae1, windows)
    assert partial.layers[HOOK1].n_tokens + partial.layers[HOOK1].n_held_out == 2 * BATCH * CONTEXT
    assert monitored.meta["n_tokens"] == audited.meta["n_tokens"] == windows.numel()
    # Same windows, other batches: the model's float32 activations may differ in the last bit.
    assert_layers_match(monitored.layers[HOOK1], audited.layers[HOOK1], exact_code_values=False)


def test_a_finished_audit_leaves_nothing_for_the_cycle_collector(tiny_model, windows, sae1):
    """A dropped result (or monitor) frees the audit's statistics and plans at once, without a full
    garbage collection: a reference cycle through the tap once held them (about 2 GB per audit at
    Gemma-2-2B widths, and every later audit in the same process ran slower)."""
    gc.collect()
    gc.disable()
    try:
        result = audit_tokens(tiny_model, sae1, windows)
        assert result.layers[HOOK1].n_tokens > 0
        with oh.monitor(tiny_model, sae1, held_out=HELD_OUT) as mon:
            tiny_model(windows[:BATCH], return_type=None)
        assert mon.result().layers[HOOK1].n_tokens > 0
        del result, mon
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not left


@pytest.mark.parametrize("kv_cache", [True, False])
def test_generate_inside_a_monitor(tiny_model, sae1, sae2, kv_cache):
    prompt, new = random_tokens(2, seed=4, context=6), 5
    before = hook_state(tiny_model)
    with oh.monitor(tiny_model, [sae1, sae2], held_out=0.2) as mon:
        out = tiny_model.generate(prompt, max_new_tokens=new, stop_at_eos=False, verbose=False,
                                  use_past_kv_cache=kv_cache)
    assert out.shape == (2, 6 + new)
    assert hook_state(tiny_model) == before
    result = mon.result()
    # One forward pass for the prompt, then one per new token but the last: with the cache it
    # carries the newest token, without it the whole sequence so far.
    lengths = [6] + ([1] * (new - 1) if kv_cache else list(range(7, 6 + new)))
    fed = 2 * sum(lengths)
    assert result.meta["n_tokens"] == fed
    one, two = result.layers[HOOK1], result.layers[HOOK2]
    assert one.n_tokens + one.n_held_out == fed
    assert (one.n_tokens, one.n_held_out) == (two.n_tokens, two.n_held_out), "both SAEs saw the same tokens"
    # a short session: a handful of held-out tokens certify nothing, and below the policy's
    # min_touched (30) the notes say that nothing could be
    assert one.n_held_out < 20 and one.tier_counts()["certified"] == 0 and one.tier_counts()["violated"] > 0
    said = any("no certificate can be certified" in note for note in one.notes)
    assert said == (one.n_held_out < oh.AuditOptions().min_touched)


def test_generate_text_inside_a_monitor_on_a_bridge(tiny_bridge):
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name=HOOK1)))
    new = 4
    tiny_bridge(tiny_bridge.to_tokens("warm up"))  # the bridge wires its own capture hooks on a first pass
    before = hook_state(tiny_bridge)
    with oh.monitor(tiny_bridge, sae, held_out=0.0, lam=1.0) as mon:  # random weights: no lam to estimate
        out = tiny_bridge.generate("The labrador is a dog", max_new_tokens=new, verbose=False, return_type="tokens")
    assert hook_state(tiny_bridge) == before
    result = mon.result()
    fed = out[0, :-1]  # the last sampled token is never fed back
    specials = torch.isin(fed, torch.tensor(tiny_bridge.tokenizer.all_special_ids))
    assert result.meta["n_tokens"] == len(fed)
    assert result.layers[HOOK1].n_tokens == int((~specials).sum()) and specials.any()


# ---- every architecture --------------------------------------------------------------------

EXACT = "L1 objective (exact)"
# (architecture trained, audited as the inference SAE sae_lens saves?, scope, lam estimated)
ARCHITECTURE_CASES = [
    ("standard", False, EXACT, False),
    ("standard", True, EXACT, False),  # the saved metadata keeps l1_coefficient
    ("gated", False, "L1 surrogate (gated)", True),
    ("gated", True, "L1 surrogate (gated)", True),
    ("jumprelu", False, "L1 surrogate (jumprelu)", True),
    ("jumprelu", True, "L1 surrogate (jumprelu)", True),
    ("topk", False, "L1 surrogate (topk)", True),
    ("topk", True, "L1 surrogate (topk)", True),
    ("batchtopk", False, "L1 surrogate (batchtopk)", True),
    ("batchtopk", True, "L1 surrogate (jumprelu)", True),  # sae_lens saves BatchTopK as JumpReLU
    ("matryoshka_batchtopk", False, "L1 surrogate (matryoshka_batchtopk)", True),
    ("matryoshka_batchtopk", True, "L1 surrogate (jumprelu)", True),
    ("matching_pursuit", False, "L1 surrogate (matching_pursuit)", True),
    ("matching_pursuit", True, "L1 surrogate (matching_pursuit)", True),  # saved as a MatchingPursuitSAE
    ("abstopk", False, "L1 surrogate (abstopk)", True),  # signed codes: the doubled dictionary
    ("abstopk", True, "L1 surrogate (abstopk)", True),
]
assert {kind for kind, *_ in ARCHITECTURE_CASES} == set(TRAINING_KINDS)


@pytest.fixture(scope="module")
def trained(tiny_model):
    """kind -> training SAE on layer 1, trained once per module."""
    acts = cached(tiny_model, random_tokens(32, seed=5), HOOK1)
    saes = {}

    def get(kind: str):
        if kind not in saes:
            saes[kind] = train_sae(kind, acts, hook_name=HOOK1, model_name="tiny-test-model", steps=15)
        return saes[kind]

    return get


def audit_one(model, sae, windows):
    layer = audit_tokens(model, sae, windows).layers[HOOK1]
    expected = brute_force(sae, audit_batches(model, windows, HOOK1), encode=SAEView(sae).encode)
    return layer, expected


@pytest.mark.parametrize("kind, inference, scope, lam_estimated", ARCHITECTURE_CASES)
def test_every_architecture_is_audited_with_its_scope(tiny_model, trained, tmp_path, kind, inference, scope, lam_estimated):
    sae = to_inference(trained(kind), tmp_path) if inference else trained(kind)
    assert sae.cfg.architecture() == ("jumprelu" if inference and "batchtopk" in kind else kind)
    layer, expected = audit_one(tiny_model, sae, random_tokens(8, seed=6))
    assert (layer.scope, layer.lam_estimated) == (scope, lam_estimated)
    if lam_estimated:
        assert layer.lam == pytest.approx(expected.lam_estimate(), rel=1e-6)  # projections are kept in float32
    else:
        assert layer.lam == TRAINING_KINDS[kind][2]["l1_coefficient"]
    assert [f.active_count for f in layer.features] == (expected.z > 0).sum(0).tolist()
    assert layer.tier_counts()["satisfied"] < len(layer.features), "a barely trained SAE breaks some condition"


def test_standard_sae_without_a_training_record_estimates_lam(tiny_model, trained):
    trained_sae = trained("standard")
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=trained_sae.cfg.d_sae, dtype="float64",
                                        metadata=SAEMetadata(hook_name=HOOK1)))
    sae.load_state_dict(trained_sae.state_dict())
    layer, expected = audit_one(tiny_model, sae, random_tokens(8, seed=6))
    assert (layer.scope, layer.lam_estimated) == (EXACT, True)
    assert layer.lam == pytest.approx(expected.lam_estimate(), rel=1e-6)


# ---- audit_activations ---------------------------------------------------------------------


def row_batches(acts: Tensor, size: int) -> list[Batch]:
    """`audit_activations`' batches: rows are windows of one token, held out by the same rule."""
    held = held_out_windows(len(acts), HELD_OUT)
    token = torch.arange(len(acts))
    return [Batch(a, t, ~h) for a, t, h in zip(acts.split(size), token.split(size), held.split(size))]


def test_audit_activations_takes_tensors_lists_callables_and_dicts(tiny_model, windows, sae1, sae2):
    acts1 = cached(tiny_model, windows, HOOK1).reshape(-1, 16).double()
    acts2 = cached(tiny_model, windows, HOOK2).reshape(-1, 16).double()

    by_tensor = oh.audit_activations(sae1, acts1, held_out=HELD_OUT)
    assert list(by_tensor.layers) == ["sae"]  # a bare SAE gets the key "sae"
    by_list = oh.audit_activations({HOOK1: sae1}, {HOOK1: list(acts1.split(50))}, held_out=HELD_OUT)
    by_callable = oh.audit_activations(  # a function returning a fresh generator on every call
        [sae1, sae2], {HOOK1: lambda: (chunk for chunk in acts1.split(70)), HOOK2: acts2}, held_out=HELD_OUT)
    assert set(by_callable.layers) == {HOOK1, HOOK2}

    held = held_out_windows(len(acts1), HELD_OUT)
    for layer, batches in (
        (by_tensor.layers["sae"], row_batches(acts1, len(acts1))),
        (by_list.layers[HOOK1], row_batches(acts1, 50)),
        (by_callable.layers[HOOK1], row_batches(acts1, 70)),
    ):
        assert layer.n_held_out == int(held.sum())
        assert_matches_brute_force(layer, brute_force(sae1, batches))
    assert_matches_brute_force(by_callable.layers[HOOK2], brute_force(sae2, row_batches(acts2, len(acts2))))

    with pytest.raises(TypeError, match="one-shot iterator or generator"):
        oh.audit_activations(sae1, (chunk for chunk in acts1.split(50)))


# ---- low precision -------------------------------------------------------------------------


def floats(value) -> Iterator[float]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from floats(item)
    elif isinstance(value, float):
        yield value


@pytest.mark.parametrize("sae_dtype", [torch.float32, torch.bfloat16])
def test_bf16_model_keeps_float64_statistics_and_finite_verdicts(tiny_model_cfg, windows, sae1, sae_dtype, monkeypatch):
    from copy import deepcopy

    from transformer_lens import HookedTransformer

    model = HookedTransformer(dataclasses.replace(tiny_model_cfg, dtype=torch.bfloat16)).eval()
    sae = deepcopy(sae1).to(sae_dtype)
    statistics = []
    plan = LayerAudit.plan
    monkeypatch.setattr(LayerAudit, "plan", lambda self: statistics.append(self.stats.compute()) or plan(self))

    layer = audit_tokens(model, sae, windows).layers[HOOK1]

    tensors = {name: value for name, value in vars(statistics[0]).items() if isinstance(value, Tensor)}
    assert tensors and all(t.dtype in (torch.float64, torch.int64) for t in tensors.values()), {
        name: t.dtype for name, t in tensors.items()}
    values = list(floats(dataclasses.asdict(layer)))
    assert values and all(math.isfinite(v) for v in values)
    assert layer.n_tokens > 0 and layer.tier_counts()["satisfied"] < layer.d_sae


def test_unknown_lam_is_estimated_on_the_first_audit_windows_then_streamed_once(tiny_model, windows, sae1):
    """lam_hat = 2 median <d_i, r_n> over the active codes of the first audit windows; the
    audit with it equals the audit given that lam (the calibration windows' codes feed pass 1)."""
    options = oh.AuditOptions(lam_calibration_tokens=2 * BATCH * CONTEXT)
    estimated = audit_tokens(tiny_model, {HOOK1: sae1}, windows, lam={HOOK1: None}, options=options).layers[HOOK1]
    first = list(audit_batches(tiny_model, windows, HOOK1))[:2]  # the first 2 * BATCH audit windows
    expected = brute_force(sae1, first)
    active = expected.z > 0
    lam_hat = 2 * float((expected.r @ expected.atoms.T)[active].median())
    assert estimated.lam_estimated and estimated.lam == pytest.approx(lam_hat, rel=1e-5)
    assert f"the first {2 * BATCH * CONTEXT} audit tokens" in estimated.notes[-1]
    given = audit_tokens(tiny_model, {HOOK1: sae1}, windows, lam={HOOK1: estimated.lam}, options=options).layers[HOOK1]
    assert not given.lam_estimated
    assert [dataclasses.asdict(f) for f in estimated.features] == [dataclasses.asdict(f) for f in given.features]
    assert [dataclasses.asdict(p) for p in estimated.pairs] == [dataclasses.asdict(p) for p in given.pairs]
