"""Rules added for the Hugging Face families, on small modules: the candidates they offer.

Whether the generated code then computes the right numbers is tests/test_families.py's
job (22 families on real gloo ranks); here each rule is checked to offer the shard
Megatron's layout needs, and not one that would be wrong.
"""

from __future__ import annotations

import pytest
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


class AlibiAttention(nn.Module):
    """Bloom's attention core: scores of (batch x heads, seq, seq) from baddbmm with an
    ALiBi bias built from the mask and per-head slopes, softmax per (batch, head)."""

    def __init__(self, hidden: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dense = nn.Linear(hidden, hidden)
        self.register_buffer("slopes", torch.linspace(0.5, 0.1, heads))

    def forward(self, x, mask):
        b, s, _ = x.shape
        bh = b * self.heads
        positions = mask.float().cumsum(-1)[:, None, :]  # (b, 1, s)
        alibi = (self.slopes[:, None] * positions).reshape(bh, 1, s)  # (b*h, 1, s)
        q, k, v = (
            p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )  # (b, h, s, d) each; fmt: skip
        q, k, v = (t.reshape(bh, s, self.head_dim) for t in (q, k, v))  # (b*h, s, d)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), alpha=0.25)  # (b*h, s, s)
        probs = scores.view(b, self.heads, s, s).softmax(-1).view(bh, s, s)
        out = torch.bmm(probs, v).view(b, self.heads, s, self.head_dim)  # (b, h, s, d)
        return self.dense(out.permute(0, 2, 1, 3).reshape(b, s, -1))


def _alibi_plan(batch: int):
    from families import family_mesh

    import autopar

    torch.manual_seed(0)
    model = AlibiAttention()
    inputs = (torch.randn(batch, 16, 64), torch.ones(batch, 16, dtype=torch.long))
    tokens = lambda name, shape, dtype: ("batch", "sequence", None)[: len(shape)]  # noqa: E731
    traced = capture(model, inputs)
    plan = autopar.plan(traced, inputs, family_mesh(), dp=1, tp=2, pp=1,
                        sequence_parallel=False, input_roles=tokens)  # fmt: skip
    return traced, plan


def _tp_of(plan, target) -> set[str]:
    return {str(e.placements["tp"].output) for e in plan.strategies.values() if e.op == target}


def test_a_batch_x_heads_dim_splits_each_rows_heads_as_megatron_would():
    _, plan = _alibi_plan(batch=2)
    # each batch row's heads split: Shard(0, groups=batch) through baddbmm and bmm
    assert _tp_of(plan, "aten.baddbmm.default") == _tp_of(plan, "aten.bmm.default") == {"S(0,g2)"}
    assert _tp_of(plan, "aten.softmax.int") == {"S(1)"}  # (b, h, s, s) split on heads
    (baddbmm,) = [e for e in plan.strategies.values() if e.op == "aten.baddbmm.default"]
    assert [str(p) for p in baddbmm.placements["tp"].inputs] == ["S(0,g2)"] * 3  # alibi too
    # only Megatron's: q, k, v column-parallel, dense row-parallel and its one all-reduce
    forward = [c.kind for c in plan.collectives if c.phase == "forward"]
    assert forward == ["all_reduce"]
    placed = {name: str(plan.strategies[f"{name}_matmul"].output()) for name in "qkv"}
    assert placed == {"q": "S(2)", "k": "S(2)", "v": "S(2)"}
    assert plan.strategies["dense_matmul"].output() == "P"


def test_a_batch_x_sequence_dim_stays_whole_without_sequence_parallelism():
    class Flattened(nn.Module):  # OPT's MLP input: (b, s, h) -> (b*s, h)
        def forward(self, x):
            return x.reshape(-1, x.shape[-1]) * 2.0

    traced = capture(Flattened(), (torch.randn(2, 8, 16),))
    tokens = lambda name, shape, dtype: ("batch", "sequence", None)  # noqa: E731
    strategies = graph_strategies(traced, 2, sequence_parallel=False, input_roles=tokens)
    (reshape,) = [n.name for n in traced.graph_module.graph.nodes
                  if n.target is aten.reshape.default]  # fmt: skip
    assert strategies.roles[reshape] == ("batch", None)
    outputs = {str(s.output) for s in strategies.candidates[reshape]}
    assert not any(o.startswith("S(0") for o in outputs) and "S(1)" in outputs


def test_a_batch_x_heads_shard_follows_the_batch_size_to_the_microbatch():
    from autopar.codegen import shard_graph
    from autopar.runtime.retrace import plan_for

    _, plan = _alibi_plan(batch=4)
    assert _tp_of(plan, "aten.baddbmm.default") == {"S(0,g4)"}
    run, _ = _alibi_plan(batch=2)
    moved = plan_for(plan, run.graph_module.graph)
    assert _tp_of(moved, "aten.baddbmm.default") == {"S(0,g2)"}  # one block per row
    shard_graph(run, moved.node_placements(), 2)


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


# --- norms over sharded dims, and norm weights read through a cast or 1 + w -------------------


class WideNorm(nn.Module):
    """OLMo 2's q norm: an RMS norm over the whole output of a column-parallel matmul, wide
    enough that gathering the output costs more than all-reducing its statistic."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 4096, bias=False), nn.Linear(4096, 64, bias=False)
        self.weight = nn.Parameter(torch.rand(4096) + 0.5)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight)


class OnePlusWeight(nn.Module):
    """Gemma's per-head norm weight, x * (1 + w), on heads a column-parallel matmul splits."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)
        self.weight = nn.Parameter(torch.randn(8))

    def forward(self, x):
        heads = self.up(x).unflatten(-1, (64, 8)) * (1.0 + self.weight.float())
        return self.down(heads.flatten(-2))


def wide_norm():
    torch.manual_seed(0)
    return WideNorm(), (torch.randn(2, 64, 64),)


def one_plus_weight():
    torch.manual_seed(0)
    return OnePlusWeight(), (torch.randn(2, 64, 256),)


def _tp_plan(factory):
    from families import family_mesh

    import autopar

    model, inputs = factory()
    tokens = lambda name, shape, dtype: ("batch", "sequence", None)  # noqa: E731 (x is h)
    return autopar.plan(model, inputs, family_mesh(), dp=1, tp=2, pp=1,
                        sequence_parallel=False, input_roles=tokens)  # fmt: skip


def _planned(factory):
    def placements(traced, tp_size):
        plan = _tp_plan(factory)
        return {name: entry.placements["tp"] for name, entry in plan.strategies.items()
                if "tp" in entry.placements}  # fmt: skip

    return placements


def planned_wide_norm(traced, tp_size):
    return _planned(wide_norm)(traced, tp_size)


def planned_one_plus_weight(traced, tp_size):
    return _planned(one_plus_weight)(traced, tp_size)


def test_a_mean_over_a_sharded_dim_all_reduces_its_statistic_not_the_values():
    model, (x,) = wide_norm()
    nodes, found = _candidates(model, x)
    (mean,) = nodes[aten.mean.dim]
    assert "P <- (S(2))" in found[mean]  # each rank's sum over its shard: a summand
    plan = _tp_plan(wide_norm)
    assert str(plan.strategies[mean].placements["tp"].output) == "P"
    forward = sorted((c.nbytes, c.kind) for c in plan.collectives if c.phase == "forward")
    (statistic, kind), (output, output_kind) = forward  # (batch, seq, 1); the row output
    assert kind == output_kind == "all_reduce" and output == 64 * statistic


def test_a_norm_weight_read_through_one_plus_w_sums_its_gradient_once_per_step():
    from autopar.codegen import shard_graph

    traced = capture(*one_plus_weight())
    plan = _tp_plan(one_plus_weight)
    (weight,) = [n for n, fqn in traced.param_fqns.items() if fqn == "weight"]
    assert str(plan.strategies[weight].output("tp")) == "R"  # one weight for every head
    # Megatron's g after the row-parallel matmul; the weight's gradient sum, once per step
    found = [(c.kind, c.phase, c.consumer) for c in plan.collectives]
    assert found == [("all_reduce", "forward", "output"), ("all_reduce", "backward", "optimizer")]
    placements = planned_one_plus_weight(traced, 2)
    assert shard_graph(traced, placements, 2).meta["partial_grads"] == [weight]


@pytest.mark.multiprocess
def test_sharded_means_and_deferred_norm_weights_train_like_one_device():
    from distributed import check_parity

    results = check_parity([(wide_norm, planned_wide_norm),
                            (one_plus_weight, planned_one_plus_weight)], 2)  # fmt: skip
    wide, _ = results[0]
    assert "aten.sum.dim_IntList" in wide["code"] and "aten.div.Tensor" in wide["code"]
