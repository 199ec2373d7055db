"""ZeRO stage 3 in generated code: parameters held as dp slices, gathered per block.

Under ZeRO-3 (Rajbhandari et al., SC'20; FSDP's full sharding) each dp rank stores
1/dp of every parameter (its tp shard, flattened, padded at the tail: `ops.layout`'s
chunking). The generated graph reads those slices and calls `gather_params` once
per block, just before the block's first use: one all-gather over the dp axis
rebuilds the block's parameters, and in backward one reduce-scatter turns their
gradients into the gradients of the slices (summed over dp), so no rank ever holds
a full gradient.

Between a block's forward and its backward its gathered parameters are not kept:
`regathered_in_backward()` (around the forward) makes autograd save a handle
instead of a gathered parameter (or a view of one) and all-gather it again when
the block's backward needs it (FSDP's reshard-after-forward). Blocks recomputed in
full do so by themselves: their gather runs again with their forward.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from autopar.ops.axes import Axis, get_axis
from autopar.ops.layout import join_chunks, pad_to, padded, take_chunk


def dp_slice(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of `full` flattened (the last ranks' tails are zero padding), in
    storage of its own: the full tensor is not kept alive by it."""
    return take_chunk(full.reshape(-1), 0, 1, rank, size).clone()


def joined(slices: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The tensor of `shape` whose dp slices are `slices` (inverse of `dp_slice`)."""
    return join_chunks(list(slices), 0, 1, size=math.prod(shape)).view(tuple(shape))


def all_gather_slices(slices: Sequence[torch.Tensor], shapes, group, size: int):
    """The tensors of `shapes` whose dp slices over `group` (`size` ranks) this rank holds
    as `slices`: one all-gather of them concatenated; new contiguous tensors."""
    mine = torch.cat([s.detach().reshape(-1) for s in slices])
    rows = mine.new_empty(size * mine.numel())
    dist.all_gather_single(rows, mine, group=group)
    chunks = [s.numel() for s in slices]
    parts = rows.view(size, mine.numel()).split(chunks, dim=1)
    return [joined(list(part), shape) for part, shape in zip(parts, shapes, strict=True)]


def reduce_scatter_slices(grads: Sequence[torch.Tensor], group, size: int):
    """This rank's dp slice of each of `grads` summed over `group` (`size` ranks): one
    reduce-scatter of their padded rows side by side; views of one new buffer."""
    chunks = [padded(g.numel(), size) // size for g in grads]
    rows = [
        pad_to(g.reshape(-1), 0, chunk * size).view(size, chunk)
        for g, chunk in zip(grads, chunks, strict=True)
    ]
    full = torch.cat(rows, dim=1).contiguous()  # (dp, sum of chunks): rank r's row
    mine = full.new_empty(full.shape[1])
    dist.reduce_scatter_single(mine, full.view(-1), group=group)
    return list(mine.split(chunks))


def _gather(axis: Axis, shapes, slices):
    return all_gather_slices(slices, shapes, axis.group, axis.size)


class _Gathered:
    """What backward needs to rebuild one call's parameters: the call's arguments."""

    def __init__(self, axis: Axis, shapes, slices):
        self.axis, self.shapes, self.slices = axis, shapes, slices
        self._again: list[torch.Tensor] | None = None

    def again(self) -> list[torch.Tensor]:
        """The parameters gathered once more (once per backward of the block)."""
        if self._again is None:
            self._again = _gather(self.axis, self.shapes, self.slices)
        return self._again

    def release(self) -> None:
        self._again = None


class _GatherParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, axis: Axis, shapes, *slices):
        full = _gather(axis, shapes, slices)
        ctx.axis = axis
        ctx.handle = _Gathered(axis, shapes, [s.detach() for s in slices])
        for index, value in enumerate(full):
            if _HOOKED:  # else nothing would clear it (a recomputed forward in backward)
                root = _root(value)
                _REGISTRY[id(root)] = (weakref.ref(root), ctx.handle, index)
        return tuple(full)

    @staticmethod
    def backward(ctx, *grads):
        ctx.handle.release()
        return None, None, *reduce_scatter_slices(grads, ctx.axis.group, ctx.axis.size)


def gather_params(axis: str, shapes: Sequence[Sequence[int]], *slices: torch.Tensor):
    """The parameters of `shapes` rebuilt from this rank's dp `slices` over mesh `axis`;
    their gradients reach the slices reduce-scattered (summed over the axis)."""
    return _GatherParams.apply(get_axis(axis), tuple(map(tuple, shapes)), *slices)


_HOOKED: list[bool] = []  # one entry per `regathered_in_backward` now entered
# id(storage root of a gathered parameter) -> (weak reference to it, its call's handle,
# the parameter's index in the call)
_REGISTRY: dict[int, tuple[weakref.ref, _Gathered, int]] = {}


class _Regather:
    """A saved gathered parameter (or a view of one), as a recipe to rebuild it: the same
    view of the same storage layout, which gathering again reproduces."""

    def __init__(self, handle: _Gathered, index: int, view: torch.Tensor):
        self.handle, self.index = handle, index
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def value(self) -> torch.Tensor:
        base = self.handle.again()[self.index]
        return base.as_strided(self.size, self.stride, self.offset)


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage `tensor` views (itself if it views none)."""
    return tensor if tensor._base is None else tensor._base


def _pack(tensor: torch.Tensor):
    base = _root(tensor)
    found = _REGISTRY.get(id(base))
    if found is not None and found[0]() is base:
        return _Regather(found[1], found[2], tensor)
    return tensor


def _unpack(saved):
    return saved.value() if isinstance(saved, _Regather) else saved


@contextmanager
def regathered_in_backward(active: bool = True) -> Iterator[None]:
    """Around a forward that calls `gather_params`: autograd keeps no gathered parameter
    for backward (it gathers them again there). Inactive, it does nothing (and costs
    nothing per saved tensor)."""
    if not active:
        yield
        return
    _HOOKED.append(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _HOOKED.pop()
        if not _HOOKED:
            _REGISTRY.clear()
