"""Pipeline planning: the stage DP, schedules, unequal layers, GPT-3 175B on 1,024 GPUs."""

import itertools
import random

import pytest
import torch
from conftest import tiny_gpt2

from autopar.api import plan as make_plan
from autopar.capture import capture
from autopar.cost.pricing import price_sharding
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.solver.intra_op import solve_intra_op
from autopar.solver.pipeline import build_units, in_flight, unit_of_nodes
from autopar.solver.stages import Unit, best_split, best_split_brute_force, equal_layer_split
from autopar.strategies import graph_strategies


def _random_units(rng, count):
    return [
        Unit(f"u{i}", rng.uniform(0.5, 3), rng.uniform(0, 5), rng.uniform(0, 2), rng.uniform(0, 3))
        for i in range(count)
    ]


def test_stage_dp_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        units = _random_units(rng, rng.randint(2, 8))
        stages = rng.randint(1, len(units))
        p2p, alive, budget = (lambda b: 0.1 * b), (lambda k, n=stages: n - k), rng.uniform(5, 40)
        try:
            dp = best_split(units, stages, p2p, alive, budget)
        except ValueError:
            dp = None
        try:
            brute = best_split_brute_force(units, stages, p2p, alive, budget)
        except ValueError:
            brute = None
        assert (dp is None) == (brute is None)
        if dp is not None:
            assert dp.slowest_s == pytest.approx(brute.slowest_s)


def _brute_force_modes(by_mode, stages, p2p, alive, budget) -> float | None:
    """The slowest stage of the best split, each stage in its fastest mode that fits."""
    size, best = len(next(iter(by_mode.values()))), None
    for cuts in itertools.combinations(range(1, size), stages - 1):
        edges = (0, *cuts, size)
        slowest = 0.0
        for k, (i, j) in enumerate(zip(edges, edges[1:], strict=False)):
            costs = [
                sum(u.time_s for u in units[i:j]) + (0.1 * units[i - 1].out_bytes if i else 0)
                + (0.1 * units[j - 1].out_bytes if j < size else 0)
                for units in by_mode.values()
                if sum(u.param_bytes + alive(k) * u.activation_bytes for u in units[i:j])
                + max(u.transient_bytes for u in units[i:j]) <= budget
            ]  # fmt: skip
            slowest = max(slowest, min(costs, default=float("inf")))
        if slowest < float("inf") and (best is None or slowest < best):
            best = slowest
    return best


def test_stage_dp_with_recomputation_modes_matches_brute_force():
    """Each stage in its fastest mode that fits (slower modes keep less, and hold their
    recomputed activations while their backward runs), against every split."""
    rng = random.Random(1)
    for _ in range(200):
        fast = _random_units(rng, rng.randint(2, 8))
        slow = [
            Unit(u.name, u.time_s * 1.3, u.param_bytes, u.activation_bytes / 4, u.out_bytes,
                 u.activation_bytes / 2)
            for u in fast
        ]  # fmt: skip
        by_mode = {"none": fast, "full": slow}
        stages = rng.randint(1, len(fast))
        p2p, alive, budget = (lambda b: 0.1 * b), (lambda k, n=stages: n - k), rng.uniform(5, 40)
        try:
            dp = best_split(by_mode, stages, p2p, alive, budget).slowest_s
        except ValueError:
            dp = None
        brute = _brute_force_modes(by_mode, stages, p2p, alive, budget)
        assert (dp is None) == (brute is None)
        if dp is not None:
            assert dp == pytest.approx(brute)


def test_large_vocabulary_head_moves_the_split():
    # 8 blocks and a 256k-token head: the last stage should take fewer blocks
    model, inputs = build_model("gpt2", n_layer=8, vocab_size=256_000, seq=1024)
    traced = capture(model, inputs)
    mesh = Mesh.preset("a100-80gb", nodes=1)
    strategies = graph_strategies(traced, 2)
    result = solve_intra_op(traced, strategies, mesh, 2, dtype_bytes=2)
    pricing = price_sharding(traced, result.strategies, mesh, 2, training=True, dtype_bytes=2)
    units = build_units(traced, pricing, unit_of_nodes(traced), scale=1.0, state_bytes_per_param=16)
    p2p, alive = (lambda b: 0.0), in_flight("1f1b", 4, 8, 1)
    chosen = best_split(units, 4, p2p, alive, float("inf"))
    equal = equal_layer_split(units, 4, p2p, alive)
    assert chosen.bounds != equal.bounds
    assert chosen.slowest_s < equal.slowest_s
    last_blocks = chosen.bounds[-1][1] - chosen.bounds[-1][0] - 1  # minus the epilogue unit
    assert last_blocks < 2


def test_pins_are_honoured():
    model, inputs = tiny_gpt2(n_layer=4, batch=8)
    plan = make_plan(
        model, inputs, Mesh.local(8), dp=2, tp=2, pp=2, microbatches=4, schedule="GPipe"
    )
    assert (plan.dp, plan.tp, plan.pp, plan.num_microbatches) == (2, 2, 2, 4)
    assert (plan.microbatch_size, plan.schedule) == (2, "gpipe")
    assert len(plan.stages) == 2 and plan.stages[0].layers and plan.stages[1].layers
    interleaved = make_plan(
        model, inputs, Mesh.local(8), pp=2, microbatches=4, schedule="interleaved1f1b"
    )
    assert len(interleaved.stages) == 4
    assert [s.pp_rank for s in interleaved.stages] == [0, 1, 0, 1]


def test_impossible_pins_say_why():
    model, inputs = tiny_gpt2(n_layer=2, batch=4)
    with pytest.raises(AutoparError, match="schedule"):
        make_plan(model, inputs, Mesh.local(2), pp=2, schedule="zigzag")
    with pytest.raises(AutoparError, match="pipeline units"):
        make_plan(model, inputs, Mesh.local(8), pp=8)


def test_gpt3_175b_on_128_nodes_fits():
    model, inputs = build_model("gpt3-175b", seq=2048)
    traced = capture(model, inputs)
    mesh = Mesh.preset("a100-80gb", nodes=128)
    plan = make_plan(traced, None, mesh, global_batch_size=1536, dtype=torch.bfloat16)
    assert plan.tp <= mesh.devices_per_node
    assert plan.dp * plan.tp * plan.pp == 1024
    assert plan.dp * plan.num_microbatches * plan.microbatch_size == 1536
    assert plan.cost.memory_per_device_bytes <= 80 * 2**30
    assert all(stage.memory_bytes <= 80 * 2**30 for stage in plan.stages)
