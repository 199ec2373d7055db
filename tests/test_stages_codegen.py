"""Pipeline stage graphs run in a chain give the unsplit graph's outputs and gradients.

One process, CPU. The chain does what a pipeline does: each stage gets detached
copies of what the previous one sent (and its own copies of the state it reads),
and backward runs stage by stage from the last to the first.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from test_runtime_parity import gpt2_megatron, llama_megatron
from test_solver import fast_links_mesh

from autopar.api import plan as make_plan
from autopar.capture import capture
from autopar.codegen import shard_graph
from autopar.codegen.stages import split_stages, stage_of_nodes
from autopar.errors import AutoparError
from autopar.ops import Axis, bound_axes, redistribute
from autopar.solver.pipeline import unit_of_nodes

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


@pytest.fixture(scope="module", params=list(MODELS))
def captured(request):
    model, inputs = MODELS[request.param]()
    return model, inputs, capture(model, inputs)


def plan_stage_nodes(traced, num_stages: int) -> list[list[str]]:
    """Units (prologue, blocks, epilogue) split evenly, like a plan's `stages[k].nodes`."""
    units = unit_of_nodes(traced)
    num_units = len(traced.analysis.layers) + 2
    stages = [[] for _ in range(num_stages)]
    for name, unit in units.items():
        stages[unit * num_stages // num_units].append(name)
    return stages


# --- running a chain --------------------------------------------------------------------


def _leaf(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _cotangents(outputs) -> list:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(o.shape, generator=generator) if o.is_floating_point() else None
        for o in outputs
    ]


def _backward(outputs, grads) -> None:
    pairs = [
        (o, g)
        for o, g in zip(outputs, grads, strict=True)
        if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
    ]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def run_unsplit(graph_module, values: dict):
    """Outputs and gradients (by placeholder name) of the whole graph."""
    leaves = {name: _leaf(v) for name, v in values.items()}
    outputs = graph_module(*leaves.values())
    _backward(outputs, _cotangents(outputs))
    grads = {n: v.grad for n, v in leaves.items() if isinstance(v, torch.Tensor)}
    return outputs, grads


def run_chain(stages, values: dict):
    """Forward stage by stage, then backward last to first; state grads summed over stages."""
    carried = [values[name] for name in stages[0].received]
    records = []
    for stage in stages:
        received = [_leaf(v) for v in carried]
        given = [values[name] for name in stage.inputs]  # user inputs, straight from the caller
        state = {name: _leaf(values[name]) for name in stage.state}
        carried = stage.graph_module(*received, *given, *state.values())
        assert len(carried) == len(stage.sent)
        records.append((received, state, carried))
    grads, state_grads = _cotangents(carried), {}
    for received, state, outputs in reversed(records):
        _backward(outputs, grads)
        grads = [getattr(r, "grad", None) for r in received]
        for name, leaf in state.items():
            if getattr(leaf, "grad", None) is not None:
                state_grads[name] = state_grads.get(name, 0) + leaf.grad
    return carried, state_grads


def assert_chain_matches(graph_module, stages, values, params) -> None:
    """Outputs and parameter gradients exactly; other state (a float buffer feeding rotary
    tables several stages recompute) to rounding: its summands add up in another order."""
    expected, expected_grads = run_unsplit(graph_module, values)
    outputs, grads = run_chain(stages, values)
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got, want)
    for name, want in expected_grads.items():
        user_inputs = {*stages[0].received, *(n for stage in stages for n in stage.inputs)}
        if want is None or name in user_inputs:
            continue
        if name in params:
            assert torch.equal(grads[name], want), name
        else:
            torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-7, msg=name)


def _values(traced, model, inputs) -> dict:
    placeholders = traced.graph_module.graph.find_nodes(op="placeholder")
    values = traced.placeholder_values(model, inputs)
    return {node.name: value for node, value in zip(placeholders, values, strict=True)}


# --- Hugging Face models ------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_chain_matches_unsplit_graph(captured, num_stages):
    model, inputs, traced = captured
    gm = traced.graph_module
    stage_of = stage_of_nodes(gm, plan_stage_nodes(traced, num_stages))
    stages = split_stages(gm, stage_of, num_stages, traced.user_inputs)
    assert [s.index for s in stages] == list(range(num_stages))
    assert stages[0].received == traced.user_inputs
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.sent == after.received
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    assert stages[-1].sent == [node.name for node in outputs]
    assert_chain_matches(gm, stages, _values(traced, model, inputs), traced.param_fqns)


def _gpt2_stages(num_stages=4):
    model, inputs = tiny_gpt2()
    traced = capture(model, inputs)
    gm = traced.graph_module
    stage_of = stage_of_nodes(gm, plan_stage_nodes(traced, num_stages))
    return traced, split_stages(gm, stage_of, num_stages, traced.user_inputs)


