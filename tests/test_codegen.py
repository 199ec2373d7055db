"""Graph rewriting and ParallelModule in one process (tp=1 runs the collectives as identities).

The multi-process checks of the same code live in test_runtime_parity.py.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
from test_runtime_parity import (
    GPT2_SEEDS,
    LLAMA_SEEDS,
    gpt2_megatron,
    megatron_placements,
    tiny_gpt2,
    tiny_llama,
    tiny_megatron,
    tiny_transformer,
)

from autopar.capture import capture
from autopar.codegen import NodePlacement, annotated_code, shard_graph
from autopar.errors import AutoparError, PlanError
from autopar.placement import Partial, Replicate, Shard
from autopar.runtime import ParallelModule

R, P = Replicate(), Partial()

TINY_TRANSFORMER_TP2 = """\
def forward(self, p_emb_weight, p_qkv_weight, p_qkv_bias, p_proj_weight, p_proj_bias, p_norm_weight, p_norm_bias, p_fc_weight, p_fc_bias, p_out_weight, p_out_bias, p_head_weight, ids):
    emb_embedding = torch.ops.aten.embedding.default(p_emb_weight, ids)  # S(2) (2, 8, 8)
    emb_embedding_all_gather = redistribute(emb_embedding, 'tp', 'S(2)', 'R', 'P')  # R (2, 8, 16); forward all_gather(2); backward reduce_scatter(2)
    qkv_matmul = torch.ops.aten.linear.default(emb_embedding_all_gather, p_qkv_weight)  # S(2,g3) (2, 8, 24)
    qkv_bias = torch.ops.aten.add.Tensor(qkv_matmul, p_qkv_bias)  # S(2,g3) (2, 8, 24)
    split = torch.ops.aten.split.Tensor(qkv_bias, 8, 2)  # S(2), S(2), S(2) ((2, 8, 8), (2, 8, 8), (2, 8, 8))
    split_0 = split[0]  # S(2) (2, 8, 8)
    split_1 = split[1]  # S(2) (2, 8, 8)
    split_2 = split[2]  # S(2) (2, 8, 8)
    split_0_view = torch.ops.aten.view.default(split_0, [2, 8, 2, 4])  # S(2) (2, 8, 2, 4)
    transpose = torch.ops.aten.transpose.int(split_0_view, 1, 2)  # S(1) (2, 2, 8, 4)
    split_1_view = torch.ops.aten.view.default(split_1, [2, 8, 2, 4])  # S(2) (2, 8, 2, 4)
    transpose_1 = torch.ops.aten.transpose.int(split_1_view, 1, 2)  # S(1) (2, 2, 8, 4)
    split_2_view = torch.ops.aten.view.default(split_2, [2, 8, 2, 4])  # S(2) (2, 8, 2, 4)
    transpose_2 = torch.ops.aten.transpose.int(split_2_view, 1, 2)  # S(1) (2, 2, 8, 4)
    scaled_dot_product_attention = torch.ops.aten.scaled_dot_product_attention.default(transpose, transpose_1, transpose_2, None, 0.0, True)  # S(1) (2, 2, 8, 4)
    transpose_3 = torch.ops.aten.transpose.int(scaled_dot_product_attention, 1, 2)  # S(2) (2, 8, 2, 4)
    transpose_3_reshape = torch.ops.aten.reshape.default(transpose_3, [2, 8, 8])  # S(2) (2, 8, 8)
    proj_matmul = torch.ops.aten.linear.default(transpose_3_reshape, p_proj_weight)  # P (2, 8, 16)
    proj_matmul_all_reduce = redistribute(proj_matmul, 'tp', 'P', 'R', 'R')  # R (2, 8, 16); forward all_reduce; backward identity
    proj_bias = torch.ops.aten.add.Tensor(proj_matmul_all_reduce, p_proj_bias)  # R (2, 8, 16)
    proj_bias_chunk = redistribute(proj_bias, 'tp', 'R', 'S(2)', 'S(2)')  # S(2) (2, 8, 8); forward chunk(2); backward all_gather(2)
    add = torch.ops.aten.add.Tensor(emb_embedding, proj_bias_chunk)  # S(2) (2, 8, 8)
    add_all_gather = redistribute(add, 'tp', 'S(2)', 'R', 'R')  # R (2, 8, 16); forward all_gather(2); backward chunk(2)
    norm_layer_norm = torch.ops.aten.layer_norm.default(add_all_gather, [16], p_norm_weight, p_norm_bias, 1e-05, False)  # R (2, 8, 16)
    norm_layer_norm_to_parallel = redistribute(norm_layer_norm, 'tp', 'R', 'R', 'P')  # R (2, 8, 16); forward identity; backward all_reduce
    fc_matmul = torch.ops.aten.linear.default(norm_layer_norm_to_parallel, p_fc_weight)  # S(2) (2, 8, 16)
    fc_bias = torch.ops.aten.add.Tensor(fc_matmul, p_fc_bias)  # S(2) (2, 8, 16)
    gelu = torch.ops.aten.gelu.default(fc_bias)  # S(2) (2, 8, 16)
    out_matmul = torch.ops.aten.linear.default(gelu, p_out_weight)  # P (2, 8, 16)
    out_matmul_all_reduce = redistribute(out_matmul, 'tp', 'P', 'R', 'R')  # R (2, 8, 16); forward all_reduce; backward identity
    out_bias = torch.ops.aten.add.Tensor(out_matmul_all_reduce, p_out_bias)  # R (2, 8, 16)
    out_bias_chunk = redistribute(out_bias, 'tp', 'R', 'S(2)', 'S(2)')  # S(2) (2, 8, 8); forward chunk(2); backward all_gather(2)
    add_1 = torch.ops.aten.add.Tensor(add, out_bias_chunk)  # S(2) (2, 8, 8)
    add_1_all_gather = redistribute(add_1, 'tp', 'S(2)', 'R', 'P')  # R (2, 8, 16); forward all_gather(2); backward reduce_scatter(2)
    head_linear = torch.ops.aten.linear.default(add_1_all_gather, p_head_weight)  # S(2) (2, 8, 16)
    head_linear_all_gather = redistribute(head_linear, 'tp', 'S(2)', 'R', 'R')  # R (2, 8, 32); forward all_gather(2); backward chunk(2)
    return (head_linear_all_gather,)
