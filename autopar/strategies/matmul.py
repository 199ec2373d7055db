"""Matrix products: shard the output's row or column dims, or the contracted dim.

Sharding the weight's output dim is Megatron's column-parallel layout (output
sharded); sharding the contracted dim is row-parallel (output Partial, reduced
later). Bias-carrying matmuls were split into matmul + add at capture time.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec

aten = torch.ops.aten


def mm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # a (M, K) @ b (K, N) -> (M, N)
    if len(shapes.inputs) != 2:
        return OpSpec()
    return OpSpec(
        links=(DimLink(0, (0, None)), DimLink(1, (None, 1))),
        contractions=((1, 0),),
    )


def linear_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # x (..., K) @ w (N, K)^T -> (..., N)
    if len(shapes.inputs) != 2:
        return OpSpec()
    rank = len(shapes.out)
    batch_links = tuple(DimLink(d, (d, None)) for d in range(rank - 1))
    return OpSpec(
        links=(*batch_links, DimLink(rank - 1, (None, 0))),
        contractions=((rank - 1, 1),),
    )


def _weight_matmul(rank: int) -> OpSpec:
    # x (..., K) @ w (K, N) -> (..., N): the batched form of mm
    batch_links = tuple(DimLink(d, (d, None)) for d in range(rank - 1))
    return OpSpec(links=(*batch_links, DimLink(rank - 1, (None, 1))), contractions=((rank - 1, 0),))


def bmm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # a (..., M, K) @ b (..., K, N) -> (..., M, N), batch dims equal; or b a (K, N) weight
    a, b = shapes.inputs if len(shapes.inputs) == 2 else (None, None)
    if a is not None and len(b) == 2 and len(a) >= 2:
        return _weight_matmul(len(shapes.out))
    if a is None or len(a) != len(b) or a[:-2] != b[:-2]:
        return OpSpec()
    rank = len(shapes.out)
    batch_links = tuple(DimLink(d, (d, d)) for d in range(rank - 2))
    return OpSpec(
        links=(
            *batch_links,
            DimLink(rank - 2, (rank - 2, None)),
            DimLink(rank - 1, (None, rank - 1)),
        ),
        contractions=((rank - 1, rank - 2),),
    )


RULES = {
    aten.mm.default: mm_rule,
    aten.linear.default: linear_rule,
    aten.bmm.default: bmm_rule,
    aten.matmul.default: bmm_rule,
}
