"""ZeRO, activation recomputation and gradient accumulation as the search prices them,
and the published Megatron-LM runs (autopar/published.py) they are checked against."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.published import KORTHIKANTI_2022, VARIANTS


def _gpt(layers: int, hidden: int, heads: int, batch: int):
    model, inputs = build_model(
        "gpt3-175b", batch=batch, seq=2048, n_layer=layers, n_embd=hidden, n_head=heads
    )
    return autopar.capture(model, inputs), inputs


@pytest.mark.parametrize("run", KORTHIKANTI_2022, ids=[r.name for r in KORTHIKANTI_2022])
def test_published_runs_are_predicted_within_15_percent(run):
    model, inputs = run.model()
    traced, mesh = autopar.capture(model, inputs), run.mesh()
    pinned = {}
    for variant in VARIANTS:
        plan = autopar.plan(traced, inputs, mesh, **run.pins(variant), **run.options())
        assert plan.recompute == variant
        assert plan.cost.step_time_s == pytest.approx(run.seconds[variant], rel=0.15), variant
        pinned[variant] = plan.cost.step_time_s
    free = autopar.plan(traced, inputs, mesh, **run.options())
    assert free.cost.step_time_s <= min(pinned.values()) * (1 + 1e-9)
    assert free.cost.memory_per_device_bytes <= 80 * 2**30


@pytest.fixture(scope="module")
def gpt_4096():
    """A GPT with hidden 4096 at tp=8, dp=2 (two A100 nodes)."""
    traced, inputs = _gpt(4, 4096, 32, 1)
    return traced, inputs, traced.param_bytes / 4  # fp32 on the meta device: numel


def _plan(gpt_4096, **pins):
    traced, inputs, _ = gpt_4096
    mesh = Mesh.preset("a100-80gb", nodes=2)
    return autopar.plan(
        traced, inputs, mesh, dtype=torch.bfloat16, dp=2, tp=8, pp=1, global_batch_size=2,
        **pins,
    )  # fmt: skip


def test_zero_shards_the_states_over_dp(gpt_4096):
    """ZeRO-1 saves the 12 optimizer bytes of each parameter of the tp shard on every dp
    rank but its own 1/dp; ZeRO-2 the 2 bytes of its gradient too."""
    params = gpt_4096[2] / 8  # the tp shard (norm weights are replicated: a few KiB)
    memory = {z: _plan(gpt_4096, zero=z, recompute="none") for z in (0, 1, 2)}
    assert [memory[z].zero for z in (0, 1, 2)] == [0, 1, 2]
    used = {z: plan.cost.memory_per_device_bytes for z, plan in memory.items()}
    assert used[0] - used[1] == pytest.approx(12 * params * (1 - 1 / 2), rel=0.02)
    assert used[0] - used[2] == pytest.approx(14 * params * (1 - 1 / 2), rel=0.02)
    assert memory[1].cost.optimizer_s == pytest.approx(memory[0].cost.optimizer_s / 2)
    assert {c.kind for c in memory[1].collectives if c.axis == "dp"} == {
        "all_gather", "reduce_scatter"
    }  # fmt: skip


def _largest_unit_numel(traced) -> float:
    """Parameters of the largest block, or of everything outside the blocks (an upper
    bound on what one pipeline unit holds)."""
    per_unit: dict[str, float] = {}
    for node in traced.graph_module.graph.find_nodes(op="placeholder"):
        if node.name in traced.param_fqns:
            name = traced.param_fqns[node.name]
            unit = name.split(".")[2] if ".h." in name else "outside"
            per_unit[unit] = per_unit.get(unit, 0) + node.meta["val"].numel()
    return max(per_unit.values())


def test_zero3_shards_the_weights_too(gpt_4096):
    """ZeRO-3 also keeps 1/dp of the 2 weight bytes, less what one unit holds gathered
    while it runs (at most the largest unit's weights), and pays per microbatch for two
    gathers and a reduce-scatter where ZeRO-2 pays one gather and one reduce-scatter."""
    params = gpt_4096[2] / 8
    two, three = (_plan(gpt_4096, zero=z, recompute="none") for z in (2, 3))
    assert three.zero == 3
    saved = two.cost.memory_per_device_bytes - three.cost.memory_per_device_bytes
    assert 0 < saved <= 2 * params * (1 - 1 / 2)
    largest_unit = _largest_unit_numel(gpt_4096[0]) / 8 * 2
    assert saved >= 2 * params * (1 - 1 / 2) - largest_unit
    kinds = sorted((c.kind, c.phase) for c in three.collectives if c.axis == "dp")
    assert kinds == [("all_gather", "backward"), ("all_gather", "forward"),
                     ("reduce_scatter", "backward")]  # fmt: skip
    assert three.cost.step_time_s > two.cost.step_time_s


def test_recomputation_trades_compute_for_memory(gpt_4096):
    plans = {
        mode: _plan(gpt_4096, zero=0, recompute=mode) for mode in ("none", "selective", "full")
    }
    compute = {mode: plan.cost.compute_s for mode, plan in plans.items()}
    assert compute["full"] / compute["none"] == pytest.approx(4 / 3, rel=0.05)
    assert 1 < compute["selective"] / compute["none"] < 1.05
    memory = [plans[m].cost.memory_per_device_bytes for m in ("none", "selective", "full")]
    assert memory[0] > memory[1] > memory[2]
    assert all(stage.recompute == "full" for stage in plans["full"].stages)


def test_gradient_accumulation_keeps_one_microbatch():
    """A 1.7B GPT on 32 A100s, global batch 512: plain data parallelism with accumulation
    fits (one microbatch's activations at a time) and is what the search picks."""
    traced, inputs = _gpt(24, 2304, 24, 1)
    mesh = Mesh.preset("a100-80gb", nodes=4)
    options = dict(dtype=torch.bfloat16, global_batch_size=512)
    pinned = autopar.plan(traced, inputs, mesh, dp=32, tp=1, pp=1, microbatch_size=1, **options)
    assert pinned.num_microbatches == 16
    assert pinned.cost.memory_per_device_bytes < 20 * 2**30
    free = autopar.plan(traced, inputs, mesh, **options)
    assert (free.dp, free.tp, free.pp) == (32, 1, 1) and free.num_microbatches > 1
    # fewer, larger microbatches when they fit: each one more sums the gradients again
    assert free.cost.step_time_s <= pinned.cost.step_time_s