def test_tied_embedding_is_state_of_first_and_last_stage():
    traced, stages = _gpt2_stages()
    (head,) = (p for p, fqn in traced.param_fqns.items() if fqn == "lm_head.weight")
    assert [s.index for s in stages if head in s.state] == [0, 3]
    assert "p_transformer_h_1_ln_1_weight" in stages[2].state
    assert all(len(s.received) == 1 for s in stages)  # only the residual stream crosses


def test_state_derived_values_are_recomputed_not_sent():
    traced, stages = _gpt2_stages()
    mask = "transformer_and_1_expand"  # the causal mask, built from arange alone
    assert all(mask not in s.received for s in stages)
    assert _stages_holding(stages, mask) == [1, 2]  # the two blocks' stages


def test_stage_code_keeps_node_names():
    _, stages = _gpt2_stages()
    code = stages[1].graph_module.code
    assert "def forward(self, transformer_drop_dropout, p_transformer_h_0_ln_1_weight," in code
    assert (
        "transformer_h0_ln_1_layer_norm = torch.ops.aten.layer_norm.default("
        "transformer_drop_dropout, [64]" in code
    )
    assert "return (transformer_h0_add_1,)" in code
    assert type(stages[1].graph_module).__name__ == "Stage1"


# --- graphs with inserted collectives ------------------------------------------------------


def _is_inserted(node) -> bool:
    return node.op == "call_function" and node.target is redistribute


def _stages_holding(stages, name) -> list[int]:
    """Stages computing node `name` (receiving it does not count)."""
    computed = [
        {n.name for n in s.graph_module.graph.nodes if n.op != "placeholder"} for s in stages
    ]
    return [s.index for s, names in zip(stages, computed, strict=True) if name in names]


@pytest.mark.parametrize(
    "build, placements", [(tiny_gpt2, gpt2_megatron), (tiny_llama, llama_megatron)]
)
def test_sharded_graph_at_tp1_runs_in_a_chain(build, placements):
    """Megatron placements at tp=1: collectives are inserted and run as identities."""
    model, inputs = build()
    traced = capture(model, inputs)
    gm = shard_graph(traced, placements(traced, 1), 1)
    inserted = [n for n in gm.graph.nodes if _is_inserted(n)]
    assert len(inserted) >= 4
    stage_of = stage_of_nodes(gm, plan_stage_nodes(traced, 3))
    stages = split_stages(gm, stage_of, 3, traced.user_inputs)
    for node in inserted:
        users = [stage_of[u.name] for u in node.users if u.op != "output"]
        assert stage_of[node.name] == min(users, default=stage_of[node.args[0].name])
        assert _stages_holding(stages, node.name) == [stage_of[node.name]], node.name
    with bound_axes({"tp": Axis("tp", None, 1, 0)}):
        assert_chain_matches(gm, stages, _values(traced, model, inputs), traced.param_fqns)


def test_solver_plan_at_tp2_splits_into_its_stages():
    """The solver's own stages on a tp=2 graph: structure only (running it needs 2 ranks)."""
    model, inputs = tiny_gpt2()
    plan = make_plan(model, inputs, fast_links_mesh(4), tp=2, pp=2, dp=1)
    traced = capture(model, inputs)
    gm = shard_graph(traced, plan.node_placements(), 2)
    num_stages = len(plan.stages)
    stage_of = stage_of_nodes(gm, [stage.nodes for stage in plan.stages])
    stages = split_stages(gm, stage_of, num_stages, traced.user_inputs)
    inserted = [n for n in gm.graph.nodes if _is_inserted(n)]
    assert any(n.meta["reshard"].collectives() for n in inserted)
    state = {n for n in gm.graph.find_nodes(op="placeholder") if n.name not in traced.user_inputs}
    for node in inserted:
        holding = _stages_holding(stages, node.name)
        if set(node.all_input_nodes) <= state:  # a collective on a parameter: where it is read
            assert holding and all(stage_of[node.name] <= k for k in holding), node.name
        else:
            assert holding == [stage_of[node.name]], node.name
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.sent == after.received
        assert all(stage_of[name] <= before.index for name in before.sent)


# --- rules on small graphs ---------------------------------------------------------------------


