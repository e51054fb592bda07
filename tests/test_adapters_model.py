"""Hook attachment on real tiny models: HookedTransformer, HookedSAETransformer (SAEs spliced
in with add_sae), TransformerBridge (a tiny GPT-2 and MiniLM), SAETransformerBridge."""
from __future__ import annotations

import pytest
import sae_lens
import torch
from sae_lens import HookedSAETransformer
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from opt_hooks.adapters.model import (
    ActivationTap,
    CodeTap,
    check_attachment,
    forward_to_deepest,
    model_device,
    model_name,
)
from opt_hooks.adapters.sae import SAEView, make_views

TOKENS = torch.arange(2, 26).reshape(3, 8)


def standard_sae(hook_name: str, d_in: int = 16, seed: int = 0, model="tiny-test-model", **config):
    """A float32 StandardSAE with random weights, so that codes are nonzero."""
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
        d_in=d_in, d_sae=24, metadata=SAEMetadata(hook_name=hook_name, model_name=model), **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.5)
    return sae


def hook_state(model) -> dict[str, tuple]:
    """Every HookPoint's TransformerLens handles and the torch hooks underneath, by identity."""
    return {
        name: (
            [id(h) for h in point.fwd_hooks],
            [id(h) for h in point.bwd_hooks],
            list(point._forward_hooks),
            list(point._backward_hooks),
        )
        for name, point in model.hook_dict.items()
    }


def cached(model, tokens, name):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=[name])[1][name]


# ---- ActivationTap ------------------------------------------------------------------------


def test_tap_delivers_activations_in_every_kind_of_forward_pass(tiny_model):
    seen: list[tuple[str, torch.Tensor]] = []
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    with ActivationTap(tiny_model, names, lambda name, acts: seen.append((name, acts))):
        with torch.no_grad():
            tiny_model(TOKENS)
        assert [name for name, _ in seen] == names
        torch.testing.assert_close(seen[0][1], cached(tiny_model, TOKENS, names[0]))
        assert seen[1][1].shape == (3, 8, 4, 4)

        seen.clear()
        tiny_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.2.hook_resid_post", lambda acts, hook: None)])
        assert len(seen) == 2
        seen.clear()
        tiny_model.generate(TOKENS[:, :3], max_new_tokens=2, stop_at_eos=False, verbose=False)
        assert [acts.shape[1] for name, acts in seen if name == names[0]] == [3, 1]  # KV-cached steps
    seen.clear()
    with torch.no_grad():
        tiny_model(TOKENS)
    assert seen == [], "the tap fired after its block ended"


def user_hook(acts, hook):
    return None


def test_tap_leaves_the_models_hooks_exactly_as_they_were(tiny_model):
    tiny_model.add_hook("blocks.0.hook_resid_pre", user_hook)
    tiny_model.add_perma_hook("blocks.1.hook_mlp_out", user_hook)
    try:
        before = hook_state(tiny_model)
        names = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]
        calls = []
        with ActivationTap(tiny_model, names, lambda name, acts: calls.append(name)):
            assert hook_state(tiny_model) != before
            tiny_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre", user_hook)])
            tiny_model.reset_hooks()  # the user's reset must not end the tap
            with torch.no_grad():
                tiny_model(TOKENS)
        assert calls == names * 2
        after = hook_state(tiny_model)
        # the user's reset_hooks removed their own non-permanent hook; all else is as before
        assert after.pop("blocks.0.hook_resid_pre") == ([], [], [], [])
        before.pop("blocks.0.hook_resid_pre")
        assert after == before
        assert after["blocks.1.hook_mlp_out"][0] != []
    finally:
        tiny_model.reset_hooks(including_permanent=True)


def test_tap_removes_its_hooks_when_the_block_raises(tiny_model):
    tiny_model.add_hook("blocks.0.hook_resid_pre", user_hook)
    try:
        before = hook_state(tiny_model)
        with pytest.raises(RuntimeError, match="inside the block"):
            with ActivationTap(tiny_model, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], print):
                raise RuntimeError("inside the block")
        assert hook_state(tiny_model) == before
    finally:
        tiny_model.reset_hooks()


def test_unknown_hook_name_lists_close_matches(tiny_model):
    with pytest.raises(ValueError, match=r"not a hook point of tiny-test-model.*blocks\.0\.hook_resid_pre"):
        with ActivationTap(tiny_model, ["blocks.0.hook_resid_pr"], print):
            pass
    assert hook_state(tiny_model) == {name: ([], [], [], []) for name in tiny_model.hook_dict}


