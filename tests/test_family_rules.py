"""Rules added for the Hugging Face families, on small modules: the candidates they offer.

Whether the generated code then computes the right numbers is tests/test_families.py's
job (22 families on real gloo ranks); here each rule is checked to offer the shard
Megatron's layout needs, and not one that would be wrong.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from autopar.capture import capture
from autopar.strategies import graph_strategies

aten = torch.ops.aten


def _candidates(module: nn.Module, *inputs, tp: int = 2) -> tuple[dict, dict]:
    """Nodes by target, and each node's candidates as text; no dim has a batch role."""
    traced = capture(module, inputs)
    nodes = {}
    for node in traced.graph_module.graph.nodes:
        nodes.setdefault(node.target, []).append(node.name)
    no_roles = lambda name, shape, dtype: (None,) * len(shape)  # noqa: E731 (rules alone)
    strategies = graph_strategies(traced, tp, input_roles=no_roles)
    return nodes, {name: {str(s) for s in c} for name, c in strategies.candidates.items()}


class TransposedWeight(nn.Module):
    """Falcon's `x @ self.weight.T` (exported as numpy_T)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return x @ self.weight.T


def test_numpy_t_carries_a_column_shard_of_the_weight():
    nodes, found = _candidates(TransposedWeight(), torch.randn(2, 4, 8))
    (transposed,) = nodes[aten.numpy_T.default]
    (matmul,) = nodes[aten.matmul.default]
    assert "S(1) <- (S(0))" in found[transposed]  # weight rows are output features
    assert "S(2) <- (R, S(1))" in found[matmul]  # column-parallel
    assert "P <- (S(2), S(0))" in found[matmul]  # row-parallel


class FusedGateUp(nn.Module):
    """Phi-3's gate_up_proj, cut by chunk; and a qkv projection cut by three slices."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.qkv = nn.Linear(8, 16, bias=False), nn.Linear(8, 24, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        qkv = self.qkv(x)
        q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
        return torch.nn.functional.silu(gate) * up, q * k + v


def test_fused_projections_split_block_interleaved_into_their_parts():
    nodes, found = _candidates(FusedGateUp(), torch.randn(2, 4, 8))
    gate_up, qkv = nodes[aten.linear.default]
    assert "S(2,g2) <- (R, S(0,g2))" in found[gate_up]
    assert "S(2,g3) <- (R, S(0,g3))" in found[qkv]
    (chunk,) = nodes[aten.chunk.default]
    assert "S(2) <- (S(2,g2))" in found[chunk]
    assert all("S(2) <- (S(2,g3))" in found[s] for s in nodes[aten.slice.Tensor])


class Gather(nn.Module):
    """A constant-index gather along the heads dim (Falcon's k, v split) and GPT-J's
    interleaved rotary (stack, flatten, repeat_interleave)."""

    def forward(self, x, cos):
        heads = x[:, :, torch.tensor([0, 2])]  # (b, s, 2, d)
        pairs = torch.stack((-heads[..., 1::2], heads[..., ::2]), dim=-1).flatten(-2)
        return pairs * cos.repeat_interleave(2, dim=-1)


def test_indexing_and_rotary_ops_keep_the_dims_they_do_not_touch():
    nodes, found = _candidates(Gather(), torch.randn(2, 4, 4, 8), torch.randn(4, 1, 4))
    (index,) = nodes[aten.index.Tensor]
    assert "S(3) <- (S(3), R)" in found[index]
    assert "S(2) <- (R, S(0))" in found[index]  # each rank gathers its part of the indices
    assert not any("(S(2)" in s for s in found[index])  # the indexed dim of x stays whole
    (stack,) = nodes[aten.stack.default]
    assert "S(2) <- (S(2), S(2))" in found[stack] and "P <- (P, P)" in found[stack]
    (interleaved,) = nodes[aten.repeat_interleave.self_int]
    assert "S(2) <- (S(2))" in found[interleaved]  # repeating commutes with chunking


class Alibi(nn.Module):
    """Bloom's scores: baddbmm(alibi, q, k^T), alibi broadcast over the query dim."""

    def forward(self, alibi, q, k):
        return torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.25)


def test_baddbmm_shards_batch_rows_and_columns_never_the_contraction():
    nodes, found = _candidates(
        Alibi(), torch.randn(8, 1, 4), torch.randn(8, 4, 6), torch.randn(8, 4, 6)
    )
    (scores,) = nodes[aten.baddbmm.default]
    assert {"S(0) <- (S(0), S(0), S(0))", "S(1) <- (R, S(1), R)", "S(2) <- (S(2), R, S(2))"} <= (
        found[scores]
    )
    assert not any(s.startswith("P") for s in found[scores])  # alibi is added once, not tp times


def test_factories_are_replicated_rules_not_unknown_ops():
    class Mask(nn.Module):
        def forward(self, x):
            return x + torch.zeros(x.shape[-1]) + torch.full((x.shape[-1],), 2.0)

    traced = capture(Mask(), (torch.randn(2, 4),))
    strategies = graph_strategies(traced, 2)
    assert strategies.unsupported == []
    factories = [n for n in traced.graph_module.graph.nodes if not n.all_input_nodes
                 and n.op == "call_function"]  # fmt: skip
    assert factories and all(len(strategies.candidates[n.name]) == 1 for n in factories)


_LATE_MOE = """
import autopar  # first: transformers' grouped expert matmul does not exist yet
from tests.families import plan_family
from tests.family_layouts import weight_layout

traced, tp, _ = plan_family("mixtral")
grouped = [n.name for n in traced.graph_module.graph.nodes if "grouped_mm" in str(n.target)]
assert grouped and all(traced.analysis.nodes[n].flops > 0 for n in grouped), grouped
layout = weight_layout(tp, traced)
assert "model.layers.*.mlp.experts.gate_up_proj" in layout.column, layout
assert "model.layers.*.mlp.experts.down_proj" in layout.row, layout
print("experts split")
"""


def test_expert_matmuls_split_whatever_the_import_order():
    """transformers registers its grouped matmul op when its MoE code is imported, which
    may be after autopar: rules and FLOPs are found by the op's name all the same."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _LATE_MOE], cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "experts split" in done.stdout, done.stderr[-3000:]
