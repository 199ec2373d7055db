"""What a local (calibrated) mesh adds to the cost model: per-node overheads and
collective latencies that do not grow with the microbatch, gradient accumulation, ranks
sharing cores, and the attention core as the CPU kernel runs it."""

import dataclasses

import pytest
import torch
from conftest import tiny_gpt2, write_profile

import autopar
from autopar.cost.attention import eager_attention_seconds
from autopar.cost.compute import (
    backward_bytes_factor,
    compute_time,
    node_seconds,
    optimizer_seconds,
    traffic_bytes,
)
from autopar.cost.memory import ATTENTION_CORE, state_bytes_per_param
from autopar.cost.overheads import ACCUMULATE_TENSORS, optimizer_call_seconds
from autopar.cost.sharing import shared_core_seconds
from autopar.mesh import Mesh
from autopar.solver.pipeline import UnitTotals, unit_of_nodes
from autopar.solver.search import Layout
from autopar.solver.sharding import ShardingSolver


@pytest.fixture(scope="module")
def traced():
    model, inputs = tiny_gpt2(n_layer=4, batch=8)
    return autopar.capture(model, inputs), inputs


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_profile(tmp_path_factory.mktemp("cal") / "c.json", worlds=(1, 2, 3, 4), cores=2)


def _plan(traced, mesh, **pins):
    graph, inputs = traced
    return autopar.plan(graph, inputs, mesh, global_batch_size=8, recompute="none", **pins)


def test_shared_cores_fill_the_bubble_but_not_the_work():
    assert shared_core_seconds(3.0, 2.0, 1.0) == 3.0  # a core per rank: the critical path
    assert shared_core_seconds(3.0, 2.0, 2.0) == 2.0  # the cores' work bounds it
    assert shared_core_seconds(3.0, 1.0, 2.0) == 1.5  # the critical path, run twice as fast
    assert shared_core_seconds(2.0, 2.0, 2.0) == 2.0  # every rank busy: nothing changes


