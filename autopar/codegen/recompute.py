"""Activation recomputation in the generated code: regions of a graph run under checkpoint.

`recompute(graph_module, mode)` outlines regions into submodules the graph calls
through `ops.recomputed` (torch.utils.checkpoint, non-reentrant): their forward keeps
only the region's inputs, and backward runs the region's forward again, collectives
included, before its own backward (Chen et al. 2016; Korthikanti et al. 2022).

- `full`: each transformer block (the nodes capture marked with one
  `meta["autopar_block"]`; codegen's inserted reshards belong to the block of their
  first user) is one region.
- `selective`: each attention core (a fused attention node) is one region.

The submodules are named after what they hold (`transformer_h3`, `..._attention`) and
printed with the graph (`source.annotated_code`), so a reader sees what is recomputed.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from autopar import ops
from autopar.cost.memory import ATTENTION_CORE


def _block(node: fx.Node, blocks: dict[fx.Node, str | None]) -> str | None:
    if "autopar_block" in node.meta or "reshard" not in node.meta:
        return node.meta.get("autopar_block")
    users = [u for u in node.users if u in blocks]
    return blocks[users[0]] if users else None


def node_blocks(graph: fx.Graph) -> dict[fx.Node, str | None]:
    """The transformer block of each computed node (None: outside every block)."""
    blocks: dict[fx.Node, str | None] = {}
    for node in reversed([n for n in graph.nodes if n.op == "call_function"]):
        blocks[node] = _block(node, blocks)  # users first, for inserted reshards
    return blocks


def _regions(graph: fx.Graph, mode: str) -> list[list[fx.Node]]:
    """Runs of consecutive computed nodes to recompute, in graph order."""
    computed = [n for n in graph.nodes if n.op == "call_function"]
    if mode == "selective":
        return [[n] for n in computed if n.target in ATTENTION_CORE]
    blocks = node_blocks(graph)
    regions, current, owner = [], [], None
    for node in computed:
        if blocks[node] != owner or blocks[node] is None:
            if current and owner is not None:
                regions.append(current)
            current, owner = [], blocks[node]
        current.append(node)
    if current and owner is not None:
        regions.append(current)
    return regions


def _outline(gm: fx.GraphModule, region: list[fx.Node], name: str) -> None:
    """Replace `region` by a call of a submodule computing it, under checkpoint."""
    inside = set(region)
    inputs = list(dict.fromkeys(u for n in region for u in n.all_input_nodes if u not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub, env = fx.Graph(), {}
    for node in inputs:
        env[node] = sub.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in region:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[node] for node in outputs))
    gm.add_submodule(name, fx.GraphModule(gm, sub, class_name=name))
    with gm.graph.inserting_after(region[-1]):
        module = gm.graph.get_attr(name)
    with gm.graph.inserting_after(module):
        call = gm.graph.call_function(ops.recomputed, (module, *inputs), name=f"{name}_recomputed")
    call.meta["recomputed"] = name
    last = call
    for index, node in enumerate(outputs):
        with gm.graph.inserting_after(last):
            value = gm.graph.call_function(operator.getitem, (call, index))
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        last = value
    for node in reversed(region):
        gm.graph.erase_node(node)


def _name(region: list[fx.Node], mode: str) -> str:
    first = region[0]
    if mode == "selective":
        return f"{first.name}_core"
    return first.meta.get("autopar_block", first.name).replace(".", "_")


def recompute(gm: fx.GraphModule, mode: str) -> fx.GraphModule:
    """`gm` with its `mode` regions recomputed in backward ("none": `gm` unchanged)."""
    if mode == "none":
        return gm
    for region in _regions(gm.graph, mode):
        _outline(gm, region, _name(region, mode))
    gm.graph.lint()
    gm.recompile()
    return gm


def recomputed_modules(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The submodules `recompute` outlined, in graph order."""
    return [
        (node.target, getattr(gm, node.target))
        for node in gm.graph.nodes
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), fx.GraphModule)
    ]