# ---- forward_to_deepest and CodeTap on HookedTransformer -----------------------------------


def count_passes(model, hook_names, tokens):
    """(forward passes, layers reached) during forward_to_deepest, counted by our own tap."""
    fired: list[str] = []
    probes = ["hook_embed" if "hook_embed" in model.hook_dict else "embed.hook_out"] + [
        f"blocks.{i}.hook_resid_pre" for i in range(len(model.blocks))
    ]
    with ActivationTap(model, probes, lambda name, acts: fired.append(name)):
        forward_to_deepest(model, tokens, hook_names)
    layers = [name for name in fired if name.startswith("blocks.")]
    return len(fired) - len(layers), len(layers)


def test_one_pass_stops_after_the_deepest_hooked_block(tiny_model):
    views = make_views([standard_sae("blocks.0.hook_resid_pre"), standard_sae("blocks.1.hook_mlp_out", seed=1)])
    codes = []
    tap = CodeTap(tiny_model, views, lambda key, x, z, w, inputs: codes.append((key, x, z)))
    with tap:
        passes, layers_run = count_passes(tiny_model, tap.hook_names, TOKENS)
    assert (passes, layers_run) == (1, 2)  # blocks 0 and 1 ran, block 2 did not
    assert [key for key, _, _ in codes] == ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    for key, x, z in codes:
        expected = views[key].encode(cached(tiny_model, TOKENS, key))[:2]
        torch.testing.assert_close((x, z), expected)
        assert x.shape == (24, 16) and z.shape == (24, 24)


def test_hooks_outside_the_blocks_need_a_full_pass(tiny_model):
    passes, layers_run = count_passes(tiny_model, ["blocks.0.hook_resid_pre", "ln_final.hook_normalized"], TOKENS)
    assert (passes, layers_run) == (1, 3)


# ---- HookedSAETransformer ------------------------------------------------------------------


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
def test_spliced_sae_is_read_at_its_own_hooks_not_encoded_twice(tiny_model_cfg, hook, use_error_term):
    model = HookedSAETransformer(tiny_model_cfg)
    original_acts = cached(model, TOKENS, hook)
    sae = standard_sae(hook, reshape_activations="hook_z" if hook.endswith("_z") else "none")
    model.add_sae(sae, use_error_term=use_error_term)
    view = SAEView(sae)
    encodes, codes = [], []
    with ActivationTap(model, [f"{hook}.hook_sae_acts_pre"], lambda name, acts: encodes.append(name)):
        tap = CodeTap(model, {hook: view}, lambda key, x, z, w, inputs: codes.append((key, x, z)))
        with tap:
            forward_to_deepest(model, TOKENS, tap.hook_names)
    assert tap.hook_names == [f"{hook}.hook_sae_input", f"{hook}.hook_sae_acts_post"]
    assert len(encodes) == 1, "the spliced SAE ran more than once"
    assert len(codes) == 1
    torch.testing.assert_close(codes[0][1:], view.encode(original_acts)[:2])


def test_another_sae_spliced_at_the_hook_is_read_through(tiny_model_cfg):
    model = HookedSAETransformer(tiny_model_cfg)
    hook = "blocks.0.hook_resid_post"
    original_acts = cached(model, TOKENS, hook)
    model.add_sae(standard_sae(hook, seed=3))
    audited = SAEView(standard_sae(hook, seed=4))
    codes = []
    with CodeTap(model, {hook: audited}, lambda key, x, z, w, inputs: codes.append((x, z))) as tap:
        forward_to_deepest(model, TOKENS, tap.hook_names)
    assert tap.hook_names == [f"{hook}.hook_sae_input"]
    torch.testing.assert_close(codes[0], audited.encode(original_acts)[:2])
    with pytest.raises(ValueError, match=r"SAE is spliced in there.*hook_sae_input"):
        with ActivationTap(model, [hook], print):
            pass


# ---- TransformerBridge ---------------------------------------------------------------------


def test_bridge_aliases_and_one_stopped_pass(tiny_bridge):
    before = hook_state(tiny_bridge)
    views = make_views([standard_sae("blocks.0.hook_resid_pre"), standard_sae("blocks.0.hook_resid_post", seed=1)])
    codes = []
    with CodeTap(tiny_bridge, views, lambda key, x, z, w, inputs: codes.append((key, x, z))) as tap:
        passes, layers_run = count_passes(tiny_bridge, tap.hook_names, TOKENS)
    assert (passes, layers_run) == (1, 2)  # block 0 ran; the bridge fires block 1's hook_in, then stops
    assert hook_state(tiny_bridge) == before
    for key, x, z in codes:
        torch.testing.assert_close((x, z), views[key].encode(cached(tiny_bridge, TOKENS, key))[:2])
    assert [key for key, _, _ in codes] == list(views)


