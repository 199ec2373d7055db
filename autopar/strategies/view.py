"""Views, reshapes, transposes, slices, splits and concatenation move a shard to a new dim.

None of them does arithmetic, so a Partial input stays Partial. A reshape maps
groups of input dims onto groups of output dims with equal products; a shard on
the outermost dim of a group lands on the outermost dim of its partner group. Heads
merged with the batch rows outside them become a block-interleaved shard of the merged
dim, one block per row (`_part_shards`).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from autopar.placement import Shard
from autopar.strategies.base import BATCH, BatchMajor, DimLink, NodeShapes, OpSpec, P, Strategy
from autopar.strategies.elementwise import broadcast_links

aten = torch.ops.aten
PASS_PARTIAL = ((P,),)


def get_arg(node: fx.Node, name: str):
    """The value of schema argument `name` of an ATen call node, default included."""
    arguments = node.target._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == name)
    if index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    return arguments[index].default_value if arguments[index].has_default_value() else None


def reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims whose sizes multiply to the same number."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) and j < len(out_shape):
        if in_shape[i] == 1 and out_shape[j] != 1:
            i += 1
            continue
        if out_shape[j] == 1 and in_shape[i] != 1:
            j += 1
            continue
        group_in, group_out = [i], [j]
        size_in, size_out = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out:
                group_in.append(i)
                size_in *= in_shape[i]
                i += 1
            else:
                group_out.append(j)
                size_out *= out_shape[j]
                j += 1
        groups.append((group_in, group_out))
    return groups


def _group_links(in_shape, out_shape) -> tuple[DimLink, ...]:
    links = []
    for ins, outs in reshape_groups(in_shape, out_shape):
        one_to_one = len(ins) == 1 and len(outs) == 1
        links.append(DimLink(outs[0], (ins[0],), keeps_groups=one_to_one))
        links += [DimLink(out, (ins[0],), shardable=False) for out in outs[1:]]
        links += [DimLink(outs[0], (inner,), shardable=False) for inner in ins[1:]]
    return tuple(links)


def _part_shards(in_shape, out_shape, in_roles) -> tuple[Strategy, ...]:
    """A shard of the heads a reshape merges with the batch rows outside them (Bloom's
    batch x heads) is the merged dim cut block-interleaved, one block per row; and back
    when a reshape splits the rows off again (strategies/roles.py)."""
    if len(in_roles) != len(in_shape):
        return ()
    found = []
    for ins, outs in reshape_groups(in_shape, out_shape):
        outer = in_roles[ins[0]]
        if len(outs) == 1 and len(ins) > 1 and outer == BATCH:
            found.append(Strategy(Shard(outs[0], in_shape[ins[0]]), (Shard(ins[1]),)))
        if len(ins) == 1 and isinstance(outer, BatchMajor):
            for k in range(1, len(outs)):
                if math.prod(out_shape[d] for d in outs[:k]) == outer.groups:
                    found.append(Strategy(Shard(outs[k]), (Shard(ins[0], outer.groups),)))
    return tuple(found)


def reshape_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    in_shape = shapes.inputs[0]
    return OpSpec(
        links=_group_links(in_shape, shapes.out),
        partial_inputs=PASS_PARTIAL,
        extra=_part_shards(in_shape, shapes.out, shapes.in_roles[0] if shapes.in_roles else ()),
    )


SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


def _split_counts_below(node: fx.Node) -> list[int]:
    """k for each equal k-way split of the output of a node that reads `node`."""
    counts = set()
    for split in (s for user in node.users for s in user.users if s.target in SPLITS):
        pieces = split.meta["val"]
        if len(pieces) > 1 and len({tuple(p.shape) for p in pieces}) == 1:
            counts.add(len(pieces))
    return sorted(counts)


def _permutation_rule(order: list[int], node: fx.Node | None = None) -> OpSpec:
    """Dim d of the output is dim order[d] of the input.

    A stored weight transposed for a matmul whose output is split in k equal parts
    (a mixture-of-experts layer's fused gate_up) may pass a block-interleaved shard:
    `_group_hints` walks up from the split along activations and never reaches it."""
    extra = ()
    if node is not None and node.args[0].op == "placeholder":
        extra = tuple(
            Strategy(Shard(d, groups), (Shard(src, groups),))
            for groups in _split_counts_below(node)
            for d, src in enumerate(order)
        )
    links = tuple(DimLink(d, (src,)) for d, src in enumerate(order))
    return OpSpec(links=links, partial_inputs=PASS_PARTIAL, extra=extra)


def transpose_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    rank = len(shapes.out)
    order = list(range(rank))
    a, b = node.args[1] % rank, node.args[2] % rank
    order[a], order[b] = order[b], order[a]
    return _permutation_rule(order, node)


def permute_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _permutation_rule([d % len(shapes.out) for d in node.args[1]], node)


def t_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # t and numpy_T reverse every dim (numpy_T is Falcon's `weight.T`)
    return _permutation_rule(list(reversed(range(len(shapes.out)))), node)


def mt_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # mT swaps the last two dims
    order = list(range(len(shapes.out)))
    order[-2:] = reversed(order[-2:])
    return _permutation_rule(order, node)


def _dropped_dim_rule(in_rank: int, dropped: int) -> OpSpec:
    kept = [d for d in range(in_rank) if d != dropped]
    return OpSpec(
        links=tuple(DimLink(out, (src,)) for out, src in enumerate(kept)),
        partial_inputs=PASS_PARTIAL,
    )


def unsqueeze_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    new_dim = node.args[1] % len(shapes.out)
    kept = [d for d in range(len(shapes.out)) if d != new_dim]
    links = tuple(DimLink(out, (src,)) for src, out in enumerate(kept))
    return OpSpec(links=links, partial_inputs=PASS_PARTIAL)


def select_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _dropped_dim_rule(len(shapes.inputs[0]), node.args[1] % len(shapes.inputs[0]))


def squeeze_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return reshape_rule(node, shapes)


def expand_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return OpSpec(links=broadcast_links(shapes), partial_inputs=PASS_PARTIAL)


def _other_dims_rule(rank: int, dim: int, num_inputs: int, extra=()) -> OpSpec:
    links = tuple(DimLink(d, (d,) * num_inputs) for d in range(rank) if d != dim)
    return OpSpec(links=links, partial_inputs=((P,) * num_inputs,), extra=tuple(extra))


def slice_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """A slice that is one of k equal blocks of its dim may cut a block-interleaved shard."""
    rank = len(shapes.out)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    groups = block_of_slice(node, shapes.inputs[0][dim])
    extra = [Strategy(Shard(dim), (Shard(dim, groups),))] if groups > 1 else []
    return _other_dims_rule(rank, dim, 1, extra)


def sliced_blocks(node: fx.Node, dim: int) -> set[int]:
    """k for each user of `node` that slices one of k equal blocks off `dim` (Phi-3's qkv)."""
    rank = len(node.meta["val"].shape)
    size = node.meta["val"].shape[dim % rank]
    return {
        block_of_slice(user, size)
        for user in node.users
        if user.target is aten.slice.Tensor and get_arg(user, "dim") % rank == dim % rank
    } - {1}


def block_of_slice(node: fx.Node, size: int) -> int:
    """k when `node` is a step-1 slice covering exactly one of k equal blocks of `size`; else 1."""
    start, end, step = (get_arg(node, name) for name in ("start", "end", "step"))
    start, end, _ = slice(start, end).indices(size)
    length = end - start
    if step != 1 or length <= 0 or size % length or start % length:
        return 1
    return size // length


def split_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """Equal pieces along the split dim can each be sharded if the input is block-interleaved."""
    in_shape = shapes.inputs[0]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(in_shape)
    piece_sizes = [piece.shape[dim] for piece in node.meta["val"]]
    num_pieces = len(piece_sizes)
    extra = []
    if num_pieces > 1 and len(set(piece_sizes)) == 1:
        extra.append(Strategy(Shard(dim), (Shard(dim, num_pieces),)))
    return _other_dims_rule(len(in_shape), dim, 1, extra)


def stack_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # every input has the output's dims but the new one, which no input shards
    rank = len(shapes.out)
    new = (node.args[1] if len(node.args) > 1 else 0) % rank
    kept = [d for d in range(rank) if d != new]
    num_inputs = len(shapes.inputs)
    links = tuple(DimLink(out, (src,) * num_inputs) for src, out in enumerate(kept))
    return OpSpec(links=links, partial_inputs=((P,) * num_inputs,))


def repeat_interleave_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """Repeating each element r times along a dim commutes with cutting that dim in chunks."""
    rank, dim = len(shapes.out), get_arg(node, "dim")
    if dim is None:
        return OpSpec()  # flattened first: replicated
    sized = get_arg(node, "output_size") is not None  # a global size baked in
    links = tuple(DimLink(d, (d,)) for d in range(rank) if not (sized and d == dim % rank))
    return OpSpec(links=links, partial_inputs=PASS_PARTIAL)


def repeat_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """Tiling a dim does not commute with sharding it: only dims repeated once keep a shard."""
    repeats, in_shape = node.args[1], shapes.inputs[0]
    offset = len(repeats) - len(in_shape)
    links = tuple(
        DimLink(offset + d, (d,)) for d in range(len(in_shape)) if repeats[offset + d] == 1
    )
    return OpSpec(links=links, partial_inputs=PASS_PARTIAL)


def cat_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # the joined dim does not shard, but keeps its role (ViT's [CLS] + patches: a sequence)
    rank = len(shapes.out)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    spec = _other_dims_rule(rank, dim, len(shapes.inputs))
    joined = DimLink(dim, (dim,) * len(shapes.inputs), shardable=False)
    return dataclasses.replace(spec, links=(*spec.links, joined))


def identity_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _permutation_rule(list(range(len(shapes.out))))


RULES = {
    aten.view.default: reshape_rule,
    aten.reshape.default: reshape_rule,
    aten._unsafe_view.default: reshape_rule,
    aten.transpose.int: transpose_rule,
    aten.permute.default: permute_rule,
    aten.t.default: t_rule,
    aten.numpy_T.default: t_rule,
    aten.mT.default: mt_rule,
    aten.flatten.using_ints: reshape_rule,
    aten.unflatten.int: reshape_rule,
    aten.unsqueeze.default: unsqueeze_rule,
    aten.squeeze.dim: squeeze_rule,
    aten.squeeze.dims: squeeze_rule,
    aten.select.int: select_rule,
    aten.expand.default: expand_rule,
    aten.broadcast_to.default: expand_rule,
    aten.slice.Tensor: slice_rule,
    aten.split.Tensor: split_rule,
    aten.split_with_sizes.default: split_rule,
    aten.chunk.default: split_rule,  # the same rule object: _group_hints finds fused projections
    aten.cat.default: cat_rule,
    aten.stack.default: stack_rule,
    aten.repeat_interleave.self_int: repeat_interleave_rule,
    aten.repeat.default: repeat_rule,
    operator.getitem: identity_rule,
}
