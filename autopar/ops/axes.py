"""Mesh axes by name: generated code says `'tp'`, this registry says which process group.

The generated source reads `redistribute(x, 'tp', 'P', 'R', 'R')` instead of carrying
process-group objects; `bind_axis` (or `bound_axes`, for a block of code) says what
`'tp'` means on this rank. The axis is resolved when the forward runs and kept for
its backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from autopar.errors import AutoparError


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


def current_axes() -> dict[str, Axis]:
    """The axes bound now (a recomputed region binds them again in backward)."""
    return dict(_AXES)


def get_axis(axis: str) -> Axis:
    try:
        return _AXES[axis]
    except KeyError:
        raise AutoparError(
            f"mesh axis {axis!r} is not bound to a process group (bound: {sorted(_AXES)}); "
            f"call autopar.ops.bind_axis({axis!r}, group) before running generated code, "
            "or run it through ParallelModule"
        ) from None
