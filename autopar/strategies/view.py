"""Views, reshapes, transposes, slices, splits and concatenation move a shard to a new dim.

None of them does arithmetic, so a Partial input stays Partial. A reshape maps
groups of input dims onto groups of output dims with equal products; a shard on
the outermost dim of a group lands on the outermost dim of its partner group.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autopar.placement import Shard
from autopar.strategies.base import DimLink, NodeShapes, OpSpec, P, Strategy
from autopar.strategies.elementwise import broadcast_links

aten = torch.ops.aten
PASS_PARTIAL = ((P,),)


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


def reshape_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return OpSpec(links=_group_links(shapes.inputs[0], shapes.out), partial_inputs=PASS_PARTIAL)


def _permutation_rule(order: list[int]) -> OpSpec:
    return OpSpec(
        links=tuple(DimLink(d, (src,)) for d, src in enumerate(order)), partial_inputs=PASS_PARTIAL
    )


def transpose_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    rank = len(shapes.out)
    order = list(range(rank))
    a, b = node.args[1] % rank, node.args[2] % rank
    order[a], order[b] = order[b], order[a]
    return _permutation_rule(order)


def permute_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _permutation_rule([d % len(shapes.out) for d in node.args[1]])


def t_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _permutation_rule(list(reversed(range(len(shapes.out)))))


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
    rank = len(shapes.out)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    return _other_dims_rule(rank, dim, 1)


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


def cat_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    rank = len(shapes.out)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    return _other_dims_rule(rank, dim, len(shapes.inputs))


def identity_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return _permutation_rule(list(range(len(shapes.out))))


RULES = {
    aten.view.default: reshape_rule,
    aten.reshape.default: reshape_rule,
    aten._unsafe_view.default: reshape_rule,
    aten.transpose.int: transpose_rule,
    aten.permute.default: permute_rule,
    aten.t.default: t_rule,
    aten.unsqueeze.default: unsqueeze_rule,
    aten.squeeze.dim: squeeze_rule,
    aten.squeeze.dims: squeeze_rule,
    aten.select.int: select_rule,
    aten.expand.default: expand_rule,
    aten.slice.Tensor: slice_rule,
    aten.split.Tensor: split_rule,
    aten.split_with_sizes.default: split_rule,
    aten.cat.default: cat_rule,
    operator.getitem: identity_rule,
}
