"""Alpha-beta collective formulas, roofline compute time and the training memory model."""

import pytest

from autopar.cost import (
    COLLECTIVE_KINDS,
    collective_time,
    compute_time,
    training_memory,
    training_time,
)
from autopar.errors import AutoparError
from autopar.mesh import DeviceSpec

BW = 100e9
LAT = 5e-6
S = 2**30


@pytest.mark.parametrize(
    ("kind", "factor", "steps"),
    [
        ("all_reduce", 2 * 7 / 8, 14),
        ("all_gather", 7 / 8, 7),
        ("reduce_scatter", 7 / 8, 7),
        ("all_to_all", 7 / 8 / 8, 7),  # each rank's buffer is S/8
    ],
)
def test_bus_bandwidth_factors(kind, factor, steps):
    assert collective_time(kind, S, 8, BW, LAT) == pytest.approx(steps * LAT + factor * S / BW)


def test_send_recv_is_one_message():
    assert collective_time("send_recv", S, 2, BW, LAT) == pytest.approx(LAT + S / BW)
    with pytest.raises(AutoparError, match="one sender"):
        collective_time("send_recv", S, 3, BW, LAT)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    pieces = sum(collective_time(k, S, 8, BW, LAT) for k in ("reduce_scatter", "all_gather"))
    assert collective_time("all_reduce", S, 8, BW, LAT) == pytest.approx(pieces)


@pytest.mark.parametrize("kind", COLLECTIVE_KINDS)
def test_latency_dominates_tiny_messages(kind):
    t = collective_time(kind, 8, 2, BW, LAT)
    assert t == pytest.approx(LAT * (2 if kind == "all_reduce" else 1), rel=1e-3)


@pytest.mark.parametrize("kind", COLLECTIVE_KINDS)
def test_one_rank_costs_nothing(kind):
    assert collective_time(kind, S, 1, BW, LAT) == 0.0


def test_bad_collective_inputs():
    with pytest.raises(AutoparError, match="valid kinds: all_reduce"):
        collective_time("allreduce", S, 2, BW, LAT)
    with pytest.raises(AutoparError, match="nbytes=-5"):
        collective_time("all_reduce", -5, 2, BW, LAT)
    with pytest.raises(AutoparError, match="num_ranks=0"):
        collective_time("all_reduce", S, 0, BW, LAT)


DEVICE = DeviceSpec(
    "test", peak_flops=100e12, memory_bandwidth=1e12, memory_bytes=2**34, matmul_efficiency=0.5
)


def test_roofline_picks_the_slower_side():
    # 1e12 FLOP at 50 TFLOP/s effective = 20 ms; 1e9 bytes at 1 TB/s = 1 ms.
    assert compute_time(1e12, 1e9, DEVICE) == pytest.approx(0.02)
    # 1e9 FLOP = 20 us; 1e10 bytes = 10 ms: memory bound.
    assert compute_time(1e9, 1e10, DEVICE) == pytest.approx(0.01)


def test_training_is_three_forwards():
    assert training_time(1e12, 1e9, DEVICE) == pytest.approx(3 * 0.02)
    assert training_time(1e9, 1e10, DEVICE) == pytest.approx(2 * 0.01)  # bytes: 1 + 1


def test_negative_counts_rejected():
    with pytest.raises(AutoparError, match="flops=-1"):
        compute_time(-1, 0, DEVICE)


GPT3_PARAMS = 175e9


def test_mixed_precision_adam_is_16_bytes_per_param():
    mem = training_memory(GPT3_PARAMS, 0)
    assert (mem.params, mem.grads, mem.optimizer) == (
        2 * GPT3_PARAMS,
        2 * GPT3_PARAMS,
        12 * GPT3_PARAMS,
    )
    assert mem.total == pytest.approx(2.8e12)


def test_model_parallel_shards_divide_model_states():
    tp, pp = 8, 8
    mem = training_memory(GPT3_PARAMS, 0, param_shard=tp * pp)
    assert mem.total == pytest.approx(2.8e12 / 64)


def test_fp32_and_sgd():
    fp32 = training_memory(1e9, 0, dtype_bytes=4, mixed_precision=False)
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4e9, 4e9, 8e9)
    sgd = training_memory(1e9, 0, optimizer="sgd")
    assert sgd.optimizer == 4e9  # only the fp32 master copy
    assert training_memory(1e9, 0, dtype_bytes=4, optimizer="sgd").optimizer == 0


@pytest.mark.parametrize(
    ("stage", "divided"),
    [
        (0, ()),
        (1, ("optimizer",)),
        (2, ("optimizer", "grads")),
        (3, ("optimizer", "grads", "params")),
    ],
)
def test_zero_stages_shard_over_dp(stage, divided):
    base = training_memory(1e9, 0)
    mem = training_memory(1e9, 0, zero_stage=stage, dp=4)
    for part in ("params", "grads", "optimizer"):
        scale = 4 if part in divided else 1
        assert getattr(mem, part) == getattr(base, part) / scale


def test_activations_times_microbatches():
    mem = training_memory(0, 1e9, microbatches_in_flight=4)
    assert mem.activations == 4e9 and mem.total == 4e9


def test_bad_memory_inputs():
    with pytest.raises(AutoparError, match="lion.*adam.*sgd"):
        training_memory(1e9, 0, optimizer="lion")
    with pytest.raises(AutoparError, match="zero_stage=4"):
        training_memory(1e9, 0, zero_stage=4)
    with pytest.raises(AutoparError, match="dp=0"):
        training_memory(1e9, 0, dp=0)
