"""Rewrite the global sizes that ATen ops bake into their arguments into local ones.

A traced graph says `view(x, [2, 8, 12, 64])`; on a rank that holds 3 of the 12
heads the same node must say `view(x, [2, 8, 3, 64])`. Each rule below reads the
node's global shape (`meta["val"]`) and its placement and writes the local
arguments. Ops that take a split size or a slice along a sharded dimension keep
working block by block: with input `Shard(dim, groups=g)` a piece that covers
whole blocks maps to the same piece of the local tensor, `tp` times smaller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from autopar.errors import PlanError
from autopar.placement import Placement, Shard, local_shape
from autopar.strategies.view import get_arg

aten = torch.ops.aten


def _arg_index(node: fx.Node, name: str) -> int:
    names = [a.name for a in node.target._schema.arguments]
    return names.index(name)


def set_arg(node: fx.Node, name: str, value) -> None:
    index = _arg_index(node, name)
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _global_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _output_size(arg_name: str) -> Callable:
    """Rule for ops whose `arg_name` is the full output shape (view, expand, new_ones...)."""

    def rule(node: fx.Node, output: Placement, inputs: tuple, num_shards: int) -> None:
        if isinstance(output, Shard):
            set_arg(node, arg_name, list(local_shape(_global_shape(node), output, num_shards)))

    return rule


def _unflatten(node: fx.Node, output: Placement, inputs: tuple, num_shards: int) -> None:
    if isinstance(output, Shard):
        dim = get_arg(node, "dim") % node.args[0].meta["val"].dim()
        count = len(get_arg(node, "sizes"))
        local = local_shape(_global_shape(node), output, num_shards)
        set_arg(node, "sizes", list(local[dim : dim + count]))


def _sharded_block(node: fx.Node, seen: Placement, dim: int) -> int | None:
    """Block size of the input's sharded `dim`, or None when `dim` is not sharded."""
    shape = node.args[0].meta["val"].shape
    if isinstance(seen, Shard) and seen.dim % len(shape) == dim % len(shape):
        return shape[dim] // seen.groups
    return None


def _local_extent(node: fx.Node, extent: int, block: int, num_shards: int) -> int:
    if extent % block != 0:
        raise PlanError(
            f"{node.format_node()} cuts its sharded dimension at {extent}, which is not a "
            f"multiple of the shard block size {block}; shard the input as "
            "Shard(dim, groups=<number of pieces>) or replicate it"
        )
    return extent // num_shards


def _split(arg_name: str) -> Callable:
    """Rule for split / split_with_sizes along a sharded dimension."""

    def rule(node: fx.Node, output, inputs: tuple, num_shards: int) -> None:
        block = _sharded_block(node, inputs[0], get_arg(node, "dim"))
        if block is None:
            return
        value = get_arg(node, arg_name)
        if isinstance(value, int):
            set_arg(node, arg_name, _local_extent(node, value, block, num_shards))
        else:
            set_arg(node, arg_name, [_local_extent(node, v, block, num_shards) for v in value])

    return rule


def _slice(node: fx.Node, output, inputs: tuple, num_shards: int) -> None:
    dim = get_arg(node, "dim")
    block = _sharded_block(node, inputs[0], dim)
    if block is None:
        return
    size = node.args[0].meta["val"].shape[dim]
    start, end = slice(get_arg(node, "start"), get_arg(node, "end")).indices(size)[:2]
    if get_arg(node, "step") != 1:
        raise PlanError(f"{node.format_node()}: a strided slice of a sharded dimension")
    set_arg(node, "start", _local_extent(node, start, block, num_shards))
    set_arg(node, "end", _local_extent(node, end, block, num_shards))


SIZE_RULES: dict = {
    aten.view.default: _output_size("size"),
    aten.reshape.default: _output_size("shape"),
    aten._unsafe_view.default: _output_size("size"),
    aten.expand.default: _output_size("size"),
    aten.broadcast_to.default: _output_size("size"),
    aten.new_ones.default: _output_size("size"),
    aten.new_zeros.default: _output_size("size"),
    aten.new_empty.default: _output_size("size"),
    aten.new_full.default: _output_size("size"),
    aten.unflatten.int: _unflatten,
    aten.split.Tensor: _split("split_size"),
    aten.split_with_sizes.default: _split("split_sizes"),
    aten.slice.Tensor: _slice,
}


def localize_sizes(node: fx.Node, output, inputs: tuple, num_shards: int) -> None:
    """Rewrite `node`'s size arguments in place for a rank holding 1/num_shards."""
    rule = SIZE_RULES.get(node.target)
    if rule is not None:
        rule(node, output, inputs, num_shards)
