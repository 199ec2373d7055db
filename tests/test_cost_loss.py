"""The loss computed outside the traced graph is priced: a cross-entropy over the
model's output, forward and backward, on the rank that holds the output."""

import dataclasses

import pytest
import torch
from conftest import tiny_gpt2, write_profile

import autopar
from autopar.cost.loss import LOSS_BACKWARD_PASSES, LOSS_FORWARD_PASSES, LOSS_NODES
from autopar.cost.pricing import untraced_loss_price
from autopar.mesh import Mesh

BATCH, SEQ = 8, 16


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    return Mesh.local(1, calibration=write_profile(tmp_path_factory.mktemp("cal") / "c.json"))


def _step(graph, inputs, mesh) -> float:
    plan = autopar.plan(graph, inputs, mesh, global_batch_size=BATCH, recompute="none")
    return plan.cost.step_time_s


def _loss_extra(mesh, vocab: int) -> float:
    """What the untraced loss adds to the step of a tiny GPT-2 with `vocab` words."""
    model, inputs = tiny_gpt2(vocab_size=vocab, batch=BATCH, seq=SEQ)
    graph = autopar.capture(model, inputs)
    as_if_traced = dataclasses.replace(graph, traced_loss=True)  # nothing priced outside it
    return _step(graph, inputs, mesh) - _step(as_if_traced, inputs, mesh)


def _overhead(device) -> float:
    return LOSS_NODES * (device.op_overhead_s + device.backward_op_overhead_s)


@pytest.mark.parametrize("vocab", [128, 2048])
def test_an_untraced_loss_adds_its_passes_over_the_logits(mesh, vocab):
    """Without a calibrated loss (the GPU presets), its passes on the roofline."""
    roofline = dataclasses.replace(mesh.device, loss_seconds_per_byte=())
    mesh = dataclasses.replace(mesh, device=roofline)
    logits = BATCH * SEQ * vocab * 4  # float32
    passes = (LOSS_FORWARD_PASSES + LOSS_BACKWARD_PASSES) * logits / roofline.memory_bandwidth
    assert _loss_extra(mesh, vocab) == pytest.approx(passes + _overhead(roofline), rel=1e-6)


@pytest.mark.parametrize("vocab, per_byte", [(128, 1e-10), (2048, 1e-10), (16384, 1.5e-10)])
def test_a_calibrated_loss_costs_what_was_measured_at_its_size(mesh, vocab, per_byte):
    """The profile measured 1e-10 s/B at 1 MiB of logits and 2e-10 at 64 MiB: 64 KiB and
    1 MiB cost the first, 8 MiB (half way in log size) 1.5e-10."""
    logits = BATCH * SEQ * vocab * 4
    expected = logits * per_byte + _overhead(mesh.device)
    assert _loss_extra(mesh, vocab) == pytest.approx(expected, rel=1e-6)


def test_the_loss_is_priced_at_each_microbatchs_own_logits(mesh):
    """Two microbatches of 4 rows: each pays the cost per byte measured at its 4 MiB of
    logits (1/3 of the way from 1 MiB to 64 MiB in log size), not the traced 8 MiB's."""
    model, inputs = tiny_gpt2(vocab_size=16384, batch=BATCH, seq=SEQ)
    graph = autopar.capture(model, inputs)
    as_if_traced = dataclasses.replace(graph, traced_loss=True)
    pins = dict(global_batch_size=BATCH, dp=1, tp=1, pp=1, microbatches=2, recompute="none",
                zero=0)  # fmt: skip
    steps = [autopar.plan(g, inputs, mesh, **pins).cost.step_time_s for g in (graph, as_if_traced)]
    logits = BATCH // 2 * SEQ * 16384 * 4
    per_byte = 1e-10 + (2e-10 - 1e-10) / 3
    expected = 2 * (logits * per_byte + _overhead(mesh.device))
    assert steps[0] - steps[1] == pytest.approx(expected, rel=1e-6)


def test_a_traced_loss_or_no_training_prices_nothing_outside_the_graph(mesh):
    model, inputs = tiny_gpt2(batch=BATCH, seq=SEQ)
    target = torch.zeros(BATCH, SEQ, dtype=torch.long)

    def loss_fn(output, target):
        return torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), target.flatten())

    traced = autopar.capture(model, inputs, loss_fn=loss_fn, example_target=target)
    assert untraced_loss_price(traced, mesh, training=True, dtype_bytes=4) is None
    untraced = autopar.capture(model, inputs)
    assert untraced_loss_price(untraced, mesh, training=False, dtype_bytes=4) is None
    assert untraced_loss_price(untraced, mesh, training=True, dtype_bytes=4).compute_s > 0
