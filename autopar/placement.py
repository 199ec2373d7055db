"""How one tensor is laid out over the tensor-parallel axis of the mesh.

`Replicate()`: every rank holds the whole tensor. `Shard(dim, groups)`: rank r
holds chunk r of dimension `dim`; with `groups > 1` the dimension is first cut
into `groups` equal blocks and rank r holds chunk r of every block, the layout a
fused QKV projection needs so that a later split gives each rank its own heads.
`Partial()`: every rank holds a summand; the true value is the sum over ranks.
Placements print as "R", "S(1)", "S(1,g3)", "P" and parse back from that text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    groups: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.groups == 1 else f"S({self.dim},g{self.groups})"


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial

_SHARD_TEXT = re.compile(r"S\((-?\d+)(?:,g(\d+))?\)")


def parse_placement(text: str) -> Placement:
    """Inverse of str(placement)."""
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    match = _SHARD_TEXT.fullmatch(text)
    if match is None:
        raise ValueError(f"not a placement: {text!r} (expected R, P, S(d) or S(d,gN))")
    return Shard(int(match.group(1)), int(match.group(2) or 1))


def local_shape(shape: tuple[int, ...], placement: Placement, num_shards: int) -> tuple[int, ...]:
    """The shape one rank holds of a tensor of global `shape` laid out as `placement`."""
    if not isinstance(placement, Shard):
        return tuple(shape)
    dim = placement.dim % len(shape)
    assert shape[dim] % num_shards == 0, (shape, placement, num_shards)
    return tuple(size // num_shards if d == dim else size for d, size in enumerate(shape))
