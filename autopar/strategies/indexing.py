"""Advanced indexing `x[..., idx, ...]`: the dims it does not index keep their shard.

`aten.index.Tensor(x, [i0, None, i2, ...])` gathers along the indexed dims of `x`
(which must stay whole: any rank may read any row) and broadcasts the index tensors
to one shape B. Output dims that come from `x`'s other dims shard with `x`; dims of
B shard with the index tensors that have them (each rank gathers its part of the
positions). The gather is linear in `x`, so a Partial `x` with replicated indices
stays Partial (a mixture-of-experts layer permutes partial expert outputs so).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec, P, R

aten = torch.ops.aten


def _layout(indices: list, rank: int, index_rank: int) -> tuple[list[int], int]:
    """Output position of each dim of x (-1: indexed away) and where B's dims start."""
    indexed = [d for d, i in enumerate(indices) if i is not None]
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    start = indexed[0] if adjacent else 0
    position, out = [], 0 if adjacent else index_rank
    for d in range(rank):
        if d in indexed:
            position.append(-1)
            if adjacent and d == indexed[0]:
                out += index_rank
            continue
        position.append(out)
        out += 1
    return position, start


def index_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    indices = list(node.args[1])
    num_index = sum(i is not None for i in indices)
    if len(shapes.inputs) != 1 + num_index or num_index == 0:
        return OpSpec()  # x among its own indices, or one index tensor twice: replicated
    x_shape, index_shapes = shapes.inputs[0], shapes.inputs[1:]
    index_rank = max(len(s) for s in index_shapes)
    position, start = _layout(indices, len(x_shape), index_rank)
    links = [DimLink(out, (d,) + (None,) * num_index) for d, out in enumerate(position) if out >= 0]
    for j in range(index_rank):
        in_dims = []
        for shape in index_shapes:
            aligned = j - (index_rank - len(shape))
            has_dim = aligned >= 0 and shape[aligned] == shapes.out[start + j]
            in_dims.append(aligned if has_dim else None)
        if any(d is not None for d in in_dims):
            links.append(DimLink(start + j, (None, *in_dims)))
    return OpSpec(links=tuple(links), partial_inputs=((P,) + (R,) * num_index,))


RULES = {aten.index.Tensor: index_rule}
