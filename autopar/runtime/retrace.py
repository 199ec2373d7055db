"""Apply a plan made on one trace of a model to a trace at another batch size.

The runtime traces the model at the plan's microbatch size (graphs have static
shapes), which can differ from the batch the plan was made on. The two graphs are
the same op for op, except that torch.export drops ops that do nothing at the new
size (at batch 1, `expand(mask, [1, -1, T, T])` of a `(1, 1, T, T)` mask), and fx
then numbers the remaining nodes differently (`expand_3` becomes `expand_2`).

`align` walks both graphs in order and pairs their call_function nodes by target
and (paired) inputs; a node of the plan's graph without a partner must be such a
no-op, and stands for its input from then on. `plan_for` rewrites the plan's
per-node strategies and stage lists in the new graph's names.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from autopar.errors import AutoparError

aten = torch.ops.aten

# ops that torch.export leaves out where they do nothing at the traced shape
_MAY_VANISH = {
    aten.expand.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.squeeze.dim,
    aten.slice.Tensor,
}


@dataclasses.dataclass
class Alignment:
    """Old node name -> the new node that computes it (a vanished node: its input's)."""

    partner: dict[str, fx.Node]
    vanished: set[str]


def align(old: fx.Graph, new: fx.Graph) -> Alignment:
    """Pair the nodes of `old` (the plan's trace) with those of `new`, or AutoparError."""
    new_placeholders = {n.name: n for n in new.find_nodes(op="placeholder")}
    partner: dict[fx.Node, fx.Node] = {}
    for node in old.find_nodes(op="placeholder"):
        if node.name not in new_placeholders:
            raise AutoparError(f"placeholder {node.name} is missing from the new trace")
        partner[node] = new_placeholders[node.name]
    computed = [n for n in new.nodes if n.op == "call_function"]
    vanished: set[str] = set()
    index = 0
    for node in (n for n in old.nodes if n.op == "call_function"):
        inputs = list(dict.fromkeys(partner[u] for u in node.all_input_nodes))
        candidate = computed[index] if index < len(computed) else None
        if candidate is not None and _same(node, candidate, inputs):
            partner[node] = candidate
            index += 1
        elif node.target in _MAY_VANISH and node.all_input_nodes:
            partner[node] = partner[node.all_input_nodes[0]]
            vanished.add(node.name)
        else:
            found = candidate.format_node() if candidate is not None else "the end of the graph"
            raise AutoparError(
                f"the model traced at another batch size computes differently: the plan's "
                f"{node.format_node()} meets {found}"
            )
    if index != len(computed):
        raise AutoparError(
            f"the model traced at another batch size has ops the plan's graph lacks, from "
            f"{computed[index].format_node()}"
        )
    return Alignment({old_node.name: new_node for old_node, new_node in partner.items()}, vanished)


def _same(old: fx.Node, new: fx.Node, inputs: list[fx.Node]) -> bool:
    return old.target == new.target and inputs == new.all_input_nodes


def plan_for(plan, old: fx.Graph, alignment: Alignment):
    """A copy of `plan` whose strategies and stages name the aligned new graph's nodes."""
    nodes = {node.name: node for node in old.nodes}
    strategies = {}
    for name, entry in plan.strategies.items():
        if name in alignment.vanished or name not in nodes:
            continue
        strategies[alignment.partner[name].name] = _entry_for(entry, nodes[name], alignment)
    stages = [
        dataclasses.replace(
            stage,
            nodes=[
                alignment.partner[n].name
                for n in stage.nodes
                if n not in alignment.vanished and n in alignment.partner
            ],
        )
        for stage in plan.stages
    ]
    return dataclasses.replace(plan, strategies=strategies, stages=stages)


def _entry_for(entry: dict, old: fx.Node, alignment: Alignment) -> dict:
    """The strategy text with inputs listed as the new node sees them (first occurrence)."""
    new = alignment.partner[old.name]
    seen: dict[str, str] = {}
    for source, placement in zip(old.all_input_nodes, entry["inputs"], strict=True):
        seen.setdefault(alignment.partner[source.name].name, placement)
    inputs = [seen[u.name] for u in new.all_input_nodes]
    return {**entry, "inputs": inputs, "sources": [u.name for u in new.all_input_nodes]}
