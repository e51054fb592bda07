"""Rounding bounds of matrix products, for threshold tests that must come out as on exact products.

A threshold test on a product formed in a low-precision format is exact wherever the product lies
farther from the threshold than the format's rounding bound (`ProductFormat.dot_bound`); entries
closer than that are recomputed in a finer format. bfloat16 products run several times faster than
float32 ones on matrix units (AMX on recent Xeons, tensor cores on GPUs; `fast_format`), so a screen
in bfloat16 followed by float32 products of the few entries it leaves costs a fraction of a float32
pass, with the same result.

Pure tensor code: no TransformerLens / SAE-Lens import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.codes import csr_matrix, row_pointers

FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32, the accumulator of every format below
SUBNORMAL_SLACK = 2.0**-120  # per term: covers the absolute rounding error of subnormal numbers


@dataclass(frozen=True)
class ProductFormat:
    """Products with inputs and output rounded to `dtype` (unit roundoff `unit`), accumulated in
    float32."""

    dtype: torch.dtype
    unit: float

    def dot_bound(self, rows: Tensor) -> float:
        """A bound on |fl(<a, b>) - <a, b>| for any two rows a, b of `rows` (float32 or float64):
        each input rounded to the format (relative error u), each product rounded to float32 (v),
        their float32 sum in any order (gamma_d(v) = d v / (1 - d v), Higham), the output rounded to
        the format (u), so |error| <= ((1 + u)^3 (1 + v) (1 + gamma_d(v)) - 1) sum_k |a_k b_k|, and
        sum_k |a_k b_k| <= max ||a||^2; doubled for safety, plus a term for subnormal numbers."""
        d = rows.shape[1]
        u, v = self.unit, FLOAT32_UNIT
        gamma = d * v / (1 - d * v)
        relative = (1 + u) ** 3 * (1 + v) * (1 + gamma) - 1
        largest = float(rows.double().norm(dim=1).max()) if len(rows) else 0.0
        return 2 * relative * largest**2 + d * SUBNORMAL_SLACK * (1 + largest) ** 2


FLOAT32 = ProductFormat(torch.float32, FLOAT32_UNIT)
BFLOAT16 = ProductFormat(torch.bfloat16, 2.0**-8)


def fast_format(device: torch.device | str) -> ProductFormat:
    """bfloat16 where its products run on matrix units with float32 accumulation (CUDA devices of
    compute capability 8.0 and above; CPUs with AMX tiles through oneDNN), float32 elsewhere: on
    AVX2 or AVX-512 alone, bfloat16 products are no faster than float32 ones."""
    device = torch.device(device)
    if device.type == "cuda":
        return BFLOAT16 if torch.cuda.get_device_capability(device)[0] >= 8 else FLOAT32
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        onednn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        return BFLOAT16 if amx() and onednn_bf16() else FLOAT32
    return FLOAT32


class bounded_products:
    """Products as `ProductFormat` bounds them while a threshold test relies on the bound: float32
    products in full float32 (not TF32), bfloat16 products with float32 reductions on CUDA (no
    reduced-precision split-K sums)."""

    def __enter__(self) -> None:
        self.precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        self.reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.precision)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.reduced


def sampled_dots(left: Tensor, right: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """<left[rows[k]], right[cols[k]]> for every k, in float64, from a sampled product over the
    distinct (row, col) pairs (float products in the inputs' type, reduced per pair): gathering a
    row of each operand per pair cost about 20 times as much on CPU (150,000 pairs, d = 768)."""
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.float64, device=left.device)
    dtype = torch.promote_types(left.dtype, right.dtype)
    n_cols = right.shape[0]
    keys, inverse = torch.unique(rows * n_cols + cols, return_inverse=True)  # sorted: by row, then col
    crow = row_pointers(torch.bincount(keys // n_cols, minlength=left.shape[0]))
    pattern = csr_matrix(crow, keys % n_cols, torch.ones(len(keys), dtype=dtype, device=left.device), (left.shape[0], n_cols))
    dots = torch.sparse.sampled_addmm(pattern, left.to(dtype), right.to(dtype).T, beta=0.0).values()
    return dots.double()[inverse]