class Skip(nn.Module):
    """A skip connection over a stage and a user input read only at the end."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, y):
        h = self.a(x)
        g = self.b(torch.relu(h))
        return self.c(g) + h * y, h


def _by_module(traced, stage_of_module: dict[str, int]) -> dict[str, int]:
    """Stage by the innermost module of each node ('' for the top module's own ops)."""
    stage_of = {}
    for node in traced.graph_module.graph.nodes:
        if node.op == "call_function":
            stack = list(node.meta["nn_module_stack"].values())
            stage_of[node.name] = stage_of_module[stack[-1][0]]
    return stage_of


def _skip():
    model = Skip()
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    return model, inputs, capture(model, inputs)


def test_values_pass_through_middle_stages():
    model, inputs, traced = _skip()
    stage_of = _by_module(traced, {"a": 0, "b": 1, "c": 2, "": 2}) | {"relu": 1}
    stages = split_stages(traced.graph_module, stage_of, 3, traced.user_inputs)
    assert stages[0].received == ["x"]  # the user inputs stage 0 reads
    assert stages[1].received == ["a_bias"]  # h passes through stage 1
    assert stages[2].received == ["a_bias", "b_bias"]
    assert [s.inputs for s in stages] == [[], [], ["y"]]  # y goes straight to its reader
    assert stages[2].sent == ["add", "a_bias"]  # h, made in stage 0, is an output
    assert stages[1].state == ["p_b_weight", "p_b_bias"]
    assert_chain_matches(
        traced.graph_module, stages, _values(traced, model, inputs), traced.param_fqns
    )


def test_outputs_made_early_reach_the_last_stage():
    model, inputs, traced = _skip()
    stage_of = {n.name: 0 for n in traced.graph_module.graph.nodes if n.op == "call_function"}
    stages = split_stages(traced.graph_module, stage_of, 3, traced.user_inputs)
    assert [s.received for s in stages[1:]] == [["a_bias", "add"]] * 2  # graph order
    assert stages[2].state == [] and stages[2].sent == ["add", "a_bias"]
    assert_chain_matches(
        traced.graph_module, stages, _values(traced, model, inputs), traced.param_fqns
    )


def test_non_contiguous_assignment_is_an_error():
    _, _, traced = _skip()
    stage_of = _by_module(traced, {"a": 1, "b": 1, "c": 1, "": 1}) | {"relu": 0}
    with pytest.raises(AutoparError, match=r"relu \(stage 0\) reads a_bias \(stage 1\)"):
        split_stages(traced.graph_module, stage_of, 2, traced.user_inputs)


def test_missing_and_out_of_range_stages_are_errors():
    _, _, traced = _skip()
    stage_of = _by_module(traced, {"a": 0, "b": 0, "c": 5, "": 0})
    del stage_of["relu"]
    message = r"unassigned \[relu\], out of range \[c_matmul=5"
    with pytest.raises(AutoparError, match=message):
        split_stages(traced.graph_module, stage_of, 2, traced.user_inputs)


def test_plan_naming_unknown_or_repeated_nodes_is_an_error():
    _, _, traced = _skip()
    with pytest.raises(AutoparError, match="lacks \\(nope\\)"):
        stage_of_nodes(traced.graph_module, [["relu"], ["nope"]])
    with pytest.raises(AutoparError, match="relu is listed in stages 0 and 1"):
        stage_of_nodes(traced.graph_module, [["relu"], ["relu"]])


class SplitHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(8, 16), nn.Linear(8, 8)

    def forward(self, x):
        q, k = self.proj(x).split(8, dim=-1)
        return self.out(q * k)


def test_getitems_stay_with_their_multi_output_node():
    model, inputs = SplitHeads(), (torch.randn(3, 8),)
    traced = capture(model, inputs)
    gm = traced.graph_module
    plan = [["proj_matmul", "proj_bias", "split"], ["split_0", "split_1", "mul"]]
    plan[1] += ["out_matmul", "out_bias"]
    stage_of = stage_of_nodes(gm, plan)
    assert stage_of["split_0"] == stage_of["split_1"] == 0
    stages = split_stages(gm, stage_of, 2, traced.user_inputs)
    assert stages[1].received == ["split_0", "split_1"]  # tensors, never the tuple
    assert_chain_matches(gm, stages, _values(traced, model, inputs), traced.param_fqns)
    unmoved = {name: k for k, names in enumerate(plan) for name in names}
    stages = split_stages(gm, unmoved, 2, traced.user_inputs)
    assert stages[1].received == ["split_0", "split_1"]


class DynamicReshape(nn.Module):
    def forward(self, x):
        return (x * 2).reshape(x.shape[0], -1)


def test_non_tensor_crossing_a_boundary_is_an_error():
    ep = torch.export.export(
        DynamicReshape(), (torch.randn(4, 3, 2),), dynamic_shapes={"x": {0: torch.export.Dim("b")}}
    )
    gm = ep.graph_module
    (size,) = (n.name for n in gm.graph.nodes if "sym_size" in n.name)
    stage_of = {size: 0, "mul": 0, "reshape": 1}
    message = f"only tensors can cross .* {size} \\(SymInt, made in stage 0, read in stage 1\\)"
    with pytest.raises(AutoparError, match=message):
        split_stages(gm, stage_of, 2, ["x"])
    stages = split_stages(gm, {size: 1, "mul": 0, "reshape": 1}, 2, ["x"])
    assert stages[1].received == ["mul"] and stages[1].inputs == ["x"]
