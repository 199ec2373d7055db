"""ZeRO stages 1 and 2 over the data-parallel axis (Rajbhandari et al., SC'20).

Each dp rank owns 1/dp of every parameter it holds (its tp shard, flattened, the last
rank's tail padded: `ops.zero.dp_slice`, the layout ZeRO-3's slots store too): `DataParallelShards.shards` are those slices as parameters, the
only ones the optimizer sees, so any torch.optim optimizer keeps only its share of
the states. After backward, `scatter_grads` reduce-scatters the gradients over dp
(their mean) into the slices' `.grad` and drops the full gradients (ZeRO-2 keeps
only the slice; ZeRO-1 is the same traffic, priced with the full gradients kept);
before the next forward, `gather_params` all-gathers the updated slices back into
the parameters the graph reads, once per optimizer step. One collective per dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from autopar.ops.zero import all_gather_slices, dp_slice, reduce_scatter_slices
from autopar.runtime.state import DpSlices, gather_slices


class DataParallelShards(nn.Module):
    """This dp rank's slice of each of `params`, kept in step with them."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, rank: int, size: int):
        super().__init__()
        self.params, self.group, self.rank, self.size = params, group, rank, size
        self.slicing = DpSlices(group, rank, size)
        self.shards = nn.ParameterList(
            nn.Parameter(dp_slice(p.detach(), rank, size), p.requires_grad) for p in params
        )
        self._versions = self._current_versions()

    def _current_versions(self) -> list[int]:
        return [shard._version for shard in self.shards]

    def _by_dtype(self, with_grad: bool = False) -> dict[torch.dtype, list[int]]:
        found: dict[torch.dtype, list[int]] = {}
        for index, param in enumerate(self.params):
            if not with_grad or param.grad is not None:
                found.setdefault(param.dtype, []).append(index)
        return found

    def scatter_grads(self) -> None:
        """Sum over dp of every gradient (the mean: each replica's loss was divided by dp),
        this rank's slice into each shard's `.grad` (a parameter the step left without
        gradient, the same on every replica, keeps none)."""
        for indices in self._by_dtype(with_grad=True).values():
            grads = [self.params[i].grad for i in indices]
            pieces = reduce_scatter_slices(grads, self.group, self.size)
            for i, piece in zip(indices, pieces, strict=True):
                self.shards[i].grad = piece.clone()
                self.params[i].grad = None

    def gather_params(self, force: bool = False) -> None:
        """Copy the slices back into the full parameters, if the optimizer changed them."""
        if not force and self._current_versions() == self._versions:
            return
        for indices in self._by_dtype().values():
            slices = [self.shards[i] for i in indices]
            shapes = [self.params[i].shape for i in indices]
            full = all_gather_slices(slices, shapes, self.group, self.size)
            with torch.no_grad():
                for i, value in zip(indices, full, strict=True):
                    self.params[i].copy_(value)
        self._versions = self._current_versions()

    def reset_from_params(self) -> None:
        """After the full parameters were loaded: each shard takes its slice again."""
        with torch.no_grad():
            for shard, param in zip(self.shards, self.params, strict=True):
                shard.copy_(dp_slice(param.detach(), self.rank, self.size))
        self._versions = self._current_versions()

    def gathered_grads(self) -> list[torch.Tensor | None]:
        """Each parameter's full (mean) gradient, rebuilt from every rank's slice."""
        return [
            None if shard.grad is None else gather_slices(shard.grad, self.slicing, param.shape)
            for shard, param in zip(self.shards, self.params, strict=True)
        ]
