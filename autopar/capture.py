"""Capture a model into an fx graph of ATen ops with `torch.export` (non-strict).

The graph keeps parameters and buffers lifted to placeholders (the
`ExportedProgram.graph_module` form), so that later steps can hand every rank its
own parameter shards as inputs. Two rewrites make the graph easier to shard:
matmuls that carry a bias (`linear(x, w, b)`, `addmm(b, x, w)`) become a matmul
followed by an `add`, so that a row-parallel matmul can reduce before the bias is
added; and `_assert_tensor_metadata` bookkeeping nodes are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

aten = torch.ops.aten


@dataclass
class TracedModel:
    """A captured model: the normalized fx graph and how its placeholders map back."""

    exported_program: ExportedProgram
    graph_module: fx.GraphModule
    param_fqns: dict[str, str]  # placeholder name -> parameter FQN in the model
    buffer_fqns: dict[str, str]  # placeholder name -> buffer FQN in the model
    user_inputs: list[str]  # placeholder names of the user's (flattened) inputs
    extra: dict = field(default_factory=dict)

    @property
    def out_spec(self) -> pytree.TreeSpec:
        return self.exported_program.call_spec.out_spec

    @property
    def in_spec(self) -> pytree.TreeSpec:
        return self.exported_program.call_spec.in_spec


def _placeholder_maps(ep: ExportedProgram) -> tuple[dict[str, str], dict[str, str], list[str]]:
    params, buffers, user_inputs = {}, {}, []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            params[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
    return params, buffers, user_inputs


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
            matmul = graph.call_function(matmul_target, matmul_args)
            matmul.meta = dict(node.meta)
            add = graph.call_function(aten.add.Tensor, (matmul, bias))
            add.meta = dict(node.meta)
        node.replace_all_uses_with(add)
        graph.erase_node(node)


def _drop_bookkeeping(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target == aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)


def normalize(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Apply the sharding-friendly rewrites in place and recompile."""
    _split_bias(graph_module.graph)
    _drop_bookkeeping(graph_module.graph)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def capture(model: torch.nn.Module, example_inputs, example_kwargs=None) -> TracedModel:
    """Trace `model` on `example_inputs` into a TracedModel."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    ep = torch.export.export(model, args, dict(example_kwargs or {}), strict=False)
    params, buffers, user_inputs = _placeholder_maps(ep)
    return TracedModel(ep, normalize(ep.graph_module), params, buffers, user_inputs)
