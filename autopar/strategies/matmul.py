"""Matrix products: shard the output's row or column dims, or the contracted dim.

Sharding the weight's output dim is Megatron's column-parallel layout (output
sharded); sharding the contracted dim is row-parallel (output Partial, reduced
later). Bias-carrying matmuls were split into matmul + add at capture time.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.placement import Shard
from autopar.strategies.base import DimLink, NodeShapes, OpSpec, R, Strategy
from autopar.strategies.view import get_arg, sliced_blocks

aten = torch.ops.aten


def mm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # a (M, K) @ b (K, N) -> (M, N)
    if len(shapes.inputs) != 2:
        return OpSpec()
    return OpSpec(
        links=(DimLink(0, (0, None)), DimLink(1, (None, 1))),
        contractions=((1, 0),),
    )


def _sliced_output(node: fx.Node, weight_dim: int) -> tuple[Strategy, ...]:
    """Column-parallel in k blocks when the output is sliced into k equal parts (Phi-3's
    fused qkv_proj cuts q, k and v by slices, which `_group_hints` does not follow)."""
    out_dim = len(node.meta["val"].shape) - 1
    return tuple(
        Strategy(Shard(out_dim, groups), (R, Shard(weight_dim, groups)))
        for groups in sorted(sliced_blocks(node, out_dim))
    )


def linear_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # x (..., K) @ w (N, K)^T -> (..., N)
    if len(shapes.inputs) != 2:
        return OpSpec()
    return _weight_matmul(node, len(shapes.out), weight_out_dim=0)


def _weight_matmul(node: fx.Node, rank: int, weight_out_dim: int = 1) -> OpSpec:
    """x (..., K) times a 2-d weight -> (..., N): the weight's N dim is `weight_out_dim`
    (1 for mm's (K, N), 0 for linear's (N, K)), its other dim is contracted."""
    batch_links = tuple(DimLink(d, (d, None)) for d in range(rank - 1))
    return OpSpec(
        links=(*batch_links, DimLink(rank - 1, (None, weight_out_dim))),
        contractions=((rank - 1, 1 - weight_out_dim),),
        extra=_sliced_output(node, weight_dim=weight_out_dim),
    )


def bmm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # a (..., M, K) @ b (..., K, N) -> (..., M, N), batch dims equal; or b a (K, N) weight
    a, b = shapes.inputs if len(shapes.inputs) == 2 else (None, None)
    if a is not None and len(b) == 2 and len(a) >= 2:
        return _weight_matmul(node, len(shapes.out))
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


def baddbmm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """beta * c + alpha * (a @ b), c broadcast to (B, M, N): Bloom's ALiBi attention scores.

    Batch, row and column dims shard; the contracted dim does not, since c would be
    added once per rank."""
    c, a, b = shapes.inputs if len(shapes.inputs) == 3 else (None, None, None)
    if c is None or len(a) != 3 or len(b) != 3:
        return OpSpec()
    offset = 3 - len(c)

    def c_dim(d: int) -> int | None:
        aligned = d - offset
        return aligned if aligned >= 0 and c[aligned] == shapes.out[d] else None

    return OpSpec(
        links=(
            DimLink(0, (c_dim(0), 0, 0)),
            DimLink(1, (c_dim(1), 1, None)),
            DimLink(2, (c_dim(2), None, 2)),
        )
    )


def conv_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    """x (B, C, ...) * w (O, C, ...) -> (B, O, ...): output channels shard with the weight
    (column-parallel, a bias with them); input channels are contracted when there is no
    bias. Spatial dims do not shard (windows overlap) but keep their roles (patches)."""
    if len(shapes.inputs) not in (2, 3) or get_arg(node, "groups") != 1:
        return OpSpec()
    bias = (0,) if len(shapes.inputs) == 3 else ()
    no_bias = (None,) if bias else ()
    spatial = tuple(
        DimLink(d, (d, None, *no_bias), shardable=False) for d in range(2, len(shapes.out))
    )
    return OpSpec(
        links=(DimLink(0, (0, None, *no_bias)), DimLink(1, (None, 0, *bias)), *spatial),
        contractions=() if bias else ((1, 1),),
    )


RULES = {
    aten.mm.default: mm_rule,
    aten.linear.default: linear_rule,
    aten.bmm.default: bmm_rule,
    aten.matmul.default: bmm_rule,
    aten.baddbmm.default: baddbmm_rule,
    aten.conv2d.default: conv_rule,
    aten.conv1d.default: conv_rule,
}