"""


@pytest.fixture(scope="module")
def gpt2():
    model, inputs = tiny_gpt2()
    return model, inputs, capture(model, inputs)


def _lines(graph_module) -> list[str]:
    return [line.strip() for line in graph_module.code.splitlines()]


def _count(graph_module, kind: str) -> int:
    """Inserted reshards whose forward runs `kind` ("to_parallel": Megatron's f)."""
    count = 0
    for node in graph_module.graph.nodes:
        entry = node.meta.get("reshard")
        if entry is not None:
            kinds = [step.kind for step in entry.forward] or ["to_parallel"]
            count += kind in kinds
    return count


# --- shard_graph ----------------------------------------------------------------------------


def test_generated_code_snapshot():
    """The whole generated source of a small model; update it when a change is intended."""
    model, inputs = tiny_transformer()
    traced = capture(model, inputs)
    code = annotated_code(shard_graph(traced, tiny_megatron(traced, 2), 2))
    assert code == TINY_TRANSFORMER_TP2, f"generated code changed; new code:\n{code}"
    compile(code, "<generated>", "exec")


def test_traced_graph_is_left_alone(gpt2):
    _, _, traced = gpt2
    before = traced.graph_module.code
    shard_graph(traced, gpt2_megatron(traced, 2), 2)
    assert traced.graph_module.code == before


def test_replicated_plan_changes_nothing(gpt2):
    _, _, traced = gpt2
    assert shard_graph(traced, {}, 4).code == traced.graph_module.code


def test_megatron_gpt2_lines(gpt2):
    _, _, traced = gpt2
    lines = _lines(shard_graph(traced, gpt2_megatron(traced, 2), 2))
    expected = [
        # the tied embedding
        "p_lm_head_weight_all_gather = redistribute(p_lm_head_weight, 'tp', 'S(0)', 'R', 'R')",
        "transformer_h0_ln_1_layer_norm_to_parallel = redistribute("
        "transformer_h0_ln_1_layer_norm, 'tp', 'R', 'R', 'P');  transformer_h0_ln_1_layer_norm = None",
        "transformer_h0_attn_split = torch.ops.aten.split.Tensor("
        "transformer_h0_attn_c_attn_bias, 32, 2);  transformer_h0_attn_c_attn_bias = None",
        "transformer_h0_attn_c_proj_matmul_all_reduce = redistribute("
        "transformer_h0_attn_c_proj_matmul, 'tp', 'P', 'R', 'R');  "
        "transformer_h0_attn_c_proj_matmul = None",
        "lm_head_linear_all_gather = redistribute(lm_head_linear, 'tp', 'S(2)', 'R', 'R');  "
        "lm_head_linear = None",
        "return (lm_head_linear_all_gather,)",
    ]
    for line in expected:
        assert line in lines, line


def test_one_collective_per_producer_and_placement():
    model, inputs = tiny_llama()
    traced = capture(model, inputs)
    gm = shard_graph(traced, megatron_placements(traced, 2, LLAMA_SEEDS), 2)
    # q, k and v projections read one hidden-sharded normalized input: one all-gather for
    # all three, whose backward reduce-scatters their summed partial gradients.
    norm = "model_layers0_input_layernorm_mul_1"
    copies = [n for n in gm.graph.nodes if n.name.startswith(f"{norm}_")]
    assert [n.name for n in copies] == [f"{norm}_all_gather"]
    assert [s.kind for s in copies[0].meta["reshard"].backward] == ["reduce_scatter"]
    assert len(copies[0].users) == 3


def test_column_and_row_parallel_insert_megatron_pair(gpt2):
    _, _, traced = gpt2
    gm = shard_graph(traced, gpt2_megatron(traced, 2), 2)
    assert _count(gm, "all_reduce") == 2  # attention and MLP outputs
    assert _count(gm, "to_parallel") == 3  # their inputs, and the LM head's
    for node in gm.graph.nodes:
        if node.target is operator.getitem:
            assert node.meta["placement"] == Shard(2)


def test_sequence_parallel_uses_reduce_scatter(gpt2):
    _, _, traced = gpt2
    placements = megatron_placements(traced, 2, GPT2_SEEDS, sequence_parallel=True)
    gm = shard_graph(traced, placements, 2)
    assert _count(gm, "reduce_scatter") == 2 and _count(gm, "all_reduce") == 0


def _linear_model():
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    return model, capture(model, (torch.randn(3, 6),))


def _linear_node(traced):
    return next(n for n in traced.graph_module.graph.nodes if n.op == "call_function")


def test_inconsistent_edge_is_a_plan_error():
    _, traced = _linear_model()
    linear = _linear_node(traced)
    weight, x = linear.all_input_nodes
    placements = {linear.name: NodePlacement(R, (P, R) if weight.op == "placeholder" else (R, P))}
    with pytest.raises(PlanError, match="no collective turns"):
        shard_graph(traced, placements, 2)


def test_wrong_input_count_names_the_node():
    _, traced = _linear_model()
    linear = _linear_node(traced)
    with pytest.raises(PlanError, match=f"placement of {linear.name} lists 1 inputs"):
        shard_graph(traced, {linear.name: NodePlacement(R, (R,))}, 2)


def test_an_indivisible_shard_pads_unless_grouped():
    model, traced = _linear_model()  # Linear(6, 4) on 3 rows
    linear = _linear_node(traced)
    with pytest.raises(PlanError, match="divide by groups x tp"):
        shard_graph(traced, {linear.name: NodePlacement(Shard(1, 3), (R, R))}, 2)
    # 3 rows over 2 ranks: shards of 2, the second one's last row padding; the gather
    # that returns the output drops it
    gm = shard_graph(traced, {linear.name: NodePlacement(Shard(0), (R, R))}, 2)
    assert "'S(0)', 'R', 'R', [3, 4])" in gm.code
    assert [n.meta.get("local_shape") for n in gm.graph.nodes if n.name == linear.name] == [(2, 4)]


def test_split_across_shard_blocks_is_a_plan_error():
    model, inputs = tiny_transformer()
    traced = capture(model, inputs)
    placements = tiny_megatron(traced, 2)
    split = next(n for n in traced.graph_module.graph.nodes if "split" in n.name)
    placements[split.name] = NodePlacement((Shard(2),) * 3, (Shard(2),))
    with pytest.raises(PlanError, match="not a multiple of the shard block size"):
        shard_graph(traced, placements, 2)


# --- ParallelModule on one rank ---------------------------------------------------------------


def test_single_rank_module_matches_model_and_state(gpt2):
    model, inputs, traced = gpt2
    for placements in ({}, gpt2_megatron(traced, 1)):  # tp=1: collectives are identities
        pm = ParallelModule(traced, placements, model)
        assert torch.equal(pm(*inputs).logits, model(*inputs).logits)
        state, original = pm.full_state_dict(), model.state_dict()
        assert list(state) == list(original)
        assert all(torch.equal(state[k], original[k]) for k in original)
    distinct = {id(p) for p in model.parameters()}
    assert len(list(pm.parameters())) == len(distinct)  # tied weights held once


def test_load_full_state_dict_round_trip_and_errors(gpt2):
    model, inputs, traced = gpt2
    pm = ParallelModule(traced, {}, model)
    state = {k: v + 1.0 for k, v in model.state_dict().items()}
    pm.load_full_state_dict(state)
    assert all(torch.equal(pm.full_state_dict()[k], state[k]) for k in state)
    broken = dict(state)
    del broken["transformer.wpe.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["transformer.ln_f.bias"] = torch.zeros(3)
    with pytest.raises(AutoparError) as error:
        pm.load_full_state_dict(broken)
    for text in ("transformer.wpe.weight", "extra.weight", "transformer.ln_f.bias: got (3,)"):
        assert text in str(error.value)


def test_optimizer_steps_local_parameters(gpt2):
    model, inputs, traced = gpt2
    pm = ParallelModule(traced, {}, model)
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.1)
    pm(*inputs).logits.sum().backward()
    optimizer.step()
    assert not torch.equal(pm.full_state_dict()["lm_head.weight"], model.lm_head.weight)


def test_meta_device_model_then_load(gpt2):
    model, inputs, traced = gpt2
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    pm = ParallelModule(traced, {}, skeleton)
    pm.load_full_state_dict(model.state_dict())
    assert torch.equal(pm(*inputs).logits, model(*inputs).logits)


def test_input_structure_must_match(gpt2):
    model, inputs, traced = gpt2
    pm = ParallelModule(traced, {}, model)
    with pytest.raises(AutoparError, match="do not match the ones the model was captured"):
        pm(*inputs, inputs[0])


class _Norm(nn.Module):
    """BatchNorm in training mode (buffer mutations), a lifted constant and a keyword input."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.scale = torch.tensor(3.0)  # not a buffer: export lifts it as a constant

    def forward(self, x, *, shift):
        return self.norm(x) * self.scale + shift


def test_buffer_mutations_constants_and_keywords():
    model = _Norm().train()
    x, shift = torch.randn(5, 4), torch.randn(4)
    traced = capture(_Norm().train(), (x,), {"shift": shift})
    pm = ParallelModule(traced, {}, model)
    out = pm(x, shift=shift)
    expected = model(x, shift=shift)
    torch.testing.assert_close(out, expected)
    state = pm.full_state_dict()
    torch.testing.assert_close(state["norm.running_mean"], model.norm.running_mean)
    assert state["norm.num_batches_tracked"] == 1


def test_tp_size_must_match_the_group(gpt2):
    model, _, traced = gpt2
    with pytest.raises(AutoparError, match="tp_size=2, tp_rank=None disagree"):
        ParallelModule(traced, {}, model, tp_size=2)
