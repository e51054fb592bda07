"""Streaming in any batch split, or merging partial states in any order, equals one shot."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opt_hooks.engine import LayerAudit
from opt_hooks.theory.stats import LayerStats

D, K = 5, 7


@st.composite
def streams(draw):
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0], dtype=torch.float64)  # exact zeros and ties
    z = levels[torch.randint(0, len(levels), (n, K), generator=gen)]
    x = torch.randn(n, D, generator=gen, dtype=torch.float64).round(decimals=1)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    order = draw(st.permutations(list(range(len(cuts) + 1))))
    return x, z, [0, *cuts, n], order


def atoms_and_bias():
    gen = torch.Generator().manual_seed(7)
    atoms = torch.nn.functional.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    return atoms, torch.full((D,), 0.1, dtype=torch.float64)


def pieces(x, z, bounds):
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield x[a:b], z[a:b], torch.arange(a, b)


def assert_stats_equal(a, b):
    assert a.n_tokens == b.n_tokens
    assert torch.equal(a.active_count, b.active_count)
    assert torch.equal(a.min_z, b.min_z) and torch.equal(a.max_z, b.max_z)
    for name in ("sum_z", "sum_z2", "sum_z_rnorm", "sum_z_r", "sum_r"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12), name
    assert torch.equal(a.worst_token, b.worst_token) and torch.equal(a.worst_rnorm, b.worst_rnorm)
    for name in ("token_index", "crow", "col", "val"):
        assert torch.equal(getattr(a.codes, name), getattr(b.codes, name)), name


@settings(max_examples=60, deadline=None)
@given(streams())
def test_split_and_merge_order_do_not_matter(case):
    x, z, bounds, order = case
    atoms, bias = atoms_and_bias()
    whole = LayerStats(atoms, bias, worst_k=4)
    whole.update(x, z, torch.arange(len(x)))
    streamed = LayerStats(atoms, bias, worst_k=4)
    for xb, zb, tb in pieces(x, z, bounds):
        streamed.update(xb, zb, tb)
    parts = []
    for xb, zb, tb in pieces(x, z, bounds):
        part = LayerStats(atoms, bias, worst_k=4)
        part.update(xb, zb, tb)
        parts.append(part)
    merged = LayerStats(atoms, bias, worst_k=4)
    for k in order:
        merged.merge(parts[k])
    reference = whole.compute()
    assert_stats_equal(reference, streamed.compute())
    assert_stats_equal(reference, merged.compute())


@settings(max_examples=30, deadline=None)
@given(streams())
def test_pass_two_merges_exactly(case):
    x, z, bounds, order = case
    atoms, bias = atoms_and_bias()
    held = torch.arange(len(x)) % 3 == 2
    audit = LayerAudit(atoms, bias, lam=0.3)
    audit.update(x[~held], z[~held])
    whole = audit.plan()
    whole.update(x, z, torch.arange(len(x)), held_out=held)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = audit.plan()
        part.update(x[a:b], z[a:b], torch.arange(a, b), held_out=held[a:b])
        parts.append(part)
    merged = audit.plan()
    for k in order:
        merged.merge(parts[k])
    a, b = whole.state.state_dict(), merged.state.state_dict()
    assert a.keys() == b.keys()
    sample_a, sample_b = a.pop("sample"), b.pop("sample")  # the code gap's tokens: the same ones, exactly
    assert sample_a.keys() == sample_b.keys() and all(torch.equal(sample_a[k], sample_b[k]) for k in sample_a if k != "n_features")
    for name in a:
        if a[name].dtype == torch.int64:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], rtol=1e-12, atol=1e-12), name
