"""Autograd-aware collectives that generated code calls by name.

Each public function takes the mesh axis it communicates over as a string
(`"tp"`), resolved through a small registry (`bind_axis`) so that the generated
source reads `all_reduce(mm_3, 'tp')` instead of carrying process-group objects.
The axis is resolved when the forward runs and kept for the backward.

Forward and backward of each op follow the table in docs/architecture.md:

    all_gather        S(d) -> R     backward: take local chunk
    all_reduce        P -> R        backward: identity
    reduce_scatter    P -> S(d)     backward: all-gather
    shard_local       R -> S(d)     backward: all-gather
    all_to_all        S(d) -> S(d') backward: all-to-all back
    copy_to_parallel  R -> R        backward: all-reduce (Megatron's f)

`groups` is the block count of `Shard(dim, groups)` (see runtime/layout.py).
Backends without native reduce-scatter or all-to-all fall back to all-reduce or
all-gather plus a local slice; the fallback is remembered per backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.runtime.layout import dim_order, join_chunks, take_chunk, with_dim_order

__all__ = [
    "Axis",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "bind_axis",
    "bound_axes",
    "copy_to_parallel",
    "get_axis",
    "reduce_scatter",
    "shard_local",
    "unbind_axis",
]


@dataclass(frozen=True)
class Axis:
    """One mesh axis as the collectives see it: its process group, size and our rank."""

    name: str
    group: dist.ProcessGroup | None
    size: int
    rank: int


_AXES: dict[str, Axis] = {}


def bind_axis(axis: str, group: dist.ProcessGroup | None = None) -> Axis:
    """Make `axis` resolve to `group` (None: the default group, or a single rank)."""
    if dist.is_available() and dist.is_initialized():
        bound = Axis(axis, group, dist.get_world_size(group), dist.get_rank(group))
    elif group is None:
        bound = Axis(axis, None, 1, 0)
    else:
        raise AutoparError(f"cannot bind axis {axis!r}: torch.distributed is not initialized")
    _AXES[axis] = bound
    return bound


def unbind_axis(axis: str) -> None:
    _AXES.pop(axis, None)


@contextmanager
def bound_axes(groups: dict[str, Axis | dist.ProcessGroup | None]) -> Iterator[None]:
    """Bind axes (to an `Axis` or a process group) for a block, then restore the old ones."""
    previous = {axis: _AXES.get(axis) for axis in groups}
    try:
        for axis, group in groups.items():
            if isinstance(group, Axis):
                _AXES[axis] = group
            else:
                bind_axis(axis, group)
        yield
    finally:
        for axis, old in previous.items():
            if old is None:
                unbind_axis(axis)
            else:
                _AXES[axis] = old


def get_axis(axis: str) -> Axis:
    try:
        return _AXES[axis]
    except KeyError:
        raise AutoparError(
            f"mesh axis {axis!r} is not bound to a process group (bound: {sorted(_AXES)}); "
            f"call autopar.runtime.collectives.bind_axis({axis!r}, group) before running "
            "generated code, or run it through ParallelModule"
        ) from None


# --- raw (non-autograd) collectives ----------------------------------------------------

_UNSUPPORTED: set[tuple[str, str]] = set()

# Newer torch renames the flat-buffer collectives `*_single`; older has `*_tensor`.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _backend(axis: Axis) -> str:
    return str(dist.get_backend(axis.group))


def _try_native(op: str, axis: Axis, native, fallback) -> torch.Tensor:
    """Run `native()`; if the backend says it lacks the op, remember that and use `fallback()`."""
    key = (_backend(axis), op)
    if key not in _UNSUPPORTED:
        try:
            return native()
        except (RuntimeError, NotImplementedError) as error:
            text = str(error).lower()
            if "support" not in text and "implement" not in text:
                raise
            _UNSUPPORTED.add(key)
    return fallback()


def _in_layout_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` with the dimension order in memory of `x`.

    Later view nodes were traced against the producer's strides (sdpa, for one,
    returns its output in the layout of its query); a contiguous collective
    output would make such a view fail.
    """
    if x.is_contiguous() or out.dim() != x.dim():
        return out
    return with_dim_order(out, dim_order(x))


def _gather(x: torch.Tensor, dim: int, groups: int, axis: Axis) -> torch.Tensor:
    if axis.size == 1:
        return x
    local = x.contiguous()
    gathered = local.new_empty(axis.size * local.numel())
    _ALL_GATHER_SINGLE(gathered, local.view(-1), group=axis.group)
    return join_chunks(gathered.view(axis.size, *local.shape).unbind(0), dim, groups)


