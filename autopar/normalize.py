"""Rewrites of an exported graph that make it easier to shard and to read.

`normalize(graph_module)` returns a new GraphModule (the exported program's own graph
is left as export made it) in which

1. matmuls that carry a bias (`linear(x, w, b)`, `addmm(b, x, w)`) are a matmul then
   an `add`, so a row-parallel matmul can reduce before the bias is added;
2. a matmul between a flatten and an unflatten (`view(x, [-1, K]) @ w` then
   `view(..., [B, T, N])`, Hugging Face's Conv1D) runs on the unflattened `x`, so the
   batch and sequence dims stay apart and the sequence dim can be sharded (sequence
   parallelism) up to the matmul's input;
3. `_assert_tensor_metadata` bookkeeping nodes are gone;
4. identical view-like ops of one value (two `expand(x, [4, -1])`) are one node;
5. every computed node is named after the module that made it and its op, numbered
   within that module: `transformer_h3_attn_c_attn_matmul`, `..._transpose_2`. Names
   are the stable ids of a plan: the same model traced at another batch size gives the
   same names to the same computations. The view-like ops export leaves out where they
   do nothing at the traced shape (`MAY_VANISH`: at batch 1, `expand(mask, [1, -1, T,
   T])` of a `(1, 1, T, T)` mask) are named after the value they view instead
   (`transformer_and_1_expand`), so that their coming and going renumbers nothing
   else. Placeholder names (from parameter FQNs) are kept.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

aten = torch.ops.aten
# ops that torch.export leaves out where they do nothing at the traced shape
MAY_VANISH = {
    aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.squeeze.dim,
    aten.slice.Tensor,
}  # fmt: skip
MAY_VANISH_NAMES = {str(op) for op in MAY_VANISH}


def module_path(node: fx.Node) -> str:
    """The innermost module's path ('transformer.h.0.attn.c_attn'); '' at the top."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _split_bias(graph: fx.Graph) -> None:
    """linear(x, w, b) -> add(linear(x, w), b); addmm(b, x, w) -> add(mm(x, w), b)."""
    for node in list(graph.nodes):
        if node.target == aten.linear.default and len(node.args) == 3 and node.args[2] is not None:
            x, weight, bias = node.args
            matmul_target, matmul_args = aten.linear.default, (x, weight)
        elif node.target == aten.addmm.default and not node.kwargs:
            bias, x, weight = node.args
            matmul_target, matmul_args = aten.mm.default, (x, weight)
        else:
            continue
        with graph.inserting_before(node):
            matmul = graph.create_node("call_function", matmul_target, matmul_args)
            matmul.meta = {**node.meta, "autopar_op": "matmul"}
            add = graph.create_node("call_function", aten.add.Tensor, (matmul, bias))
            add.meta = {**node.meta, "val": node.meta["val"].clone(), "autopar_op": "bias"}
        node.replace_all_uses_with(add)
        graph.erase_node(node)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _unflattened_matmul(flatten: fx.Node) -> tuple[fx.Node, list[fx.Node], fx.Node] | None:
    """(mm, nodes after it up to the unflatten, unflatten) for view(x, [-1, K]) -> mm(., w)
    [-> add(., b)] -> view(., x.shape[:-1] + [N]); None when `flatten` starts no such run."""
    x = flatten.args[0]
    mm = _only_user(flatten)
    if mm is None or mm.target != aten.mm.default or mm.args[0] is not flatten:
        return None
    chain, last = [], mm
    after = _only_user(mm)
    if after is not None and after.target == aten.add.Tensor and after.args[0] is mm:
        chain, last = [after], after
    unflatten = _only_user(last)
    if unflatten is None or unflatten.target != aten.view.default:
        return None
    x_shape, out_shape = x.meta["val"].shape, unflatten.meta["val"].shape
    if x_shape[:-1] != out_shape[:-1] or len(x_shape) < 3:
        return None
    return mm, chain, unflatten


def _batched_matmuls(graph: fx.Graph) -> None:
    erased = set()
    for flatten in list(graph.find_nodes(op="call_function", target=aten.view.default)):
        found = None if flatten in erased else _unflattened_matmul(flatten)
        if found is None:
            continue
        mm, chain, unflatten = found
        mm.target, mm.args = aten.matmul.default, (flatten.args[0], mm.args[1])
        for node in (mm, *chain):
            node.meta = {**node.meta, "val": unflatten.meta["val"].clone()}
        unflatten.replace_all_uses_with(chain[-1] if chain else mm)
        graph.erase_node(unflatten)
        graph.erase_node(flatten)
        erased.add(unflatten)


def _merge_identical_views(graph: fx.Graph) -> None:
    """One node for view-like ops that read the same value with the same arguments."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in MAY_VANISH:
            continue
        key = (node.target, repr(node.args), repr(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _drop_bookkeeping(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target == aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)


def _op_name(node: fx.Node) -> str:
    if "autopar_op" in node.meta:
        return node.meta["autopar_op"]
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__.strip("_")
    return getattr(node.target, "__name__", "call")


def path_name(path: str) -> str:
    """'transformer.h.3.attn' -> 'transformer_h3_attn': digits join the name before them."""
    parts = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] += part
        elif part:
            parts.append("".join(c if c.isalnum() or c == "_" else "_" for c in part))
    return "_".join(parts)


def view_root(node: fx.Node) -> fx.Node:
    """The value a chain of MAY_VANISH ops views (the node itself outside such a chain)."""
    while node.op == "call_function" and node.target in MAY_VANISH and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def stable_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """Module path (or viewed value) + op + ordinal, for every computed node."""
    names, counts = {}, Counter()

    def name_of(node: fx.Node) -> str:
        return names.get(node, node.name)

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            names[node] = f"{name_of(node.args[0])}_{node.args[1]}"
            continue
        if node.target in MAY_VANISH and node.all_input_nodes:
            owner = name_of(view_root(node))
        else:
            owner = path_name(module_path(node))
        base = "_".join(p for p in (owner, _op_name(node)) if p)
        names[node] = base if counts[base] == 0 else f"{base}_{counts[base]}"
        counts[base] += 1
    return names


def _renamed(graph_module: fx.GraphModule) -> fx.GraphModule:
    names = stable_names(graph_module.graph)
    graph, env = fx.Graph(), {}
    for node in graph_module.graph.nodes:
        node.name = names.get(node, node.name)  # the old graph is discarded: only copies live
        env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(graph_module, graph)


def normalize(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The rewrites above, on a copy of `graph_module`'s graph."""
    copied = fx.GraphModule(graph_module, graph_module.graph.__deepcopy__())
    _split_bias(copied.graph)
    _batched_matmuls(copied.graph)
    _merge_identical_views(copied.graph)
    _drop_bookkeeping(copied.graph)
    copied.graph.lint()
    result = _renamed(copied)
    result.graph.lint()
    return result
