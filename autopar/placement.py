"""How a tensor is laid out over the axes of the mesh: the placement IR.

A plan's mesh has named axes, outermost first (`MESH_AXES`: data parallel, then
tensor parallel; pipeline stages split the graph, not tensors). On each axis a
tensor has one placement:

`Replicate()`: every rank holds the whole tensor. `Shard(dim, groups)`: rank r
holds chunk r of dimension `dim`; with `groups > 1` the dimension is first cut
into `groups` equal blocks and rank r holds chunk r of every block, the layout a
fused QKV projection needs so that a later split gives each rank its own heads. An
ungrouped dim that does not divide is padded (a 50,257-word vocabulary at tp=4 is
four shards of 12,565 rows, the last three rows padding: `ops.layout`).
`Partial()`: every rank holds a summand; the true value is the sum over ranks.
Placements print as "R", "S(1)", "S(1,g3)", "P" and parse back from that text.

A node of a plan carries one `NodePlacement` per axis: the placement of its output
and the placement in which it sees each of its inputs. The dp axis shards the batch
dims of activations by construction: each replica is fed its own rows, and the
traced shapes are one replica's, so a dp `Shard` of a batch dim is already the
traced size. Parameters are replicated on dp and their gradients are partial sums
over it until the gradient sync (the reshard table's `R -> R` entry with a `P`
gradient), which is where ZeRO's shards will go.
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
PlacementOrTuple = Placement | tuple[Placement, ...]

DP, TP = "dp", "tp"
MESH_AXES = (DP, TP)
PP = "pp"  # the pipeline axis: no placement names it, collectives over it do


@dataclass(frozen=True)
class NodePlacement:
    """How one node's output is laid out on one axis, and how it sees its inputs.

    `output` is a tuple for multi-output nodes such as `split` (their getitem
    nodes follow it); `inputs` lines up with `node.all_input_nodes`.
    """

    output: PlacementOrTuple
    inputs: tuple[Placement, ...] = ()

    def to_text(self) -> dict:
        output = self.output
        printed = [str(p) for p in output] if isinstance(output, tuple) else str(output)
        return {"output": printed, "inputs": [str(p) for p in self.inputs]}

    @classmethod
    def from_text(cls, data: dict) -> NodePlacement:
        output = data["output"]
        parsed = (
            tuple(parse_placement(p) for p in output)
            if isinstance(output, list)
            else parse_placement(output)
        )
        return cls(parsed, tuple(parse_placement(p) for p in data["inputs"]))

    @property
    def is_replicated(self) -> bool:
        outputs = self.output if isinstance(self.output, tuple) else (self.output,)
        return all(isinstance(p, Replicate) for p in (*outputs, *self.inputs))


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
    """The shape one rank holds of a tensor of global `shape` laid out as `placement` (an
    ungrouped shard of a dim that does not divide is padded: ceil(size / num_shards))."""
    if not isinstance(placement, Shard):
        return tuple(shape)
    dim = placement.dim % len(shape)
    assert placement.groups == 1 or shape[dim] % (num_shards * placement.groups) == 0
    return tuple(-(-size // num_shards) if d == dim else size for d, size in enumerate(shape))


def is_padded(shape: tuple[int, ...], placement: Placement, num_shards: int) -> bool:
    """Does this rank's shard carry padding (a dim that does not divide by num_shards)?"""
    return isinstance(placement, Shard) and shape[placement.dim % len(shape)] % num_shards != 0