def _reduce(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    if axis.size == 1:
        return x
    summed = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed, group=axis.group)
    return summed


def _chunk(x: torch.Tensor, dim: int, groups: int, axis: Axis) -> torch.Tensor:
    return take_chunk(x, dim, groups, axis.rank, axis.size)


def _reduce_scatter(x: torch.Tensor, dim: int, groups: int, axis: Axis) -> torch.Tensor:
    if axis.size == 1:
        return x

    def native() -> torch.Tensor:
        chunks = [take_chunk(x, dim, groups, r, axis.size) for r in range(axis.size)]
        out = chunks[0].new_empty(chunks[0].shape)
        flat = torch.cat([chunk.view(-1) for chunk in chunks])
        _REDUCE_SCATTER_SINGLE(out.view(-1), flat, group=axis.group)
        return out

    return _try_native(
        "reduce_scatter", axis, native, lambda: _chunk(_reduce(x, axis), dim, groups, axis)
    )


def _all_to_all(x: torch.Tensor, gather_dim: int, scatter_dim: int, axis: Axis) -> torch.Tensor:
    if axis.size == 1:
        return x

    def native() -> torch.Tensor:
        inputs = [c.contiguous() for c in x.chunk(axis.size, scatter_dim)]
        outputs = [torch.empty_like(inputs[0]) for _ in inputs]
        dist.all_to_all(outputs, inputs, group=axis.group)
        return torch.cat(outputs, gather_dim)

    def fallback() -> torch.Tensor:
        return _chunk(_gather(x, gather_dim, 1, axis), scatter_dim, 1, axis)

    return _try_native("all_to_all", axis, native, fallback)


# --- autograd functions ----------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, groups, axis):
        ctx.args = (dim, groups, axis)
        return _in_layout_of(_gather(x, dim, groups, axis), x)

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, *ctx.args), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        return _in_layout_of(_reduce(x, axis), x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, groups, axis):
        ctx.args = (dim, groups, axis)
        return _in_layout_of(_reduce_scatter(x, dim, groups, axis), x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, *ctx.args), None, None, None


class _ShardLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, groups, axis):
        ctx.args = (dim, groups, axis)
        return _in_layout_of(_chunk(x, dim, groups, axis), x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, *ctx.args), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gather_dim, scatter_dim, axis):
        ctx.args = (gather_dim, scatter_dim, axis)
        return _in_layout_of(_all_to_all(x, gather_dim, scatter_dim, axis), x)

    @staticmethod
    def backward(ctx, grad):
        gather_dim, scatter_dim, axis = ctx.args
        return _all_to_all(grad, scatter_dim, gather_dim, axis), None, None, None


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.axis), None


# --- what generated code calls ---------------------------------------------------------


def all_gather(x: torch.Tensor, dim: int, groups: int, axis: str) -> torch.Tensor:
    """S(dim, groups) -> R: concatenate every rank's chunks in block-interleaved order."""
    return _AllGather.apply(x, dim, groups, get_axis(axis))


def all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """P -> R: sum the ranks' summands. Backward is the identity (each summand's grad is whole)."""
    return _AllReduce.apply(x, get_axis(axis))


def reduce_scatter(x: torch.Tensor, dim: int, groups: int, axis: str) -> torch.Tensor:
    """P -> S(dim, groups): sum the summands and keep this rank's chunk."""
    return _ReduceScatter.apply(x, dim, groups, get_axis(axis))


def shard_local(x: torch.Tensor, dim: int, groups: int, axis: str) -> torch.Tensor:
    """R -> S(dim, groups): keep this rank's chunk; no communication in forward."""
    return _ShardLocal.apply(x, dim, groups, get_axis(axis))


def all_to_all(x: torch.Tensor, gather_dim: int, scatter_dim: int, axis: str) -> torch.Tensor:
    """S(gather_dim) -> S(scatter_dim): swap which dimension is split over the ranks."""
    return _AllToAll.apply(x, gather_dim, scatter_dim, get_axis(axis))


def copy_to_parallel(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce backward.

    A node that computes only its rank's part of the output sees a replicated
    input whose local gradient is one rank's summand; this sums the summands.
    """
    return _CopyToParallel.apply(x, get_axis(axis))
