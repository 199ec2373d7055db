"""The one reshard table: how a value changes placement on one mesh axis, forward and backward.

Every stage reads it: the solver prices an edge from it (`cost.comm.reshard_seconds`),
codegen inserts a `redistribute` call wherever it is not empty, and that call runs
exactly these steps (`autopar.ops.collectives`). Nothing else knows which collective
turns one placement into another.

A change of placement is a short list of `Step`s. Forward, the producer's placement
`src` becomes the placement `dst` the consumer sees:

    src -> dst        steps                  (S = Shard(d), S' = Shard(d') or another grouping)
    R   -> S          chunk                  keep this rank's part, no communication
    S   -> R          all_gather(d)
    P   -> R          all_reduce
    P   -> S          reduce_scatter(d)
    S   -> S'         all_to_all(d -> d')    one dim each, ungrouped
                      all_gather(d), chunk   otherwise
    x   -> x          nothing
    R or S -> P       impossible (None)

Backward, the gradient comes back in the placement the consumer computed it in
(`input_gradient`) and changes into the placement of the producer's gradient
(`gradient_placement`) by the same table. A replicated input of a consumer that
does only its rank's part of the work gets back one rank's summand (`P`), so
`R -> R` with a `P` gradient is Megatron's f (identity forward, all-reduce backward)
and `S -> R` with a `P` gradient is sequence parallelism's all-gather forward,
reduce-scatter backward. `S(d, g)` is the block-interleaved shard (placement.py).

One entry may wait: when the value's gradient goes to one parameter alone (the value
is the parameter read by one node, or made from it alone by a chain of one-input,
one-reader replicated nodes: a cast, Gemma's `1 + w`), Megatron's f on it is the sum of
that parameter's gradient over the axis (backward is linear, so a partial gradient
stays partial down the chain), which can run once per step, after every microbatch's
backward and together with the other such parameters (as Megatron-LM does for the
norm weights under sequence parallelism) instead of once per microbatch inside the
graph (`defers_to_step`, `sole_parameter`). Its price is then bandwidth only: the
bucket pays one latency per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.fx as fx

from autopar.placement import Partial, Placement, Replicate, Shard, parse_placement

FORWARD, BACKWARD = "forward", "backward"
COMMUNICATING = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")


@dataclass(frozen=True)
class Step:
    """One operation on one mesh axis: a collective, or `chunk` (local, free)."""

    kind: str  # "chunk" or one of COMMUNICATING
    dim: int | None = None  # the tensor dim gathered, scattered or chunked (all_to_all: from)
    groups: int = 1  # block count of the Shard(dim, groups) involved
    to_dim: int | None = None  # all_to_all: the dim that becomes sharded

    @property
    def communicates(self) -> bool:
        return self.kind in COMMUNICATING

    def __str__(self) -> str:
        if self.kind == "all_reduce":
            return "all_reduce"
        if self.kind == "all_to_all":
            return f"all_to_all({self.dim}->{self.to_dim})"
        grouped = f",g{self.groups}" if self.groups > 1 else ""
        return f"{self.kind}({self.dim}{grouped})"


@dataclass(frozen=True)
class Reshard:
    """The steps that turn a value from `src` into `dst`, and its gradient back."""

    forward: tuple[Step, ...]
    backward: tuple[Step, ...]

    @property
    def is_identity(self) -> bool:
        return not self.forward and not self.backward

    def collectives(self) -> list[tuple[str, Step]]:
        """(phase, step) for every step that communicates, forward first."""
        return [(FORWARD, s) for s in self.forward if s.communicates] + [
            (BACKWARD, s) for s in self.backward if s.communicates
        ]

    def __str__(self) -> str:
        forward = ", ".join(map(str, self.forward)) or "identity"
        backward = ", ".join(map(str, self.backward)) or "identity"
        return f"forward {forward}; backward {backward}"


def gradient_placement(placement: Placement) -> Placement:
    """Where a value's gradient lives: a shard's gradient is that shard; the gradient of a
    replicated or partial value is the whole gradient, on every rank."""
    return placement if isinstance(placement, Shard) else Replicate()


def input_gradient(seen: Placement, output_replicated: bool) -> Placement:
    """The placement in which a node hands back the gradient of an input it sees as `seen`.

    A node that computes only its rank's part of the output (sharded or partial) gets
    from a replicated input only its rank's summand of that input's gradient."""
    if isinstance(seen, Replicate) and not output_replicated:
        return Partial()
    return gradient_placement(seen)


def transition(src: Placement, dst: Placement) -> tuple[Step, ...] | None:
    """Steps turning a value laid out as `src` into `dst` (None: no collective can)."""
    if src == dst:
        return ()
    if isinstance(dst, Partial):
        return None
    if isinstance(src, Replicate):
        return (Step("chunk", dst.dim, dst.groups),)
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return (Step("all_reduce"),)
        return (Step("reduce_scatter", dst.dim, dst.groups),)
    gather = Step("all_gather", src.dim, src.groups)
    if isinstance(dst, Replicate):
        return (gather,)
    if src.dim != dst.dim and src.groups == dst.groups == 1:
        return (Step("all_to_all", src.dim, 1, dst.dim),)
    return (gather, Step("chunk", dst.dim, dst.groups))


def reshard(src: Placement, dst: Placement, grad: Placement | None) -> Reshard | None:
    """The table's entry for a value made as `src`, seen as `dst` by a consumer that hands
    back its gradient as `grad` (None: the value carries no gradient). None if impossible."""
    forward = transition(src, dst)
    if forward is None:
        return None
    if grad is None:
        return Reshard(forward, ())
    backward = transition(grad, gradient_placement(src))
    return None if backward is None else Reshard(forward, backward)


def sole_parameter(node: fx.Node, parameters) -> tuple[fx.Node, list[fx.Node]] | None:
    """The parameter that alone receives `node`'s gradient, and the nodes that make
    `node` from it (`node` first): `node` is the parameter or made from it by nodes of
    one input each, every one of them (the parameter too) read by one node. None if not."""
    chain = []
    while len(node.users) == 1:
        if node.name in parameters:
            return node, chain
        if node.op != "call_function" or len(node.all_input_nodes) != 1:
            return None
        chain.append(node)
        node = node.all_input_nodes[0]
    return None


def defers_to_step(entry: Reshard, parameter: fx.Node | None) -> bool:
    """Is this Megatron's f on a value whose gradient goes to `parameter` alone
    (`sole_parameter`)? Then that gradient is left partial in the graph and summed
    over the axis once per step."""
    return (
        parameter is not None
        and not entry.forward
        and [step.kind for step in entry.backward] == ["all_reduce"]
    )


@functools.lru_cache(maxsize=4096)
def reshard_from_text(src: str, dst: str, grad: str | None) -> Reshard:
    """`reshard` on printed placements, as generated code names them (cached: hot path)."""
    parsed_grad = None if grad is None else parse_placement(grad)
    found = reshard(parse_placement(src), parse_placement(dst), parsed_grad)
    if found is None:
        raise ValueError(f"no reshard turns {src} into {dst} (gradient {grad})")
    return found
