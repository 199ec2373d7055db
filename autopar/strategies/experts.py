"""The grouped expert matmul of mixture-of-experts layers: shard every expert's hidden dim.

`grouped_mm(x (T, K), w (E, K, N), offs (E,)) -> (T, N)` multiplies the rows of x
routed to expert e (rows offs[e-1]..offs[e], sorted by expert) by w[e]. Sharding
each expert's N (the intermediate dim of gate/up) is column-parallel, sharding K
(the intermediate dim of down) is row-parallel with a Partial output, so a MoE layer
splits like a dense MLP: one all-reduce after the down projection. The token dim
is not sharded (the offsets index it globally); the routing stays replicated.

Two ops carry it: `aten._grouped_mm` (bf16 on GPUs) and transformers' CPU fallback
`transformers::grouped_mm_fallback`, which exists only once transformers' MoE
integration is imported, perhaps after autopar: so the rule is keyed by the op's
qualified name (`NAMED_RULES`), not by an op object, and found whatever the import
order. torch's FLOP counter knows neither op; analyze.py counts their 2 T K N FLOPs,
or the cost model would find the expert matmuls free and never split them.
"""

from __future__ import annotations

import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec


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


GROUPED_MM_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")
NAMED_RULES = dict.fromkeys(GROUPED_MM_OPS, grouped_mm_rule)
