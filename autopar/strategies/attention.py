"""Scaled dot-product attention: heads are independent, so shard them (or the batch).

q (b, h, s, d), k and v (b, h_kv, s_kv, d): sharding heads needs both h and h_kv to
divide by tp; grouped-query attention stays correct because rank r holds query
heads [r*h/tp, (r+1)*h/tp) and exactly the key/value heads they read. A mask
with a size-1 heads dim is broadcast and stays replicated.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec

aten = torch.ops.aten


def sdpa_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    num_qkv = 3
    if len(shapes.inputs) < num_qkv:
        return OpSpec()  # q, k or v is the same node twice: leave replicated
    mask = shapes.inputs[num_qkv] if len(shapes.inputs) > num_qkv else None

    def mask_dim(d: int) -> tuple:
        if mask is None:
            return ()
        return (d,) if mask[d] > 1 else (None,)

    no_mask_dim = () if mask is None else (None,)
    return OpSpec(
        links=(
            DimLink(0, (0, 0, 0, *mask_dim(0)), keeps_groups=False),
            DimLink(1, (1, 1, 1, *mask_dim(1)), keeps_groups=False),
            DimLink(2, (2, None, None, *mask_dim(2)), shardable=False),  # queries need all keys
            DimLink(3, (None, None, 3, *no_mask_dim), shardable=False),
        )
    )


RULES = {aten.scaled_dot_product_attention.default: sdpa_rule}
