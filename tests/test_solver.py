"""The solver rediscovers Megatron-LM's tensor-parallel layout and handles awkward sizes."""

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import autopar
from autopar.api import plan as make_plan
from autopar.errors import AutoparError, PlanError
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.plan import Plan

A100_NODE = Mesh.preset("a100-80gb")


def _block_params(plan, layer):
    return {
        plan.param_fqns[p].split(f".{layer}.", 1)[1]: plan.strategies[p].output()
        for p in plan.param_fqns
        if plan.layer_of.get(p) == layer and p in plan.strategies
    }


def _block_collectives(plan, layer, phase):
    return sorted(
        (c.kind, c.nbytes) for c in plan.collectives if c.layer == layer and c.phase == phase
    )


@pytest.fixture(scope="module")
def gpt2_tp8():
    # GPT-2 medium's width (16 heads divide by 8), 12 layers, one 1024-token sequence
    model, inputs = build_model("gpt2-medium", n_layer=12, seq=1024)
    return make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16)


def test_gpt2_gets_megatron_layout(gpt2_tp8):
    params = _block_params(gpt2_tp8, 3)
    assert params["attn.c_attn.weight"] == "S(1,g3)"  # Conv1D (in, out): column-parallel QKV
    assert params["mlp.c_fc.weight"] == "S(1)"
    assert params["attn.c_proj.weight"] == "S(0)"  # row-parallel
    assert params["mlp.c_proj.weight"] == "S(0)"
    assert params["ln_1.weight"] == "R"


SEQUENCE_PARALLEL = [("all_gather", 2**21)] * 2 + [("reduce_scatter", 2**21)] * 2
ALL_REDUCES = [("all_reduce", 2**21)] * 2  # batch x seq x hidden x bf16 = 1 x 1024 x 1024 x 2


def test_gpt2_block_communicates_as_megatron_with_sequence_parallelism(gpt2_tp8):
    # Korthikanti et al. 2022: each all-reduce becomes an all-gather and a reduce-scatter
    assert gpt2_tp8.sequence_parallel
    assert _block_collectives(gpt2_tp8, 3, "forward") == SEQUENCE_PARALLEL
    assert _block_collectives(gpt2_tp8, 3, "backward") == SEQUENCE_PARALLEL
    model, inputs = build_model("gpt2-medium", n_layer=12, seq=1024)
    plain = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16, sequence_parallel=False)
    assert not plain.sequence_parallel
    assert _block_collectives(plain, 3, "forward") == ALL_REDUCES
    assert _block_collectives(plain, 3, "backward") == ALL_REDUCES
    assert _block_params(plain, 3) == _block_params(gpt2_tp8, 3)


def test_llama_gets_megatron_layout():
    model, inputs = build_model(
        "llama2-7b", seq=1024, num_hidden_layers=4, hidden_size=1024, num_attention_heads=16,
        num_key_value_heads=8, intermediate_size=2816, vocab_size=32000,
    )  # fmt: skip
    plan = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16)
    params = _block_params(plan, 2)
    for column in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
        assert params[f"{column}.weight"] == "S(0)", column  # nn.Linear (out, in)
    for row in ("self_attn.o_proj", "mlp.down_proj"):
        assert params[f"{row}.weight"] == "S(1)", row
    assert plan.sequence_parallel
    assert _block_collectives(plan, 2, "forward") == SEQUENCE_PARALLEL
    assert _block_collectives(plan, 2, "backward") == SEQUENCE_PARALLEL


def test_identical_blocks_are_solved_once(gpt2_tp8):
    one_block = make_plan(
        *build_model("gpt2-medium", n_layer=1, seq=1024), A100_NODE, tp=8, dtype=torch.bfloat16
    )
    assert gpt2_tp8.solver["num_variables"] < 2 * one_block.solver["num_variables"]


def fast_links_mesh(world_size: int) -> Mesh:
    """Slow compute and free communication: sharding whatever divides always pays."""
    device = autopar.mesh.DeviceSpec("slow", 1e9, 1e9, memory_bytes=2**34, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device, intra_node_bw=1e15,
        inter_node_bw=1e15, intra_node_latency=0.0, inter_node_latency=0.0,
    )  # fmt: skip


