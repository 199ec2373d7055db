"""ZeRO stage 3 in the generated graph: parameters read as dp slices, gathered per block.

`gather_per_block(gm, names)` makes the parameter placeholders `names` receive this
rank's dp slice of the tensor they held (`ops.zero.dp_slice`), and inserts, just
before the first node of each transformer block that reads any of them, one
`gather_params('dp', shapes, *slices)` call that rebuilds them (`ops.zero`); every
read of a placeholder then reads its gathered value. Parameters first read outside
every block (embeddings, final norm, head) are gathered one call each, before their
first reader. The gather belongs to the block it serves, so a block recomputed in
full gathers again in backward with its forward.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch.fx as fx

from autopar.codegen.recompute import node_blocks
from autopar.ops.layout import padded
from autopar.ops.zero import gather_params

DP_AXIS = "dp"


def gather_per_block(gm: fx.GraphModule, names: Iterable[str], dp: int) -> fx.GraphModule:
    """`gm` reading the placeholders `names` as 1/`dp` slices, gathered per block."""
    graph = gm.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    blocks = node_blocks(graph)
    wanted = set(names)
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.find_nodes(op="placeholder"):
        if node.name not in wanted or not node.users:
            continue
        first = min(node.users, key=order.__getitem__)
        block = blocks.get(first)
        key = (block, None if block else first.name, node.meta["val"].dtype)
        groups.setdefault(key, []).append(node)
    for (block, _, _), params in groups.items():
        first = min((u for p in params for u in p.users), key=order.__getitem__)
        _insert_gather(graph, params, first, block, dp)
    graph.lint()
    gm.recompile()
    return gm


def _insert_gather(graph: fx.Graph, params: list[fx.Node], before: fx.Node, block, dp) -> None:
    shapes = [tuple(p.meta.get("local_shape", p.meta["val"].shape)) for p in params]
    with graph.inserting_before(before):
        call = graph.call_function(gather_params, (DP_AXIS, shapes, *params))
        values = [graph.call_function(operator.getitem, (call, i)) for i in range(len(params))]
    for node in (call, *values):
        if block is not None:
            node.meta["autopar_block"] = block
    for param, value, shape in zip(params, values, shapes, strict=True):
        value.meta.update({k: v for k, v in param.meta.items() if k != "autopar_block"})
        param.replace_all_uses_with(value, delete_user_cb=lambda user: user is not call)
        param.meta["local_shape"] = (padded(math.prod(shape), dp) // dp,)
