"""Normalizations and reductions: shard any dim that is not normalized or reduced.

RMS norm arrives decomposed (pow, mean, add, rsqrt, mul), so `mean` and `sum` over
the last dim cover it. A sum or a mean over a sharded dim yields Partial: each rank
reduces its shard, and codegen divides a mean's local sum by the global count
(`codegen/lowering.py`), so a norm over a sharded dim (OLMo 2's over all heads) may
all-reduce one statistic per token instead of gathering its input.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec, P
from autopar.strategies.view import get_arg

aten = torch.ops.aten


def layer_norm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    num_normalized = len(node.args[1])
    rank = len(shapes.out)
    others = (None,) * (len(shapes.inputs) - 1)  # weight and bias stay replicated
    return OpSpec(links=tuple(DimLink(d, (d, *others)) for d in range(rank - num_normalized)))


def reduced_dims(node: fx.Node, rank: int) -> set[int]:
    """The dims a sum or mean node reduces, non-negative."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return set(range(rank))
    dims = [dims] if isinstance(dims, int) else dims
    return {d % rank for d in dims} if dims else set(range(rank))


def _kept_links(node: fx.Node, shapes: NodeShapes) -> tuple[DimLink, ...]:
    in_rank = len(shapes.inputs[0])
    reduced = reduced_dims(node, in_rank)
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    links, out_dim = [], 0
    for d in range(in_rank):
        if d not in reduced:
            links.append(DimLink(out_dim, (d,)))
        if d not in reduced or keepdim:
            out_dim += 1
    return tuple(links)


def reduction_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """sum and mean: kept dims shard, reduced ones contract (linear: Partial passes)."""
    reduced = reduced_dims(node, len(shapes.inputs[0]))
    return OpSpec(
        links=_kept_links(node, shapes),
        contractions=tuple((d,) for d in sorted(reduced)),
        partial_inputs=((P,),),
    )


def softmax_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    rank = len(shapes.out)
    dim = node.args[1] % rank
    return OpSpec(links=tuple(DimLink(d, (d,)) for d in range(rank) if d != dim))


def scan_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """cumsum, topk, sort: each slice along the dim is independent; that dim stays whole.

    cumsum is linear, so a Partial input gives a Partial output."""
    rank = len(shapes.out)
    dim = get_arg(node, "dim") % rank
    partials = ((P,),) if node.target is aten.cumsum.default else ()
    return OpSpec(links=tuple(DimLink(d, (d,)) for d in range(rank) if d != dim),
                  partial_inputs=partials)  # fmt: skip


def histc_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """Counts over every element: each shard counts its own part (a sum), unless the bins
    span the data's own range (min == max), which a shard does not know."""
    if get_arg(node, "min") == get_arg(node, "max"):
        return OpSpec()
    return OpSpec(contractions=tuple((d,) for d in range(len(shapes.inputs[0]))))


RULES = {
    aten.layer_norm.default: layer_norm_rule,
    aten.mean.dim: reduction_rule,
    aten.sum.dim_IntList: reduction_rule,
    aten.softmax.int: softmax_rule,
    aten._softmax.default: softmax_rule,
    aten.log_softmax.int: softmax_rule,
    aten._log_softmax.default: softmax_rule,
    aten.cumsum.default: scan_rule,
    aten.topk.default: scan_rule,
    aten.sort.default: scan_rule,
    aten.histc.default: histc_rule,
}
