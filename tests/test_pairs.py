"""The exact C2 pair engine against the brute-force K x K reference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from opt_hooks.theory.codes import CSR, SparseCodes
from opt_hooks.theory.pairs import (
    COMPLEMENTARY,
    HIERARCHY,
    co_counts,
    pair_bounds_dense,
    pair_violations,
)


def to_csr(z: torch.Tensor) -> CSR:
    codes = SparseCodes(z.shape[1])
    codes.update(z, torch.arange(z.shape[0]))
    return codes.compute()


def unit(atoms: torch.Tensor) -> torch.Tensor:
    return atoms / atoms.norm(dim=1, keepdim=True)


def expected_violations(z: torch.Tensor, atoms: torch.Tensor, rel_tol: float = 1e-6, abs_tol: float = 0.0):
    """Straight from the definition, with dense K x K tables: (kind (K, K) int64 with 0 where C2
    holds or is not asked, bound (K, K), threshold (K, K))."""
    n_tokens, n_features = z.shape
    upper, lower, _ = pair_bounds_dense(z)
    rho = atoms.double() @ atoms.double().T
    mu = z.double().mean(0)
    threshold = (1 - rho) * mu
    tol = rel_tol * mu + abs_tol
    asked = (mu > 0) & (rho.abs() < 1) & ~torch.eye(n_features, dtype=torch.bool)
    asked &= ((z != 0).sum(0) < n_tokens)[:, None]  # A_i non-empty
    kind = torch.zeros(n_features, n_features, dtype=torch.int64)
    kind[asked & (upper < threshold - tol)] = HIERARCHY
    kind[asked & (lower > threshold + tol)] = COMPLEMENTARY
    bound = torch.where(kind == HIERARCHY, upper, lower)
    return kind, bound, threshold


def assert_matches_reference(z: torch.Tensor, atoms: torch.Tensor, **options) -> torch.Tensor:
    """Run the engine and check every field against the dense reference; returns the kind table."""
    tolerances = {k: options.pop(k) for k in ("rel_tol", "abs_tol") if k in options}
    got = pair_violations(to_csr(z), atoms, z.double().mean(0), **tolerances, **options)
    kind, bound, threshold = expected_violations(z, atoms, **tolerances)
    got_kind = torch.zeros_like(kind)
    got_kind[got.i, got.j] = got.kind
    assert torch.equal(got_kind, kind)
    keys = got.i * z.shape[1] + got.j
    assert torch.equal(keys, keys.unique())  # sorted by (i, j), each pair once
    assert torch.equal(got.bound, bound[got.i, got.j])  # a code value (or 0), exactly
    torch.testing.assert_close(got.threshold, threshold[got.i, got.j], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.rho, (atoms[got.i].double() * atoms[got.j].double()).sum(1), rtol=0, atol=1e-15)
    on = (z != 0).double()
    counts, co = on.sum(0).long(), (on.T @ on).long()  # exact integers in float64
    assert torch.equal(got.count_i, counts[got.i]) and torch.equal(got.count_j, counts[got.j])
    assert torch.equal(got.co_count, co[got.i, got.j])
    expected_margin = torch.where(got.kind == HIERARCHY, got.threshold - got.bound, got.bound - got.threshold)
    assert torch.equal(got.margin, expected_margin)
    assert (got.margin >= 0).all() and got.margin.dtype == torch.float64
    return kind


def planted_codes(n_tokens: int, n_features: int, seed: int) -> torch.Tensor:
    """Sparse codes with tied values and every structure C2 cares about planted at fixed features:

    0: parent; 1: strict child (only on with 0, so M = 0); 2: non-strict child (on with 0, plus
    rare weak firings without it, so 0 < M); 3 and 4: complementary (3 on wherever 4 is off);
    5: on at every token (A_5 empty); 6: dead; 7: a frequent feature (max < 2 mu possible);
    8: child whose top value ties between a parent token and a token without the parent.
    """
    g = torch.Generator().manual_seed(seed)
    density = 0.15 * torch.rand(n_features, generator=g) ** 2
    on = torch.rand(n_tokens, n_features, generator=g) < density
    z = torch.where(on, torch.randint(1, 5, (n_tokens, n_features), generator=g).double() / 2, 0.0)
    parent = torch.rand(n_tokens, generator=g) < 0.4
    parent[0], parent[1] = True, False  # feature 8's tied top tokens, see below
    z[:, 0] = torch.where(parent, 1.0, 0.0)
    z[:, 1] = torch.where(parent & (torch.rand(n_tokens, generator=g) < 0.5), 2.0, 0.0)
    rare = ~parent & (torch.rand(n_tokens, generator=g) < 0.05)
    z[:, 2] = torch.where(parent & (torch.rand(n_tokens, generator=g) < 0.6), 3.0, torch.where(rare, 0.25, 0.0))
    off_4 = torch.rand(n_tokens, generator=g) < 0.5
    z[:, 4] = torch.where(off_4, 0.0, 1.0)
    z[:, 3] = torch.where(off_4 | (torch.rand(n_tokens, generator=g) < 0.2), 2.0, 0.0)
    z[:, 5] = 1.0 + torch.randint(0, 2, (n_tokens,), generator=g).double()
    z[:, 6] = 0.0
    z[:, 7] = torch.where(torch.rand(n_tokens, generator=g) < 0.9, 1.0 + 0.5 * torch.rand(n_tokens, generator=g), 0.0)
    z[:, 8] = torch.where(parent & (torch.rand(n_tokens, generator=g) < 0.3), 0.5, 0.0)
    z[:2, 8] = 4.0  # top value tied between a token with the parent on and one with it off
    return z


def planted_atoms(n_features: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    atoms = torch.randn(n_features, d, generator=g, dtype=torch.float64)
    atoms[1] = atoms[0] + 0.3 * atoms[1]  # rho_01 large: the strict child still breaks C2
    atoms[10] = atoms[11]  # parallel atoms: |rho| = 1 pairs must be skipped
    return unit(atoms)


@pytest.mark.parametrize(
    "n_tokens, n_features, d, chunk_elements",
    [(300, 40, 6, 1 << 21), (300, 40, 6, 64), (500, 300, 16, 1000), (300, 2000, 32, 1 << 21)],
)
def test_matches_dense_reference_on_planted_codes(n_tokens, n_features, d, chunk_elements):
    z = planted_codes(n_tokens, n_features, seed=n_features)
    atoms = planted_atoms(n_features, d, seed=n_features)
    kind = assert_matches_reference(z, atoms, chunk_elements=chunk_elements)
    assert (kind == HIERARCHY).any() and (kind == COMPLEMENTARY).any()


def test_planted_structures_are_classified():
    z = planted_codes(400, 30, seed=3)
    atoms = planted_atoms(30, 8, seed=3)
    got = pair_violations(to_csr(z), atoms, z.double().mean(0))
    rows = zip(got.i.tolist(), got.j.tolist(), got.kind.tolist(), got.bound.tolist())
    by_pair = {(i, j): (kind, bound) for i, j, kind, bound in rows}
    assert by_pair[(0, 1)] == (HIERARCHY, 0.0)  # strict hierarchy: M = 0
    assert by_pair[(0, 2)] == (HIERARCHY, 0.25)  # non-strict: only weak firings without the parent
    assert by_pair[(4, 3)] == (COMPLEMENTARY, 2.0)
    assert (0, 8) not in by_pair  # the tied top token with the parent off gives M = max = 4
    assert not ((got.i == 5).any() or (got.j == 6).any())  # A_5 empty; dead j
    assert not (((got.i == 10) & (got.j == 11)) | ((got.i == 11) & (got.j == 10))).any()


@settings(max_examples=75, deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda n: st.integers(2, 7).flatmap(
            lambda k: st.tuples(
                st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0]), min_size=n * k, max_size=n * k).map(
                    lambda v, n=n, k=k: torch.tensor(v, dtype=torch.float64).reshape(n, k)
                ),
                st.lists(st.integers(0, 5), min_size=k, max_size=k),
                st.sampled_from([1, 3, 1 << 21]),
                st.sampled_from([torch.float32, torch.float64]),
            )
        )
    )
)
def test_matches_dense_reference_on_tiny_codes(case):
    """Exhaustive-style: ties, zero columns, always-on columns, rho in {-1, 0, 1} exactly."""
    z, atom_choice, chunk_elements, dtype = case
    basis = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0.6, 0.8], [0.6, -0.8], [1.0, 0]], dtype=torch.float64)
    assert_matches_reference(z.to(dtype), basis[atom_choice], chunk_elements=chunk_elements)


def test_tolerances_are_respected():
    z = planted_codes(300, 20, seed=5)
    atoms = planted_atoms(20, 6, seed=5)
    assert_matches_reference(z, atoms, rel_tol=0.2)
    assert_matches_reference(z, atoms, abs_tol=0.05)
    assert len(pair_violations(to_csr(z), atoms, z.double().mean(0), abs_tol=1e3)) == 0


def test_float32_codes_and_atoms():
    z = planted_codes(300, 50, seed=7).float()
    atoms = planted_atoms(50, 8, seed=7).float()
    got = pair_violations(to_csr(z), atoms, z.double().mean(0))
    assert got.bound.dtype == got.rho.dtype == torch.float64
    kind, _, _ = expected_violations(z, atoms)
    assert set(zip(got.i.tolist(), got.j.tolist())) == set(map(tuple, kind.nonzero().tolist()))


def test_no_tokens_and_no_violations():
    empty = pair_violations(to_csr(torch.zeros(0, 4)), unit(torch.randn(4, 3)), torch.zeros(4, dtype=torch.float64))
    assert len(empty) == 0 and empty.i.dtype == torch.int64 and empty.margin.dtype == torch.float64


def test_inputs_are_checked():
    z = planted_codes(50, 12, seed=1)
    csr, atoms, mu = to_csr(z), planted_atoms(12, 4, seed=1), z.double().mean(0)
    with pytest.raises(ValueError, match="mu does not match"):
        pair_violations(csr, atoms, mu + 1e-3)
    with pytest.raises(ValueError, match="atoms"):
        pair_violations(csr, atoms[:5], mu)
    with pytest.raises(ValueError, match="non-finite"):
        pair_violations(csr, torch.full_like(atoms, float("nan")), mu)
    with pytest.raises(ValueError, match="nonnegative"):
        pair_violations(CSR(csr.token_index, csr.crow, csr.col, -csr.val, 12), atoms, mu)
    unsorted = CSR(csr.token_index, csr.crow, csr.col.flip(0), csr.val, 12)
    with pytest.raises(ValueError, match="sorted"):
        pair_violations(unsorted, atoms, mu)


def test_co_counts_match_dense_products():
    z = planted_codes(300, 60, seed=2)
    on = (z != 0).double()
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, 60, (2, 500), generator=g)
    want = (on.T @ on).long()[i, j]
    assert torch.equal(co_counts(to_csr(z), i, j), want)
    assert torch.equal(co_counts(to_csr(z), i, j, chunk_elements=64), want)


def test_pair_bounds_dense_matches_definition():
    g = torch.Generator().manual_seed(4)
    z = torch.where(torch.rand(30, 6, generator=g) < 0.5, torch.rand(30, 6, generator=g), 0.0)
    z[:, 2] = 1.0  # A_2 empty
    upper, lower, both_off = pair_bounds_dense(z, chunk_elements=12)
    off = (z == 0)[:, :, None]  # (n, i, 1)
    values = z[:, None, :].double()  # (n, 1, j)
    assert torch.equal(both_off, (off & (z == 0)[:, None, :]).any(0))
    want_upper = torch.where(off, values, -torch.inf).amax(0)
    want_lower = torch.where(off, values, torch.inf).amin(0)
    want_upper[2], want_lower[2] = torch.nan, torch.nan
    torch.testing.assert_close(upper, want_upper, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lower, want_lower, rtol=0, atol=0, equal_nan=True)


def large_dictionary_case(n_features: int = 50_000, n_tokens: int = 96, d: int = 64):
    """K = 50,000 with a few frequent features, so that every path (the Gram columns of dense j,
    the complementary candidates over all i, the walks) runs over the whole dictionary."""
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(n_tokens, n_features)
    active = torch.randint(0, n_features, (n_tokens, 24), generator=g)
    z.scatter_(1, active, torch.randint(1, 4, (n_tokens, 24), generator=g).float())
    z[:, 0] = 1.0 + torch.rand(n_tokens, generator=g)  # on everywhere
    z[: n_tokens - 2, 1] = 1.0 + 2 * torch.rand(n_tokens - 2, generator=g)  # on nearly everywhere
    return to_csr(z), unit(torch.randn(n_features, d, generator=g)), z.double().mean(0)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_no_k_by_k_tensor_and_peak_memory_far_below_k_squared_at_large_k():
    csr, atoms, mu = large_dictionary_case()
    n_features = csr.n_features
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    rss_before = _status_kib("VmRSS")
    with LargestTensor() as watch:
        got = pair_violations(csr, atoms, mu)
    peak_delta = (_status_kib("VmHWM") - rss_before) * 1024
    assert len(got) > 0
    assert watch.largest <= 4 * (1 << 21)  # a few chunks, nowhere near K * K = 2.5e9 elements
    assert peak_delta < n_features * n_features * 4 / 20  # 0.5 GB; a float32 K x K is 10 GB


def _status_kib(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])