def test_awkward_sizes_shard_what_divides():
    # 6 heads at tp=4: the fused QKV cannot give each rank whole q, k, v heads
    model, inputs = tiny_gpt2(n_embd=96, n_head=6, vocab_size=101)
    plan = make_plan(model, inputs, fast_links_mesh(4), tp=4)
    params = _block_params(plan, 0)
    assert params["attn.c_attn.weight"] != "S(1,g3)"
    assert params["mlp.c_fc.weight"].startswith("S")  # the MLP (96 -> 384) divides


def test_vocabulary_that_does_not_divide_is_padded():
    """101 rows at tp=2: shards of 51, the last row padding (Megatron-LM pads the same way);
    the gather that returns the logits drops it."""
    from autopar.codegen import shard_graph

    model, inputs = tiny_gpt2(vocab_size=101)
    plan = make_plan(model, inputs, fast_links_mesh(2), tp=2)
    head = next(p for p, fqn in plan.param_fqns.items() if fqn == "lm_head.weight")
    assert plan.strategies[head].output() == "S(0)"
    code = shard_graph(autopar.capture(model, inputs), plan.node_placements(), 2).code
    assert "'S(2)', 'R', 'R', [2, 16, 101])" in code


def test_bad_pins_raise():
    model, inputs = tiny_gpt2(n_head=4)
    with pytest.raises(AutoparError, match="attention heads"):
        make_plan(model, inputs, Mesh.local(8), tp=8)
    with pytest.raises(AutoparError, match="divisor"):
        make_plan(model, inputs, Mesh.local(4), tp=3)
    with pytest.raises(AutoparError, match="must equal the world size"):
        make_plan(model, inputs, Mesh.local(4), dp=1, tp=2, pp=1)


def test_no_fit_in_memory_says_so():
    model, inputs = tiny_llama()
    tiny_device = autopar.mesh.DeviceSpec("tiny", 1e12, 1e11, memory_bytes=1024)
    mesh = Mesh(
        nodes=1, devices_per_node=2, device=tiny_device, intra_node_bw=1e10, inter_node_bw=1e9,
        intra_node_latency=1e-6, inter_node_latency=1e-5,
    )  # fmt: skip
    with pytest.raises(PlanError, match="fits"):
        make_plan(model, inputs, mesh, tp=2)


def test_plan_round_trips_and_refuses_another_model(tmp_path):
    model, inputs = tiny_gpt2()
    plan = make_plan(model, inputs, Mesh.local(2), tp=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.summary() == plan.summary()
    other, other_inputs = tiny_gpt2(n_layer=3)
    other_fingerprint = autopar.capture(other, other_inputs).fingerprint()
    with pytest.raises(PlanError, match="different model"):
        loaded.check_applies_to(other_fingerprint)


def test_malformed_plan_files_raise(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not a plan file"):
        Plan.load(path)
    path.write_text('{"schema_version": 3, "dp": 1}')
    with pytest.raises(PlanError, match="plan lacks field.*strategies"):
        Plan.load(path)
    path.write_text('{"schema_version": 1, "dp": 1, "strategies": {}}')  # before the IR
    with pytest.raises(PlanError, match="version 1 is not supported.*plan the model again"):
        Plan.load(path)


def test_cbc_and_highs_agree(gpt2_tp8, monkeypatch):
    from autopar.solver import ilp

    monkeypatch.setattr(ilp, "_highs_available", lambda: False)
    model, inputs = build_model("gpt2-medium", n_layer=12, seq=1024)
    with_cbc = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16)
    # both optimal: same predicted step, same block layout (ties elsewhere may break either way)
    assert with_cbc.cost.step_time_s == pytest.approx(gpt2_tp8.cost.step_time_s)
    assert _block_params(with_cbc, 3) == _block_params(gpt2_tp8, 3)


def test_time_limit_without_a_solution_says_so():
    model, inputs = build_model("gpt2-medium", n_layer=4, seq=1024)
    with pytest.raises(PlanError, match="time limit"):
        make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16, time_limit_s=1e-6)


def test_optimizer_state_counts_in_memory():
    model, inputs = build_model("gpt2-medium", n_layer=2, seq=1024)
    adam = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16, optimizer="adamw")
    sgd = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16, optimizer="sgd")
    assert sgd.cost.memory_per_device_bytes < adam.cost.memory_per_device_bytes
    with pytest.raises(AutoparError, match="optimizer"):
        make_plan(model, inputs, A100_NODE, tp=8, optimizer="lion")


