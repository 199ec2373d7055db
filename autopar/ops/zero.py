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

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from autopar.ops.axes import Axis, get_axis
from autopar.ops.layout import join_chunks, padded


def dp_slice(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of `full` flattened (the last ranks' tails are zero padding)."""
    flat = full.reshape(-1)
    chunk = padded(flat.numel(), size) // size
    piece = flat[rank * chunk : (rank + 1) * chunk]
    missing = chunk - piece.numel()
    return torch.cat([piece, piece.new_zeros(missing)]) if missing else piece.clone()


def joined(slices: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The tensor of `shape` whose dp slices are `slices` (inverse of `dp_slice`)."""
    numel = 1
    for size in shape:
        numel *= size
    return join_chunks(list(slices), 0, 1, size=numel).view(tuple(shape))


def _gather(axis: Axis, shapes: Sequence[Sequence[int]], slices: Sequence[torch.Tensor]):
    """One all-gather of the concatenated slices; the full parameters (contiguous)."""
    mine = torch.cat([s.detach().reshape(-1) for s in slices])
    rows = mine.new_empty(axis.size * mine.numel())
    dist.all_gather_single(rows, mine, group=axis.group)
    rows = rows.view(axis.size, mine.numel())
    chunks = [s.numel() for s in slices]
    return [
        joined(list(part), shape)
        for part, shape in zip(rows.split(chunks, dim=1), shapes, strict=True)
    ]


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
        ctx.axis, ctx.chunks = axis, [s.numel() for s in slices]
        ctx.handle = _Gathered(axis, shapes, [s.detach() for s in slices])
        for index, value in enumerate(full):
            if _HOOKED:  # else nothing would clear it (a recomputed forward in backward)
                root = _root(value)
                _REGISTRY[id(root)] = (weakref.ref(root), ctx.handle, index)
        return tuple(full)

    @staticmethod
    def backward(ctx, *grads):
        ctx.handle.release()
        rows = [
            _padded_rows(g, full_chunk, ctx.axis.size)
            for g, full_chunk in zip(grads, ctx.chunks, strict=True)
        ]
        full = torch.cat(rows, dim=1).contiguous()  # (dp, sum of chunks): rank r's row
        mine = full.new_empty(full.shape[1])
        dist.reduce_scatter_single(mine, full.view(-1), group=ctx.axis.group)
        return None, None, *mine.split(ctx.chunks)


def _padded_rows(grad: torch.Tensor, chunk: int, size: int) -> torch.Tensor:
    flat = grad.reshape(-1)
    missing = chunk * size - flat.numel()
    flat = torch.cat([flat, flat.new_zeros(missing)]) if missing else flat
    return flat.view(size, chunk)


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
