"""Sharding rules on their own: the candidates each op family offers."""

import torch
from conftest import tiny_gpt2, tiny_llama

from autopar.capture import capture
from autopar.placement import Partial, Replicate, Shard, parse_placement
from autopar.strategies import graph_strategies
from autopar.strategies.view import reshape_groups


def _by_target(traced, target):
    return [n for n in traced.graph_module.graph.nodes if n.target == target]


def test_placements_print_and_parse_back():
    for placement in (Replicate(), Partial(), Shard(1), Shard(-1), Shard(1, 3)):
        assert parse_placement(str(placement)) == placement


def test_reshape_groups_pair_dims_with_equal_products():
    assert reshape_groups((2, 16, 64), (2, 16, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert reshape_groups((32, 192), (2, 16, 192)) == [([0], [0, 1]), ([1], [2])]
    assert reshape_groups((1, 16, 64), (16, 64)) == [([1], [0]), ([2], [1])]


def test_matmul_offers_column_row_and_replicated():
    model, inputs = tiny_gpt2()
    traced = capture(model, inputs)
    strategies = graph_strategies(traced, 2)
    # attention output projection, (batch, seq, hidden) @ (hidden, hidden): Conv1D batched
    mm = _by_target(traced, torch.ops.aten.matmul.default)[1]
    texts = {str(s) for s in strategies.candidates[mm.name]}
    assert {"R <- (R, R)", "S(2) <- (R, S(1))", "P <- (S(2), S(0))"} <= texts


def test_fused_qkv_gets_a_block_interleaved_shard():
    model, inputs = tiny_gpt2()
    traced = capture(model, inputs)
    strategies = graph_strategies(traced, 2)
    qkv = _by_target(traced, torch.ops.aten.matmul.default)[0]
    assert any(s.output == Shard(2, 3) for s in strategies.candidates[qkv.name])


def test_batch_dims_stay_on_dp_and_sequence_dims_follow_the_pin():
    model, inputs = tiny_gpt2()
    traced = capture(model, inputs)
    ln = _by_target(traced, torch.ops.aten.layer_norm.default)[0].name  # (batch, seq, hidden)

    def outputs(**options):
        return [str(s.output) for s in graph_strategies(traced, 2, **options).candidates[ln]]

    assert outputs() == ["R", "S(1)"]  # the sequence dim may split: sequence parallelism
    assert outputs(sequence_parallel=False) == ["R"]
    assert outputs(sequence_parallel=True) == ["S(1)"]
    # the policy says which dims are batch: here both, so tp may split neither
    assert outputs(input_roles=lambda name, shape, dtype: ("batch",) * len(shape)) == ["R"]
    strategies = graph_strategies(traced, 2)
    assert strategies.roles[ln] == ("batch", "sequence", None)
    assert strategies.dp[ln].output == Shard(0)  # each replica holds its own rows
    assert strategies.dp["p_lm_head_weight"].output == Replicate()


def test_grouped_query_attention_shards_kv_heads_only_when_they_divide():
    model, inputs = tiny_llama(n_head=4, n_kv_head=2)
    traced = capture(model, inputs)
    sdpa = _by_target(traced, torch.ops.aten.scaled_dot_product_attention.default)[0]
    assert any(s.output == Shard(1) for s in graph_strategies(traced, 2).candidates[sdpa.name])
    kv_heads_view = _by_target(traced, torch.ops.aten.view.default)[1]  # k: (b, s, 2, hd)
    assert kv_heads_view.meta["val"].shape[2] == 2
    at_four = graph_strategies(traced, 4).candidates[kv_heads_view.name]
    assert all(s.output != Shard(2) for s in at_four)  # 2 kv heads cannot split 4 ways


def test_an_images_height_and_width_are_its_sequence_by_default():
    from autopar.strategies import default_input_roles

    assert default_input_roles("pixels", (2, 3, 32, 32), torch.float32) == (
        "batch", None, "sequence", "sequence",
    )  # fmt: skip
    assert default_input_roles("ids", (2, 16), torch.long) == ("batch", "sequence")
    assert default_input_roles("x", (2, 16), torch.float32) == ("batch", None)
