"""The vocabulary of sharding rules: how an op's dims line up with its inputs' dims.

Every op family describes itself as an `OpSpec` (the einsum view of an op, as in
Alpa and DTensor): which output dims carry a shard through from which input dims
(`links`), which input dims are summed over (`contractions`: shard them and the
output is Partial), and which mixes of Partial and Replicate inputs a linear op
passes through as Partial (`partial_inputs`). `enumerate_strategies` turns a spec
into concrete `Strategy` values for a tensor-parallel degree; the rules stay data.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.placement import Partial, Placement, Replicate, Shard
from autopar.reshard import input_gradient

R, P = Replicate(), Partial()
BATCH, SEQUENCE = "batch", "sequence"


@dataclass(frozen=True)
class Strategy:
    """One way to run a node: what it produces and what it needs to see on each input."""

    output: Placement
    inputs: tuple[Placement, ...]  # one per node.all_input_nodes, in that order
    # collectives the op's own sharded form runs, (kind, bytes of the full value), forward
    # (the vocabulary-parallel cross-entropy's per-token reductions: ops/vocab.py)
    collectives: tuple[tuple[str, int], ...] = ()

    @property
    def splits_work(self) -> bool:
        """True when each rank does 1/tp of the node's arithmetic."""
        return not isinstance(self.output, Replicate) or any(
            not isinstance(p, Replicate) for p in self.inputs
        )

    def input_grad(self, slot: int) -> Placement:
        """The placement in which this strategy hands back input `slot`'s gradient."""
        return input_gradient(self.inputs[slot], isinstance(self.output, Replicate))

    def __str__(self) -> str:
        return f"{self.output} <- ({', '.join(str(p) for p in self.inputs)})"


@dataclass(frozen=True)
class DimLink:
    """Output dim `out_dim` is sharded exactly when each input is sharded on its `in_dims` entry.

    `in_dims[i] is None` means input i does not have this dim (broadcast or absent)
    and stays replicated. `keeps_groups` says a block-interleaved shard may pass.
    A link that is not `shardable` only says where the dim comes from (an inner dim
    of a reshaped group, a sequence dim attention needs whole): dim roles follow it.
    """

    out_dim: int
    in_dims: tuple[int | None, ...]
    keeps_groups: bool = True
    shardable: bool = True


@dataclass(frozen=True)
class BatchMajor:
    """The role of a dim merged from `groups` batch rows (outermost) and role-less inner
    dims (Bloom's batch x heads): tp may split it within each row, as
    `Shard(dim, groups)`, never across rows (strategies/roles.py)."""

    groups: int


@dataclass(frozen=True)
class OpSpec:
    links: tuple[DimLink, ...] = ()
    contractions: tuple[tuple[int | None, ...], ...] = ()
    partial_inputs: tuple[tuple[Placement, ...], ...] = ()
    extra: tuple[Strategy, ...] = ()  # strategies no link can say, e.g. split's grouped shard


@dataclass(frozen=True)
class NodeShapes:
    """Shapes a rule needs: the node's output and each input node's output."""

    out: tuple[int, ...]
    inputs: tuple[tuple[int, ...] | None, ...]
    out_roles: tuple  # per output dim: "batch", "sequence", a BatchMajor or None
    kept_roles: frozenset = frozenset({"batch"})  # roles whose dims tp may not shard
    in_roles: tuple = ()  # per input: the role of each of its dims


def _divides(size: int, tp: int, groups: int) -> bool:
    return size % (tp * groups) == 0


def _pads(link: DimLink, shapes: NodeShapes, tp: int) -> bool:
    """May this link shard a dim that does not divide by tp, padded (a vocabulary)? Only
    when every linked input dim has the output dim's size: each index is then computed
    on its own, so the padding stays in the padded tail and never mixes into real values."""
    size = shapes.out[link.out_dim]
    same = all(d is None or shapes.inputs[i][d] == size for i, d in enumerate(link.in_dims))
    return same and size >= tp


def _link_strategies(spec: OpSpec, shapes: NodeShapes, tp: int, group_options) -> list:
    found = []
    for link in spec.links:
        role = shapes.out_roles[link.out_dim]
        if not link.shardable or role in shapes.kept_roles:
            continue  # batch dims belong to the data-parallel axis, not tp
        options = group_options(link.out_dim) if link.keeps_groups else (1,)
        if isinstance(role, BatchMajor):  # within each batch row only
            options = (role.groups,) if link.keeps_groups else ()
        for groups in options:
            sizes_ok = _divides(shapes.out[link.out_dim], tp, groups) and all(
                d is None or _divides(shapes.inputs[i][d], tp, groups)
                for i, d in enumerate(link.in_dims)
            )
            if not sizes_ok and not (groups == 1 and _pads(link, shapes, tp)):
                continue
            inputs = tuple(R if d is None else Shard(d, groups) for d in link.in_dims)
            found.append(Strategy(Shard(link.out_dim, groups), inputs))
    return found


def _contraction_strategies(spec: OpSpec, shapes: NodeShapes, tp: int) -> list:
    found = []
    for dims in spec.contractions:
        if all(d is None or shapes.inputs[i][d] % tp == 0 for i, d in enumerate(dims)):
            found.append(Strategy(P, tuple(R if d is None else Shard(d) for d in dims)))
    return found


def _fits(placement: Placement, shape: tuple[int, ...], tp: int, roles=None, kept=()) -> bool:
    """A placement an op-specific strategy may take: grouped shards divide, ungrouped ones
    may pad (every rank holds at least one real element)."""
    if not isinstance(placement, Shard):
        return True
    role = roles[placement.dim] if roles is not None else None
    if role in kept or isinstance(role, BatchMajor) and placement.groups != role.groups:
        return False
    size = shape[placement.dim]
    return size >= tp if placement.groups == 1 else _divides(size, tp, placement.groups)


def _extra_strategies(spec: OpSpec, shapes: NodeShapes, tp: int) -> list:
    return [
        s
        for s in spec.extra
        if _fits(s.output, shapes.out, tp, shapes.out_roles, shapes.kept_roles)
        and all(_fits(p, shape, tp) for p, shape in zip(s.inputs, shapes.inputs, strict=True))
    ]


def enumerate_strategies(spec: OpSpec, shapes: NodeShapes, tp: int, group_options) -> list:
    """All strategies of `spec` valid at degree `tp`; the replicated one comes first."""
    replicated = Strategy(R, tuple(R for _ in shapes.inputs))
    if tp == 1:
        return [replicated]  # one rank per tp group: nothing to split
    found = [replicated]
    found += _link_strategies(spec, shapes, tp, group_options)
    found += _contraction_strategies(spec, shapes, tp)
    found += [Strategy(P, inputs) for inputs in spec.partial_inputs]
    found += _extra_strategies(spec, shapes, tp)
    return list(dict.fromkeys(found))