def test_node_overheads_are_paid_per_microbatch(traced, profile):
    mesh = Mesh.local(1, calibration=profile)
    one, four = (_plan(traced, mesh, microbatches=m) for m in (1, 4))
    graph = traced[0]
    nodes = [n for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    with_grad = sum(graph.analysis.nodes[n.name].requires_grad for n in nodes)
    overhead = len(nodes) * mesh.device.op_overhead_s + with_grad * 4e-6
    numel = graph.param_bytes / 4  # float32
    accumulate = 3 * numel * ACCUMULATE_TENSORS * 4 / mesh.device.memory_bandwidth
    extra = four.cost.step_time_s - one.cost.step_time_s
    assert extra == pytest.approx(3 * overhead + accumulate, rel=0.02)


def test_collective_latency_is_paid_per_microbatch(traced, profile):
    """A microbatch a quarter of the traced batch moves a quarter of each collective's
    bytes but pays its whole latency, as it pays each node's overhead."""
    graph = traced[0]
    mesh = Mesh.local(2, calibration=profile)
    solve = ShardingSolver(graph, mesh, True, 4, state_bytes_per_param(True, 4, "adam"), None)
    pricing = solve(Layout(dp=1, tp=2, pp=1)).pricing
    totals = UnitTotals.of(graph, pricing, unit_of_nodes(graph))
    whole, quarter = (sum(u.time_s for u in totals.units(s, 0.0)["none"]) for s in (1.0, 0.25))
    params = set(graph.param_fqns)
    in_graph = [c for c in pricing.collectives if c.producer not in params]
    assert in_graph and all(0 < c.latency_s < c.seconds for c in in_graph)
    fixed = (
        sum(p.overhead_s for p in [*pricing.nodes.values(), pricing.untraced_loss])
        + sum(c.latency_s for c in in_graph)
        + sum(c.seconds for c in pricing.collectives if c.producer in params)
    )
    assert 4 * quarter - whole == pytest.approx(3 * fixed, rel=1e-6)


def test_ranks_sharing_cores_price_pipelines_below_their_bubble(traced, profile):
    shared = Mesh.local(4, calibration=profile)
    assert shared.idle_speedup == pytest.approx(2.0)
    alone = dataclasses.replace(shared, idle_speedup=1.0)
    pipeline = dict(pp=4, microbatches=4, schedule="1f1b")
    assert _plan(traced, shared, **pipeline).cost.step_time_s < 0.8 * (
        _plan(traced, alone, **pipeline).cost.step_time_s
    )
    assert _plan(traced, shared, dp=4).cost.step_time_s == pytest.approx(
        _plan(traced, alone, dp=4).cost.step_time_s
    )


def test_elementwise_backward_runs_a_kernel_per_tensor_operand():
    class Gelu(torch.nn.Module):
        def forward(self, x, y):
            return torch.tanh((x * y) * 0.5 + torch.pow(x, 3.0))

    traced = autopar.capture(Gelu(), (torch.randn(8, 8), torch.randn(8, 8)))
    factors = {}
    for node in traced.graph_module.graph.nodes:
        if node.op == "call_function":
            scalar = any(not isinstance(a, torch.fx.Node) for a in node.args)
            factors[(node.target, scalar)] = backward_bytes_factor(node)
    aten = torch.ops.aten
    assert factors[(aten.mul.Tensor, False)] == 2.0  # grad * y and grad * x
    assert factors[(aten.mul.Tensor, True)] == 1.0  # grad * 0.5
    assert factors[(aten.pow.Tensor_Scalar, True)] == 3.5
    assert factors[(aten.tanh.default, False)] == 1.5
    assert factors[(aten.add.Tensor, False)] == 0.0  # hands its gradient on


def test_cpu_attention_prices_flash_recomputation_and_its_scores(traced, profile):
    """On CPU ranks the attention core's backward recomputes its scores (five matmuls
    against the forward's two) and every score costs softmax passes; presets keep the
    roofline's two matmuls."""
    graph = traced[0]
    local = Mesh.local(1, calibration=profile)
    preset = Mesh.preset("a100-80gb")
    assert local.eager_attention and not preset.eager_attention
    node = next(n for n in graph.graph_module.graph.nodes if n.target in ATTENTION_CORE)
    info = graph.analysis.nodes[node.name]
    device = local.device
    batch, heads, seq, _ = node.meta["val"].shape
    score_bytes = batch * heads * seq * seq * 4
    priced = eager_attention_seconds(node, info, 1, device, training=True, dtype_bytes=4)
    matmuls = compute_time(3.5 * info.flops, 2 * traffic_bytes(info, 4), device)
    assert priced == pytest.approx(matmuls + 7 * score_bytes / device.memory_bandwidth)
    assert priced > node_seconds(node, info, 1, device, training=True, dtype_bytes=4)


def test_fp32_adamw_steps_its_weights_in_place_with_eager_calls():
    """Mixed precision: 32 B per parameter (fp32 master, states); fp32 weights stepped in
    place by torch.optim's AdamW: 80 B and 8 eager calls per parameter tensor."""
    device = autopar.DeviceSpec("cpu", 1e11, 1e10, 2**30, dtype_bytes=4, op_overhead_s=2e-6)
    assert optimizer_seconds(1e6, device) == pytest.approx(80e6 / 1e10)
    assert optimizer_seconds(1e6, device, dtype_bytes=2) == pytest.approx(32e6 / 1e10)
    assert optimizer_call_seconds(device) == pytest.approx(8 * 2e-6)
    calibrated = dataclasses.replace(device, optimizer_bandwidth=2e10)  # in place: faster
    assert optimizer_seconds(1e6, calibrated) == pytest.approx(80e6 / 2e10)


def test_tied_gradients_are_summed_over_pp_and_the_loss_over_the_world(traced, profile):
    """GPT-2's embedding and LM head on the first and last stage: their gradient is
    all-reduced over pp once per step; train_step's loss over every rank."""
    graph = traced[0]
    mesh = Mesh.local(2, calibration=profile)
    piped, replicated = _plan(traced, mesh, pp=2, microbatches=2), _plan(traced, mesh, dp=2)
    wte = graph.graph_module.graph.find_nodes(op="placeholder", target="p_transformer_wte_weight")
    (tied,) = [c for c in piped.collectives if c.axis == "pp"]
    assert tied.nbytes == wte[0].meta["val"].numel() * 4
    assert tied.seconds == pytest.approx(mesh.collective_time("all_reduce", tied.nbytes, (0, 1)))
    loss_s = mesh.collective_time("all_reduce", 8, (0, 1))  # a float64 scalar
    assert not [c for c in replicated.collectives if c.axis == "pp"]
    assert replicated.cost.step_sync_s == pytest.approx(loss_s)
    assert piped.cost.step_sync_s == pytest.approx(tied.seconds + loss_s)