def test_folding_view_chains_shrinks_the_ilp_at_almost_no_cost(gpt2_tp8, monkeypatch):
    from autopar.solver import intra_op

    monkeypatch.setattr(intra_op, "_follow_map", lambda p, node, producers: None)
    model, inputs = build_model("gpt2-medium", n_layer=12, seq=1024)
    unfolded = make_plan(model, inputs, A100_NODE, tp=8, dtype=torch.bfloat16)
    assert gpt2_tp8.solver["num_variables"] < 0.8 * unfolded.solver["num_variables"]
    # folding forbids a reshard between a view and its producer; it changes little
    assert gpt2_tp8.cost.step_time_s == pytest.approx(unfolded.cost.step_time_s, rel=1e-2)
    assert _block_params(unfolded, 3) == _block_params(gpt2_tp8, 3)


def test_ilp_objective_is_what_the_plan_prices():
    """The ILP charges each collective the generated code runs exactly once, and the
    parameter gradients summed over tp once per step their bandwidth."""
    from autopar.cost.pricing import price_sharding
    from autopar.solver.intra_op import solve_intra_op
    from autopar.strategies import graph_strategies

    model, inputs = build_model("llama2-7b", seq=1024, num_hidden_layers=2)
    traced = autopar.capture(model, inputs)
    strategies = graph_strategies(traced, 8)
    result = solve_intra_op(traced, strategies, A100_NODE, 8, dtype_bytes=2)
    pricing = price_sharding(traced, result.strategies, A100_NODE, 8, training=True, dtype_bytes=2)
    collectives = sum(c.seconds for c in pricing.collectives)
    assert pricing.deferred_grad_bytes  # the norm weights under sequence parallelism
    deferred = sum(
        A100_NODE.tp_collective_time("all_reduce", n, 8)
        - A100_NODE.tp_collective_time("all_reduce", 0, 8)
        for n in pricing.deferred_grad_bytes.values()
    )
    priced = pricing.total("compute_s") + pricing.total("optimizer_s") + collectives + deferred
    assert result.objective_s == pytest.approx(priced, rel=1e-9)


def test_activation_memory_per_block_matches_the_known_formula():
    """Korthikanti et al. 2023: a block at tp keeps s*b*h*(10 + 24/tp + 5*a*s/(h*tp)) bytes;
    fused attention keeps no s x s scores: s*b*h*(10 + 24/tp)."""
    from autopar.cost.pricing import price_sharding
    from autopar.solver.intra_op import solve_intra_op
    from autopar.strategies import graph_strategies

    model, inputs = build_model("gpt2-medium", n_layer=2, seq=1024)
    traced = autopar.capture(model, inputs)
    strategies = graph_strategies(traced, 8, sequence_parallel=False)
    result = solve_intra_op(traced, strategies, A100_NODE, 8, dtype_bytes=2)
    pricing = price_sharding(traced, result.strategies, A100_NODE, 8, training=True, dtype_bytes=2)
    block = sum(pricing.nodes[n].activation_bytes for n in traced.analysis.layers[0])
    s, b, h, tp = 1024, 1, 1024, 8
    assert block == pytest.approx(s * b * h * (10 + 24 / tp), rel=0.25)


def _slow_links_mesh(memory_bytes: int) -> Mesh:
    """Communication so slow that, memory aside, replicating everything is fastest."""
    device = autopar.mesh.DeviceSpec("tight", 1e12, 1e11, memory_bytes=memory_bytes, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=2, device=device, intra_node_bw=1e6, inter_node_bw=1e6,
        intra_node_latency=1e-3, inter_node_latency=1e-3,
    )  # fmt: skip


def test_the_ilp_shards_to_fit_when_the_fastest_sharding_does_not():
    """The ILP's memory rows are the device's budget for the stage, so what it accepts fits."""
    model, inputs = tiny_gpt2(vocab_size=4096)
    roomy = make_plan(model, inputs, _slow_links_mesh(2**34), dp=1, tp=2, pp=1)
    assert all(n.output() == "R" for n in roomy.strategies.values())  # fastest: replicate
    budget = int(0.75 * roomy.cost.memory_per_device_bytes)
    tight = make_plan(model, inputs, _slow_links_mesh(budget), dp=1, tp=2, pp=1)
    assert tight.cost.memory_per_device_bytes <= budget
    assert any(tight.strategies[p].output() != "R" for p in tight.param_fqns)
    assert tight.cost.step_time_s > roomy.cost.step_time_s  # it paid for the memory
