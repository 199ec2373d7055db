"""analyze(): FLOPs, bytes, params, layer ids and block classes of captured graphs."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama, tiny_nanogpt

from autopar.analyze import GraphAnalysis, NodeInfo, analyze
from autopar.capture import capture


def _by_target(analysis: GraphAnalysis, target: str) -> list[NodeInfo]:
    return [info for info in analysis.nodes.values() if info.target == target]


class _Attention(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim * kv_heads // heads, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv(x).view(B, T, 2 * self.kv_heads, -1).transpose(1, 2).chunk(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.matmul(y, torch.ones(C // self.heads, 3)) @ torch.ones(3, 5)


def test_matmul_and_attention_flops_follow_the_formulas():
    b, t, dim, heads, kv_heads = 2, 8, 32, 4, 2
    analysis = capture(_Attention(dim, heads, kv_heads), (torch.randn(b, t, dim),)).analysis
    head_dim = dim // heads
    (q_matmul,) = [
        i for i in _by_target(analysis, "aten.linear.default") if "p_q_weight" in i.params
    ]
    assert q_matmul.flops == 2 * b * t * dim * dim
    (sdpa,) = _by_target(analysis, "aten.scaled_dot_product_attention.default")
    assert sdpa.flops == 4 * b * heads * t * t * head_dim
    matmuls = _by_target(analysis, "aten.matmul.default")
    assert sorted(m.flops for m in matmuls) == sorted(
        [2 * b * heads * t * head_dim * 3, 2 * b * heads * t * 3 * 5]
    )
    assert analysis.total_flops == sum(i.flops for i in analysis.nodes.values())


def test_elementwise_ops_count_zero_flops():
    analysis = capture(*tiny_gpt2()).analysis
    for info in _by_target(analysis, "aten.add.Tensor") + _by_target(analysis, "aten.tanh.default"):
        assert info.flops == 0


def test_views_move_no_bytes_and_matmuls_read_their_inputs():
    analysis = capture(*tiny_gpt2(batch=2, seq=16, n_embd=64)).analysis
    for view in _by_target(analysis, "aten.view.default") + _by_target(
        analysis, "aten.transpose.int"
    ):
        assert (view.bytes_read, view.bytes_written) == (0, 0)
        assert view.output_bytes > 0
    c_attn = next(i for i in _by_target(analysis, "aten.matmul.default") if i.shape[-1] == 192)
    assert c_attn.bytes_read == (32 * 64 + 64 * 192) * 4
    assert c_attn.bytes_written == 32 * 192 * 4
    assert c_attn.params == ("p_transformer_h_0_attn_c_attn_weight",)


def test_embedding_reads_its_rows_not_the_table():
    analysis = capture(*tiny_gpt2(batch=2, seq=16, n_embd=64, vocab_size=128)).analysis
    token_embedding = _by_target(analysis, "aten.embedding.default")[0]
    rows = 2 * 16 * 64 * 4
    assert token_embedding.bytes_written == rows
    assert token_embedding.bytes_read == rows + 2 * 16 * 8  # + the int64 ids


def test_split_reports_one_shape_per_output():
    analysis = capture(*tiny_nanogpt(batch=2, seq=16, n_embd=64)).analysis
    split = _by_target(analysis, "aten.split.Tensor")[0]
    assert split.shape is None
    assert split.shapes == ((2, 16, 64),) * 3
    assert split.dtype == torch.float32


def test_layers_cover_block_nodes_and_their_weights_only():
    analysis = capture(*tiny_llama(n_layer=2)).analysis
    assert analysis.block_classes == [0, 0]
    layer0 = set(analysis.layers[0])
    assert "p_model_layers_0_self_attn_q_proj_weight" in layer0
    assert analysis.nodes["p_model_layers_0_self_attn_q_proj_weight"].layer == 0
    for outside in ("p_model_embed_tokens_weight", "p_lm_head_weight", "input_ids"):
        assert analysis.nodes[outside].layer is None
        assert analysis.nodes[outside].position is None
    for layer, names in enumerate(analysis.layers):
        assert all(analysis.nodes[n].layer == layer for n in names)


class _Head(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim // 2)

    def forward(self, x):
        return self.proj(x)


class _Block(nn.Module):
    """A block with its own ModuleList (per-head modules), as in Karpathy's lecture GPT."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleList([_Head(dim) for _ in range(2)])

    def forward(self, x):
        return x + torch.cat([head(x) for head in self.heads], dim=-1)


class _Stack(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d) for d in dims])
        self.resize = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False)])

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.resize):
                x = self.resize[i](x)
        return x


def test_nested_module_lists_do_not_split_a_block_and_shapes_split_classes():
    traced = capture(_Stack([8, 8, 16, 8]), (torch.randn(2, 8),))
    analysis = traced.analysis
    # blocks.0, resize.0, blocks.1, resize.1, ...: two containers, interleaved in graph order
    assert traced.num_layers == 7
    assert analysis.block_classes == [0, 1, 0, 2, 3, 4, 0]
    assert analysis.nodes["p_blocks_1_heads_1_proj_weight"].layer == 2
    assert analysis.nodes["x"].layer is None  # a user input is in no block


def test_networkx_view_carries_node_info_and_edge_bytes():
    analysis = capture(*tiny_gpt2()).analysis
    graph = analysis.to_networkx()
    assert nx.is_directed_acyclic_graph(graph)
    assert set(graph.nodes) == set(analysis.nodes)
    for u, v, data in graph.edges(data=True):
        assert data["bytes"] == analysis.nodes[u].output_bytes
        assert graph.nodes[v]["op"] == "call_function"
    mm = _by_target(analysis, "aten.matmul.default")[0]
    assert graph.nodes[mm.name]["flops"] == mm.flops


def test_analyze_without_param_names_leaves_params_empty():
    traced = capture(*tiny_gpt2())
    plain = analyze(traced.graph_module)
    assert all(info.params == () for info in plain.nodes.values())
    assert plain.total_flops == traced.flops


@pytest.mark.parametrize("seq", [16, 32])
def test_attention_flops_grow_quadratically_in_sequence(seq):
    analysis = capture(*tiny_gpt2(seq=seq, batch=1, n_embd=64, n_head=4)).analysis
    sdpa = _by_target(analysis, "aten.scaled_dot_product_attention.default")[0]
    assert sdpa.flops == 4 * seq * seq * 64


class _ConvEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.proj = nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        y = self.patch(x)  # (B, 8, 4, 4)
        return torch.einsum("bchw,cd->bhwd", y, self.proj)


def test_other_composite_ops_are_counted_through_their_decomposition():
    analysis = capture(_ConvEinsum(), (torch.randn(2, 3, 16, 16),)).analysis
    (conv,) = _by_target(analysis, "aten.conv2d.default")
    assert conv.flops == 2 * (2 * 8 * 4 * 4) * (3 * 4 * 4)
    (einsum,) = _by_target(analysis, "aten.einsum.default")
    assert einsum.flops == 2 * (2 * 4 * 4 * 5) * 8