def test_bridge_hook_z_arrives_per_head(tiny_bridge):
    hook = "blocks.0.attn.hook_z"
    sae = standard_sae(hook, reshape_activations="hook_z")
    views = make_views(sae)
    codes = []
    with CodeTap(tiny_bridge, views, lambda key, x, z, w, inputs: codes.append(z)) as tap:
        forward_to_deepest(tiny_bridge, TOKENS, tap.hook_names)
    acts = cached(tiny_bridge, TOKENS, hook)
    assert acts.shape == (3, 8, 4, 4)
    torch.testing.assert_close(codes[0], views[hook].encode(acts)[1])
    assert codes[0].shape == (24, 24) and (codes[0] > 0).any()


def test_encoder_bridge_runs_a_full_pass(minilm_bridge):
    """MiniLM's BERT blocks ignore stop_at_layer: the pass runs to the end, still only once."""
    views = make_views(standard_sae("blocks.1.hook_resid_post", d_in=384, model=None))
    codes = []
    tokens = torch.tensor([[101, 7592, 2088, 102]])
    with CodeTap(minilm_bridge, views, lambda key, x, z, w, inputs: codes.append(z)) as tap:
        passes, layers_run = count_passes(minilm_bridge, tap.hook_names, tokens)
    assert (passes, layers_run, len(codes)) == (1, 6, 1)


def test_spliced_sae_on_an_sae_transformer_bridge(minilm_tokenizer):
    from sae_lens import SAETransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=4, n_positions=32, vocab_size=minilm_tokenizer.vocab_size)
    bridge = SAETransformerBridge.boot_transformers(
        "tiny-gpt2", hf_model=GPT2LMHeadModel(config).eval(), tokenizer=minilm_tokenizer, device="cpu")
    hook = "blocks.1.hook_resid_pre"
    original_acts = cached(bridge, TOKENS, "blocks.1.hook_in")  # its caches drop the alias names
    sae = standard_sae(hook)
    bridge.add_sae(sae)
    codes = []
    with CodeTap(bridge, make_views(sae), lambda key, x, z, w, inputs: codes.append((x, z))) as tap:
        forward_to_deepest(bridge, TOKENS, tap.hook_names)
    assert tap.hook_names == ["blocks.1.hook_in.hook_sae_input", "blocks.1.hook_in.hook_sae_acts_post"]
    torch.testing.assert_close(codes[0], SAEView(sae).encode(original_acts)[:2])


# ---- validation and helpers ----------------------------------------------------------------


def test_check_attachment_names_widths_and_the_fix(tiny_model):
    narrow = make_views(standard_sae("blocks.1.hook_resid_pre", d_in=8))
    with pytest.raises(ValueError, match=r"d_in=8 but the activations have width 16.*attach it to a hook of width 8"):
        check_attachment(tiny_model, narrow)
    with pytest.raises(ValueError, match="close matches: blocks.1.hook_resid_pre"):
        check_attachment(tiny_model, make_views(standard_sae("blocks.1.hook_resid_pr")))
    assert hook_state(tiny_model) == {name: ([], [], [], []) for name in tiny_model.hook_dict}


def test_model_name_mismatch_warns_unless_allowed(tiny_model, recwarn):
    other = make_views(standard_sae("blocks.0.hook_resid_pre", model="gpt2-small"))
    with pytest.warns(UserWarning, match="trained on 'gpt2-small' but the model is 'tiny-test-model'"):
        check_attachment(tiny_model, other)
    recwarn.clear()
    check_attachment(tiny_model, other, allow_model_mismatch=True)
    check_attachment(tiny_model, make_views(standard_sae("blocks.0.hook_resid_pre")))
    assert not [w for w in recwarn if "trained on" in str(w.message)]


def test_model_name_aliases_are_the_same_model(recwarn):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=16, act_fn="relu",
                                  model_name="gpt2", attn_only=True, device="cpu")
    check_attachment(HookedTransformer(cfg), make_views(standard_sae("blocks.0.hook_resid_pre", model="gpt2-small")))
    assert not [w for w in recwarn if "trained on" in str(w.message)]


def test_device_and_name_helpers(tiny_model, tiny_bridge):
    assert model_device(tiny_model) == torch.device("cpu") == model_device(tiny_bridge)
    assert (model_name(tiny_model), model_name(tiny_bridge)) == ("tiny-test-model", "tiny-gpt2")
