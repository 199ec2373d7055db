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


@pytest.mark.parametrize("vocab", [128, 2048])
def test_an_untraced_loss_adds_its_passes_over_the_logits(mesh, vocab):
    model, inputs = tiny_gpt2(vocab_size=vocab, batch=BATCH, seq=SEQ)
    graph = autopar.capture(model, inputs)
    as_if_traced = dataclasses.replace(graph, traced_loss=True)  # nothing priced outside it
    extra = _step(graph, inputs, mesh) - _step(as_if_traced, inputs, mesh)
    logits = BATCH * SEQ * vocab * 4  # float32
    device = mesh.device
    passes = (LOSS_FORWARD_PASSES + LOSS_BACKWARD_PASSES) * logits / device.memory_bandwidth
    overhead = LOSS_NODES * (device.op_overhead_s + device.backward_op_overhead_s)
    assert extra == pytest.approx(passes + overhead, rel=1e-6)


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
