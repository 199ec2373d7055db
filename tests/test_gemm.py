"""A matmul's shape sets its share of a GPU's peak (cost/gemm.py); CPU ranks stay flat."""

import dataclasses

import pytest
import torch

import autopar
from autopar.cost.gemm import efficiency, local_products, product_efficiency
from autopar.models import build_model
from autopar.placement import Replicate, Shard

A100 = autopar.Mesh.preset("a100-80gb").device


def test_a_large_aligned_product_runs_at_the_device_efficiency_less_its_fill():
    big = product_efficiency((8192, 8192, 8192), A100)
    assert big == pytest.approx(A100.matmul_efficiency * 8192 / (8192 + A100.matmul_fill))
    assert big > product_efficiency((8192, 8192, 768), A100)  # a short inner loop fills less


def test_a_dim_off_the_tile_leaves_its_last_tiles_partly_idle():
    aligned = product_efficiency((2048, 128, 2048), A100)
    assert product_efficiency((2048, 96, 2048), A100) == pytest.approx(aligned * 96 / 128)
    assert product_efficiency((2048, 129, 2048), A100) == pytest.approx(aligned * 129 / 256)


def test_devices_without_a_tile_run_every_shape_flat():
    flat = dataclasses.replace(A100, matmul_tile=1, matmul_fill=0)
    for shape in ((8, 8, 8), (2048, 96, 2048), (8192, 8192, 8192)):
        assert product_efficiency(shape, flat) == flat.matmul_efficiency
    assert autopar.Mesh.local(2).device.matmul_tile == 1  # calibrated on the model's shapes


@pytest.fixture(scope="module")
def traced():
    model, inputs = build_model("gpt2", n_layer=1, batch=2, seq=256, n_embd=768, n_head=8)
    return autopar.capture(model, inputs)


def _node(traced, target, name_part):
    return next(
        n for n in traced.graph_module.graph.nodes if n.target == target and name_part in n.name
    )


def test_products_are_read_from_the_traced_shapes_and_the_placements(traced):
    sdpa = _node(traced, torch.ops.aten.scaled_dot_product_attention.default, "")
    replicated = tuple(Replicate() for _ in sdpa.all_input_nodes)
    assert local_products(sdpa, replicated, 1) == ((256, 256, 96), (256, 96, 256))
    fc = _node(traced, torch.ops.aten.matmul.default, "c_fc")
    x, w = fc.all_input_nodes
    m, k = x.meta["val"].shape[0] * x.meta["val"].shape[1], x.meta["val"].shape[-1]
    n = w.meta["val"].shape[-1]
    assert local_products(fc, (Replicate(), Shard(1)), 8) == ((m, n // 8, k),)  # column
    assert local_products(fc, (Shard(2), Shard(0)), 8) == ((m, n, k // 8),)  # row-parallel
    add = next(n for n in traced.graph_module.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert local_products(add, tuple(Replicate() for _ in add.all_input_nodes), 1) == ()


def test_sharding_a_small_model_further_costs_more_per_flop(traced):
    fc = _node(traced, torch.ops.aten.matmul.default, "c_fc")
    rates = [
        efficiency(local_products(fc, (Shard(2), Shard(0)), tp), A100, training=True)
        for tp in (1, 2, 4, 8)
    ]
    assert rates == sorted(rates, reverse=True) and rates[-1] < rates[0]
