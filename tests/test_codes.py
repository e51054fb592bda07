"""SparseCodes: exact storage of the audit tokens' nonzero codes, mergeable in any order."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opt_hooks.theory.codes import CSR, SparseCodes


def assert_same_csr(a: CSR, b: CSR) -> None:
    assert a.n_features == b.n_features
    for name in ("token_index", "crow", "col", "val"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def dense_from_csr(csr: CSR) -> torch.Tensor:
    z = torch.zeros(csr.n_tokens, csr.n_features, dtype=csr.val.dtype)
    z[csr.row_ids(), csr.col.long()] = csr.val
    return z


def codes_of(z: torch.Tensor, tokens: torch.Tensor, batch_sizes: list[int] | None = None) -> SparseCodes:
    codes = SparseCodes(z.shape[1])
    for rows in torch.arange(z.shape[0]).split(batch_sizes or [z.shape[0]]):
        codes.update(z[rows], tokens[rows])
    return codes


@st.composite
def code_batches(draw):
    """Codes with exact zeros, ties and all-zero rows; shuffled token indices; a batch split
    and a merge order (a random binary tree over the batches)."""
    n_tokens = draw(st.integers(0, 24))
    n_features = draw(st.integers(1, 7))
    levels = st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0, 2.5])  # mostly zeros, many ties
    z = torch.tensor(draw(st.lists(levels, min_size=n_tokens * n_features, max_size=n_tokens * n_features)))
    z = z.reshape(n_tokens, n_features)
    token_ids = draw(st.permutations(range(1000, 1000 + 3 * n_tokens)))[:n_tokens]
    cuts = sorted(draw(st.lists(st.integers(0, n_tokens), max_size=5)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n_tokens])]
    merge_keys = draw(st.lists(st.integers(), min_size=len(sizes), max_size=len(sizes)))
    return z, torch.tensor(token_ids, dtype=torch.int64), sizes, merge_keys


@settings(max_examples=150, deadline=None)
@given(code_batches())
def test_any_split_and_merge_order_gives_the_same_csr(case):
    z, tokens, sizes, merge_keys = case
    reference = codes_of(z, tokens).compute()

    streamed = codes_of(z, tokens, sizes).compute()
    assert_same_csr(streamed, reference)

    # One partial state per batch, merged in a random order, as ranks or resumed runs would be.
    parts = [codes_of(z[rows], tokens[rows]) for rows in torch.arange(z.shape[0]).split(sizes)]
    order = sorted(range(len(parts)), key=lambda p: merge_keys[p])
    merged = SparseCodes(z.shape[1])
    for p in order:
        merged.merge(parts[p])
    assert_same_csr(merged.compute(), reference)

    by_token = torch.argsort(tokens)
    assert torch.equal(reference.token_index, tokens[by_token])
    assert torch.equal(dense_from_csr(reference), z[by_token])
    assert reference.n_tokens == z.shape[0]
    assert reference.nnz == int((z != 0).sum())


def test_rows_without_nonzero_are_tokens():
    codes = SparseCodes(3)
    codes.update(torch.zeros(4, 3), torch.arange(4))
    codes.update(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([9]))
    csr = codes.compute()
    assert codes.n_tokens == csr.n_tokens == 5
    assert csr.nnz == codes.nnz == 1
    assert torch.equal(csr.crow, torch.tensor([0, 0, 0, 0, 0, 1]))
    assert torch.equal(csr.counts(), torch.tensor([0, 1, 0]))


def test_dtypes_and_column_order():
    codes = SparseCodes(5)
    codes.update(torch.tensor([[0.0, 3.0, 0.0, 1.0, 2.0]], dtype=torch.bfloat16), torch.tensor([7]))
    csr = codes.compute()
    assert csr.token_index.dtype == csr.crow.dtype == torch.int64
    assert csr.col.dtype == torch.int32 and csr.val.dtype == torch.float32
    assert csr.col.tolist() == [1, 3, 4] and csr.val.tolist() == [3.0, 1.0, 2.0]

    wide = SparseCodes(2)
    wide.update(torch.tensor([[0.1, 0.0]], dtype=torch.float64), torch.tensor([0]))
    assert wide.compute().val.dtype == torch.float64
    assert wide.compute().val.item() == 0.1  # float64 values are not rounded


def test_compute_is_repeatable_and_keeps_one_copy():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    codes = codes_of(z, torch.tensor([2, 0, 1]), [1, 1, 1])
    first = codes.compute()
    assert codes.nbytes == first.nbytes
    assert codes.compute() is first
    codes.update(torch.tensor([[5.0, 0.0]]), torch.tensor([3]))
    assert codes.compute().token_index.tolist() == [0, 1, 2, 3]


def test_state_dict_round_trip_then_resume():
    g = torch.Generator().manual_seed(0)
    z = torch.where(torch.rand(40, 6, generator=g) < 0.3, torch.rand(40, 6, generator=g), 0.0)
    tokens = torch.arange(40)
    before = codes_of(z[:25], tokens[:25], [10, 15])
    state = before.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = SparseCodes(6)
    resumed.load_state_dict(state)
    resumed.update(z[25:], tokens[25:])
    assert_same_csr(resumed.compute(), codes_of(z, tokens).compute())
    with pytest.raises(ValueError, match="features"):
        SparseCodes(5).load_state_dict(state)


def test_duplicate_token_index_is_refused():
    codes = SparseCodes(2)
    codes.update(torch.ones(2, 2), torch.tensor([4, 5]))
    codes.update(torch.ones(1, 2), torch.tensor([5]))
    with pytest.raises(ValueError, match="twice"):
        codes.compute()


def test_update_checks_shapes_and_merge_checks_features():
    codes = SparseCodes(3)
    with pytest.raises(ValueError):
        codes.update(torch.ones(2, 4), torch.arange(2))
    with pytest.raises(ValueError):
        codes.update(torch.ones(2, 3), torch.arange(3))
    with pytest.raises(ValueError):
        codes.merge(SparseCodes(4))


def test_top_tokens_strongest_first_ties_by_token_and_padding():
    z = torch.tensor(
        [
            [2.0, 0.0, 1.0],
            [5.0, 0.0, 0.0],
            [2.0, 0.0, 3.0],
            [0.0, 0.0, 3.0],
        ]
    )
    codes = codes_of(z, torch.tensor([30, 10, 20, 40]))
    values, tokens = codes.top_tokens([0, 2, 1, 0], k=3)
    assert values.dtype == torch.float64
    assert values.tolist() == [[5, 2, 2], [3, 3, 1], [0, 0, 0], [5, 2, 2]]
    assert tokens.tolist() == [[10, 20, 30], [20, 40, 30], [-1, -1, -1], [10, 20, 30]]


def test_top_tokens_and_columns_match_dense_codes():
    g = torch.Generator().manual_seed(1)
    z = torch.where(torch.rand(200, 30, generator=g) < 0.2, torch.randint(1, 4, (200, 30), generator=g).float(), 0.0)
    tokens = torch.randperm(200, generator=g) * 3
    codes = codes_of(z, tokens, [64, 64, 72])
    features = torch.tensor([29, 0, 7, 7, 13])
    by_token = torch.argsort(tokens)
    dense = z[by_token][:, features].double()
    assert torch.equal(codes.columns(features), dense)

    values, top = codes.top_tokens(features, k=5)
    for f in range(features.numel()):  # expected order: value descending, then token ascending
        order = torch.argsort(dense[:, f], descending=True, stable=True)[:5]
        active = dense[order, f] > 0
        assert torch.equal(values[f], torch.where(active, dense[order, f], 0.0))
        assert torch.equal(top[f], torch.where(active, tokens[by_token][order], -1))


def test_top_tokens_rejects_unknown_features():
    codes = codes_of(torch.ones(2, 3), torch.arange(2))
    with pytest.raises(IndexError):
        codes.top_tokens([3], k=1)
