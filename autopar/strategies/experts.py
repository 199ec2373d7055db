"""The grouped expert matmul of mixture-of-experts layers: shard every expert's hidden dim.

`grouped_mm(x (T, K), w (E, K, N), offs (E,)) -> (T, N)` multiplies the rows of x
routed to expert e (rows offs[e-1]..offs[e], sorted by expert) by w[e]. Sharding
each expert's N (the intermediate dim of gate/up) is column-parallel, sharding K
(the intermediate dim of down) is row-parallel with a Partial output, so a MoE layer
splits like a dense MLP: one all-reduce after the down projection. The token dim
is not sharded (the offsets index it globally); the routing stays replicated.

Two ops carry it: `aten._grouped_mm` (bf16 on GPUs) and transformers' CPU fallback
`transformers::grouped_mm_fallback`, which exists only once transformers' MoE
integration is imported: its rule is registered when that happened before autopar's
import (the rule table is keyed by op objects). torch's FLOP counter knows neither,
so their FLOPs (2 T K N) are registered with it here, or the cost model would find
the expert matmuls free and never split them.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import flop_counter

from autopar.strategies.base import DimLink, NodeShapes, OpSpec

aten = torch.ops.aten


def grouped_mm_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    x, w = shapes.inputs[:2] if len(shapes.inputs) == 3 else (None, None)
    if x is None or len(x) != 2 or len(w) != 3:
        return OpSpec()  # other grouped-mm forms (3-D x 3-D, no offsets, a bias): replicated
    return OpSpec(
        links=(
            DimLink(0, (0, None, None), shardable=False),  # tokens, ordered by expert
            DimLink(1, (None, 2, None)),  # column-parallel: each expert's N
        ),
        contractions=((1, 1, None),),  # row-parallel: each expert's K
    )


def grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # every token row meets one expert's (K, N) matrix
    tokens, inner = x_shape
    return 2 * tokens * inner * w_shape[-1]


def _grouped_mm_ops() -> list:
    fallback = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    return [aten._grouped_mm] + ([] if fallback is None else [fallback])


def _count_flops(packets: list) -> None:
    unknown = [packet for packet in packets if packet not in flop_counter.flop_registry]
    if unknown:
        flop_counter.register_flop_formula(unknown)(grouped_mm_flops)


_count_flops(_grouped_mm_ops())
RULES = {packet.default: grouped_mm_rule for packet in _grouped_mm_ops()}
