"""When the search cannot plan, its error says the real cause: numbers that do not
divide, or how much memory the least-hungry layout needs and how many nodes would hold
a plan (checked by planning on that many nodes, and one fewer)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from autopar.api import plan as make_plan
from autopar.errors import AutoparError, PlanError
from autopar.mesh import Mesh
from autopar.models import build_model

A100 = Mesh.preset("a100-80gb")


def small_nodes(nodes: int, memory_mib: int) -> Mesh:
    """Nodes of two A100s with only `memory_mib` each: a model that fits on a few."""
    device = dataclasses.replace(A100.device, memory_bytes=memory_mib * 2**20)
    return dataclasses.replace(A100, nodes=nodes, devices_per_node=2, device=device)


@pytest.fixture(scope="module")
def gpt2_4():
    return build_model("gpt2", n_layer=4, batch=4, seq=128)


def test_microbatches_that_do_not_divide_the_batch():
    model, inputs = build_model("gpt2", n_layer=2, batch=8, seq=64)
    with pytest.raises(AutoparError, match="8 rows of one replica's batch do not split into 3 "
                       "microbatches; pin a microbatch count that divides 8"):  # fmt: skip
        make_plan(model, inputs, A100, pp=2, microbatches=3)


def test_a_global_batch_no_dp_divides():
    model, inputs = build_model("gpt2", n_layer=2, batch=2, seq=64)
    with pytest.raises(AutoparError, match="global batch of 7 rows does not split over dp = 2 "):
        make_plan(model, inputs, A100, dp=2, tp=4, global_batch_size=7)


def test_memory_error_names_the_need_and_the_nodes_that_fit(gpt2_4):
    model, inputs = gpt2_4
    with pytest.raises(PlanError) as caught:
        make_plan(model, inputs, small_nodes(1, 250))
    message = str(caught.value)
    assert "no plan fits in 250.0 MiB per device on 2 devices" in message
    need = re.search(r"least memory \(.*\) needs ([\d.]+) MiB per device", message)
    assert need and float(need.group(1)) > 250
    nodes = int(re.search(r"; (\d+) nodes \((\d+) devices\) would hold a plan", message)[1])
    assert nodes > 2 and "\n" not in message
    fits = make_plan(model, inputs, small_nodes(nodes, 250))  # as the error said
    assert fits.cost.memory_per_device_bytes <= 250 * 2**20
    with pytest.raises(PlanError, match="would hold a plan"):
        make_plan(model, inputs, small_nodes(nodes - 1, 250))


def test_memory_error_when_no_mesh_would_do(gpt2_4):
    model, inputs = gpt2_4
    with pytest.raises(PlanError, match=r"no mesh of up to \d+ nodes holds a plan either"):
        make_plan(model, inputs, small_nodes(1, 2))
