"""Cut full tensors into the shard a rank stores, and put shards back together.

Used for parameters and buffers: `ParallelModule` slices the single-device state
into local shards with `shard_tensor`, and `full_state_dict` rebuilds full
tensors with `gather_full` (an all-gather, then `unshard`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.errors import PlanError
from autopar.ops.layout import join_chunks, take_chunk
from autopar.placement import Partial, Placement, Replicate, Shard


def _check_storable(placement: Placement) -> None:
    if isinstance(placement, Partial):
        raise PlanError(
            "a stored tensor (parameter or buffer) cannot be Partial: its value would be "
            "the sum over ranks; store it as Replicate or Shard"
        )


def shard_tensor(
    full: torch.Tensor, placement: Placement, rank: int, num_shards: int
) -> torch.Tensor:
    """The part of `full` that `rank` of `num_shards` stores under `placement` (a copy)."""
    _check_storable(placement)
    if isinstance(placement, Replicate) or num_shards == 1:
        return full.detach().clone()
    return take_chunk(full.detach(), placement.dim, placement.groups, rank, num_shards).clone()


def unshard(shards: list[torch.Tensor], placement: Placement, shape=None) -> torch.Tensor:
    """Rebuild the full tensor of global `shape` from every rank's shard, in rank order
    (`shape` drops the padding of a dim that does not divide; None: there is none)."""
    _check_storable(placement)
    if isinstance(placement, Replicate) or len(shards) == 1:
        return shards[0].clone()
    size = None if shape is None else shape[placement.dim % len(shape)]
    return join_chunks(shards, placement.dim, placement.groups, size)


def gather_full(
    local: torch.Tensor, placement: Placement, group: dist.ProcessGroup | None = None, shape=None
) -> torch.Tensor:
    """All-gather `local` over `group` and rebuild the full tensor of global `shape`."""
    _check_storable(placement)
    if not isinstance(placement, Shard) or not dist.is_initialized():
        return local.detach().clone()
    local = local.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local, group=group)
    return unshard(shards, placement, shape)
