"""Audits split across torch.distributed ranks (`torchrun --nproc_per_node N ...`).

When a default process group is initialised, `audit` and `audit_activations` stream only this
rank's share of the windows: window w goes to rank w % world_size. Which windows are held out
stays a property of the global window index, so the split changes nothing else. After each
pass the ranks combine their partial states so that every rank holds what one process
streaming all windows would hold:

- pass 1 (`merge_pass_one`): a LayerAudit's sums, minima and maxima by all_reduce; the parts
  no reduction combines (sparse codes, worst residuals, lam-estimate projections) by
  all_gather_object, merged as batches are, so the codes come out identical to one process's.
  Every rank then keeps all audit tokens' codes: the pair condition C2 needs them all.
- pass 2 (`merge_pass_two`): an AuditPlan's sums by all_reduce, its code-gap sample (the
  held-out tokens whose index hashes lowest) gathered and merged.

Counts, minima and maxima are then exactly a single process's, and so are the codes; float
sums differ only in the order of additions. The collectives run on the default group; with
NCCL, set each rank's CUDA device first (`torch.cuda.set_device(local_rank)`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from opt_hooks.engine import AuditPlan, LayerAudit


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def split(self) -> bool:
        return self.world_size > 1

    def own(self, windows: Tensor) -> Tensor:
        """Bool mask over global window indices: those this rank streams."""
        return windows % self.world_size == self.rank


def current_ranks() -> Ranks:
    """Rank and world size of the initialised default process group, else Ranks()."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def merge_pass_one(audit: LayerAudit) -> None:
    """Combine every rank's pass-1 statistics of this SAE, in place, on every rank."""
    stats = audit.stats
    stats.all_reduce()
    stats.merge_unreduced(_gather(stats.unreduced_state()))


def merge_pass_two(plan: AuditPlan) -> None:
    """Combine every rank's pass-2 state of this SAE, in place, on every rank: its sums by
    all_reduce, the code gap's token sample by all_gather_object."""
    plan.state.all_reduce()
    plan.state.merge_unreduced(_gather(plan.state.unreduced_state()))


def sum_over_ranks(count: int) -> int:
    return sum(_gather(count))


def _gather(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (pickled: gloo and NCCL alike)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@contextmanager
def process_group_from_env(device: str | None) -> Iterator[Ranks]:
    """Under torchrun (WORLD_SIZE > 1): join the default process group for the block, with
    NCCL on CUDA (each rank on cuda:LOCAL_RANK) and gloo otherwise; a no-op without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        yield current_ranks()
        return
    on_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method="env://", timeout=timedelta(minutes=30))
    try:
        yield current_ranks()
    finally:
        dist.destroy_process_group()
