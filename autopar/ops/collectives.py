"""The autograd-aware reshard that generated code calls: `redistribute(x, axis, src, dst, grad)`.

`redistribute` looks up its entry in the one reshard table (`autopar.reshard`) and
runs its forward steps on the value and its backward steps on the gradient, over
the process group bound to `axis` (`autopar.ops.axes`). So the steps the solver
priced and codegen emitted are the steps that run. Placements arrive as the text
they print as ("S(1)", "P"), which keeps the generated source readable.

Backends without native reduce-scatter or all-to-all fall back to all-reduce or
all-gather plus a local chunk; the fallback is remembered per backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.ops.axes import Axis, get_axis
from autopar.ops.layout import (
    dim_order,
    join_chunks,
    pad_to,
    padded,
    take_chunk,
    with_dim_order,
)
from autopar.reshard import Step, reshard_from_text

__all__ = ["redistribute", "run_steps"]


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


def _gather(x: torch.Tensor, dim: int, groups: int, axis: Axis, size=None) -> torch.Tensor:
    if axis.size == 1:
        return x
    local = x.contiguous()
    gathered = local.new_empty(axis.size * local.numel())
    _ALL_GATHER_SINGLE(gathered, local.view(-1), group=axis.group)
    return join_chunks(gathered.view(axis.size, *local.shape).unbind(0), dim, groups, size)


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
    if groups == 1:
        x = pad_to(x, dim % x.dim(), padded(x.shape[dim], axis.size))

    def native() -> torch.Tensor:
        chunks = [take_chunk(x, dim, groups, r, axis.size) for r in range(axis.size)]
        out = chunks[0].new_empty(chunks[0].shape)
        flat = torch.cat([chunk.view(-1) for chunk in chunks])
        _REDUCE_SCATTER_SINGLE(out.view(-1), flat, group=axis.group)
        return out

    return _try_native(
        "reduce_scatter", axis, native, lambda: _chunk(_reduce(x, axis), dim, groups, axis)
    )


def _all_to_all(x, gather_dim: int, scatter_dim: int, axis: Axis, shape=None) -> torch.Tensor:
    if axis.size == 1:
        return x
    if shape is not None:  # padded: the two dims' shards have other lengths
        full = _gather(x, gather_dim, 1, axis, shape[gather_dim])
        return _chunk(full, scatter_dim, 1, axis)

    def native() -> torch.Tensor:
        inputs = [c.contiguous() for c in x.chunk(axis.size, scatter_dim)]
        outputs = [torch.empty_like(inputs[0]) for _ in inputs]
        dist.all_to_all(outputs, inputs, group=axis.group)
        return torch.cat(outputs, gather_dim)

    def fallback() -> torch.Tensor:
        return _chunk(_gather(x, gather_dim, 1, axis), scatter_dim, 1, axis)

    return _try_native("all_to_all", axis, native, fallback)


# --- one table entry, forward and backward ----------------------------------------------


def _run_step(x: torch.Tensor, step: Step, axis: Axis, shape) -> torch.Tensor:
    if step.kind == "chunk":
        return _chunk(x, step.dim, step.groups, axis)
    if step.kind == "all_gather":
        return _gather(x, step.dim, step.groups, axis, None if shape is None else shape[step.dim])
    if step.kind == "all_reduce":
        return _reduce(x, axis)
    if step.kind == "reduce_scatter":
        return _reduce_scatter(x, step.dim, step.groups, axis)
    if step.kind == "all_to_all":
        return _all_to_all(x, step.dim, step.to_dim, axis, shape)
    raise AssertionError(f"unknown reshard step {step}")


def run_steps(x: torch.Tensor, steps: tuple[Step, ...], axis: Axis, shape=None) -> torch.Tensor:
    """Apply `steps` in order (no autograd); `x` itself when there are none. `shape` is
    the global shape when a sharded dim is padded (it does not divide), else None."""
    for step in steps:
        x = _run_step(x, step, axis, shape)
    return x


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, entry, axis, shape):
        ctx.entry, ctx.axis, ctx.shape = entry, axis, shape
        out = run_steps(x, entry.forward, axis, shape)
        return x.view_as(x) if out is x else _in_layout_of(out, x)

    @staticmethod
    def backward(ctx, grad):
        return run_steps(grad, ctx.entry.backward, ctx.axis, ctx.shape), None, None, None


def redistribute(x, axis: str, src: str, dst: str, grad: str | None, shape=None) -> torch.Tensor:
    """`x`, laid out as `src` on mesh axis `axis`, laid out as `dst`; its gradient arrives
    laid out as `grad` and leaves laid out as `src`'s gradient (autopar.reshard). `shape`,
    the global shape, is given where a sharded dim is padded."""
    entry = reshard_from_text(src, dst, grad)
    bound = get_axis(axis)
    if entry.is_identity or bound.size == 1:
        return x
    return _Redistribute.apply(x, entry, bound, None if shape is None else tuple(shape))
