"""ParallelModule against the single-device model on real gloo processes (fp32, dropout 0).

Placement maps come from `megatron_placements`: a small forward propagation from
seed placements of the weights (column / row parallel), with the semantic rules
the solver also follows. It stands in for the solver in these tests; it is
deliberately simple (whatever it cannot shard it replicates, gathering inputs).
"""

from __future__ import annotations

import functools
import operator
import re

import conftest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from distributed import check_parity

from autopar.codegen import NodePlacement
from autopar.placement import Partial, Placement, Replicate, Shard

aten = torch.ops.aten
R, P = Replicate(), Partial()

# --- placement propagation -------------------------------------------------------------------

_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.flatten.using_ints,
}
_POINTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
    aten.tanh.default,
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.neg.default,
    aten.rsqrt.default,
    aten.dropout.default,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.to.dtype_layout,
    aten.to.dtype,
    aten.expand.default,
}
_LINEAR_IN_PARTIAL = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _replicated(node, have):
    return R, [R] * len(have)


def _view_target_dim(in_shape, out_shape, shard: Shard, num_shards: int) -> Shard | None:
    """Where a view moves a sharded dim: aligned by the product of the dims before it."""
    prefix = 1
    for size in in_shape[: shard.dim]:
        prefix *= size
    out_prefix = 1
    for out_dim, size in enumerate(out_shape):
        if out_prefix == prefix and size > 1:
            if size == in_shape[shard.dim] or size > in_shape[shard.dim]:
                return Shard(out_dim, shard.groups)
            return Shard(out_dim) if shard.groups == 1 and size % num_shards == 0 else None
        out_prefix *= size
    return None


def _view(node, have, num_shards):
    (x,) = have
    if x in (R, P):
        return x, [x]
    target = _view_target_dim(_shape(node.args[0]), _shape(node), x, num_shards)
    return (target, [x]) if target is not None else _replicated(node, have)


def _transpose(node, have, num_shards):
    (x,) = have
    if not isinstance(x, Shard):
        return x, [x]
    if node.target == aten.permute.default:
        return Shard(list(node.args[1]).index(x.dim), x.groups), [x]
    ndim = len(_shape(node))
    a, b = (0, 1) if node.target == aten.t.default else (d % ndim for d in node.args[1:3])
    swapped = {a: b, b: a}.get(x.dim, x.dim)
    return Shard(swapped, x.groups), [x]


def _reduce_partial(node, placement, sequence_parallel: bool, num_shards: int):
    """A partial input a non-linear op needs whole: all-reduce, or reduce-scatter tokens."""
    shape = _shape(node)
    if sequence_parallel and len(shape) >= 2 and shape[-2] % num_shards == 0:
        return Shard(len(shape) - 2)
    return R


def _pointwise(node, have, num_shards, sequence_parallel=False):
    inputs = node.all_input_nodes
    if all(p == P for p in have) and node.target in _LINEAR_IN_PARTIAL:
        if len(have) == 2 or node.target != aten.add.Tensor:
            return P, list(have)
    have = [
        _reduce_partial(u, p, sequence_parallel, num_shards) if p == P else p
        for u, p in zip(inputs, have, strict=True)
    ]
    out_shape = _shape(node)
    sharded = [(u, p) for u, p in zip(inputs, have, strict=True) if isinstance(p, Shard)]
    if not sharded:
        return R, have
    first, shard = sharded[0]
    out_dim = shard.dim + len(out_shape) - len(_shape(first))
    seen = []
    for u in inputs:
        dim = out_dim - (len(out_shape) - len(_shape(u)))
        same = dim >= 0 and _shape(u)[dim] == out_shape[out_dim]
        seen.append(Shard(dim, shard.groups) if same else R)
    return Shard(out_dim, shard.groups), seen


def _mm(node, have, num_shards):
    """x (..., K) @ w (K, N): mm, or the batched matmul capture makes of Conv1D's."""
    x, w = have
    last = len(_shape(node)) - 1
    if isinstance(w, Shard) and w.dim == 1:
        return Shard(last, w.groups), [R, w]
    if isinstance(w, Shard) and w.dim == 0:
        return P, [Shard(last, w.groups), w]
    return _replicated(node, have)


def _linear(node, have, num_shards):
    x, w = have
    last = len(_shape(node)) - 1
    if isinstance(w, Shard) and w.dim == 0:
        return Shard(last, w.groups), [R, w]
    if isinstance(w, Shard) and w.dim == 1:
        return P, [Shard(last, w.groups), w]
    return _replicated(node, have)


def _embedding(node, have, num_shards):
    w, ids = have
    if w == Shard(1):
        return Shard(len(_shape(node)) - 1), [w, R]
    return _replicated(node, have)


def _attention(node, have, num_shards):
    q, k, v, *mask = have
    if not q == k == v == Shard(1):
        return _replicated(node, have)
    mask_seen = [Shard(1) if _shape(m)[1] > 1 else R for m in node.all_input_nodes[3:]]
    return Shard(1), [q, k, v, *mask_seen]


def _split(node, have, num_shards):
    (x,) = have
    count, dim = len(node.meta["val"]), node.args[2] if len(node.args) > 2 else 0
    dim %= len(_shape(node.args[0]))
    if isinstance(x, Shard) and x.dim != dim:
        return (x,) * count, [x]
    if isinstance(x, Shard) and x.groups % count == 0:
        return (Shard(dim, x.groups // count),) * count, [x]
    return (R,) * count, [R]


def _slice(node, have, num_shards):
    (x,) = have
    dim = node.args[1] % len(_shape(node)) if len(node.args) > 1 else 0
    if isinstance(x, Shard) and x.dim != dim:
        return x, [x]
    return _replicated(node, have)


def _cat(node, have, num_shards):
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    first = have[0] if have else R
    if isinstance(first, Shard) and first.dim != dim and all(p == first for p in have):
        return first, list(have)
    return _replicated(node, have)


def _layer_norm(node, have, num_shards):
    x, *params = have
    normalized = len(node.args[1])
    if isinstance(x, Shard) and x.dim < len(_shape(node)) - normalized:
        return x, [x, *[R] * len(params)]
    return _replicated(node, have)


_RULES = {
    aten.mm.default: _mm,
    aten.matmul.default: _mm,
    aten.linear.default: _linear,
    aten.embedding.default: _embedding,
    aten.scaled_dot_product_attention.default: _attention,
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    aten.layer_norm.default: _layer_norm,
    aten.transpose.int: _transpose,
    aten.permute.default: _transpose,
    aten.t.default: _transpose,
    **{op: _view for op in _VIEWS},
}


def _rule(node, have, num_shards, sequence_parallel):
    if node.target is operator.getitem:
        whole = have[0]
        element = whole[node.args[1]] if isinstance(whole, tuple) else whole
        return element, [element]
    if node.target in _POINTWISE:
        return _pointwise(node, have, num_shards, sequence_parallel)
    if node.target in _RULES:
        return _RULES[node.target](node, have, num_shards)
    return _replicated(node, have)


def _seed(traced, node, seeds: dict[str, Placement]) -> Placement:
    fqn = traced.param_fqns.get(node.name, "")
    placement = next((p for suffix, p in seeds.items() if fqn.endswith(suffix)), R)
    if isinstance(placement, Shard) and placement.dim < 0:
        placement = Shard(placement.dim % len(_shape(node)), placement.groups)
    return placement


def megatron_placements(traced, tp_size, seeds, sequence_parallel=False):
    """Placement map by forward propagation from weight `seeds` ({FQN suffix: placement})."""
    placements, have = {}, {}
    for node in traced.graph_module.graph.nodes:
        if node.op == "placeholder":
            have[node] = _seed(traced, node, seeds)
            placements[node.name] = NodePlacement(have[node])
        elif node.op == "call_function":
            inputs = [have[u] for u in node.all_input_nodes]
            output, seen = _rule(node, inputs, tp_size, sequence_parallel)
            placements[node.name] = NodePlacement(output, tuple(seen))
            have[node] = output
    return placements


def replicated_placements(traced, tp_size):
    return {}


# --- models ----------------------------------------------------------------------------------

GPT2_SEEDS = {
    "attn.c_attn.weight": Shard(1, 3),  # fused QKV, column parallel
    "attn.c_attn.bias": Shard(0, 3),
    "attn.c_proj.weight": Shard(0),  # row parallel
    "mlp.c_fc.weight": Shard(1),
    "mlp.c_fc.bias": Shard(0),
    "mlp.c_proj.weight": Shard(0),
    "lm_head.weight": Shard(0),  # vocab parallel head, tied to the token embedding
}

LLAMA_SEEDS = {
    **{f"self_attn.{name}_proj.weight": Shard(0) for name in "qkv"},
    "self_attn.o_proj.weight": Shard(1),
    "mlp.gate_proj.weight": Shard(0),
    "mlp.up_proj.weight": Shard(0),
    "mlp.down_proj.weight": Shard(1),
    "embed_tokens.weight": Shard(1),
    "lm_head.weight": Shard(0),
}

# conftest's tiny Hugging Face models (fp32, dropout 0, seeded), one block each.
tiny_gpt2 = functools.partial(conftest.tiny_gpt2, n_layer=1)
tiny_llama = functools.partial(conftest.tiny_llama, n_layer=1)  # 4 query, 2 key/value heads
tiny_bert = functools.partial(conftest.tiny_bert, n_layer=1)
tiny_nanogpt = functools.partial(conftest.tiny_nanogpt, n_layer=1)


class TinyTransformer(nn.Module):
    """Embedding, fused-QKV causal attention and a GELU MLP, in nn.Linear terms."""

    def __init__(self, vocab=32, dim=16, heads=4, hidden=32):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, C)
        batch, time, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, time, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, time, dim))
        x = x + self.out(F.gelu(self.fc(self.norm(x))))
        return self.head(x)


TINY_SEEDS = {
    "emb.weight": Shard(1),
    "qkv.weight": Shard(0, 3),
    "qkv.bias": Shard(0, 3),
    "proj.weight": Shard(1),
    "fc.weight": Shard(0),
    "fc.bias": Shard(0),
    "out.weight": Shard(1),
    "head.weight": Shard(0),
}


def tiny_transformer():
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    return TinyTransformer().eval(), (ids,)


class ReshardMlp(nn.Module):
    """Column-parallel linear whose output is then used sharded on another dim."""

    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = F.relu(self.up(x))  # (B, T, H), computed sharded on T after an all-to-all
        return self.down(h * 2.0)


def reshard_mlp():
    torch.manual_seed(0)
    return ReshardMlp().eval(), (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)),)


def reshard_placements(traced, tp_size):
    """up: column parallel S(2); relu runs on S(1) (all-to-all); down gets P via S(2)... ."""
    placements = megatron_placements(traced, tp_size, {"up.weight": Shard(0), "up.bias": Shard(0)})
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    relu = next(n for n in nodes.values() if n.target == aten.relu.default)
    placements[relu.name] = NodePlacement(Shard(1), (Shard(1),))
    mul = next(iter(relu.users))
    placements[mul.name] = NodePlacement(Shard(1), (Shard(1),))
    linear = next(iter(mul.users))
    # The down projection sees its input whole; its partial-free output stays replicated.
    placements[linear.name] = NodePlacement(R, (R, R))
    return placements


# --- tests -----------------------------------------------------------------------------------

gpt2_megatron = functools.partial(megatron_placements, seeds=GPT2_SEEDS)
gpt2_megatron_sp = functools.partial(megatron_placements, seeds=GPT2_SEEDS, sequence_parallel=True)
llama_megatron = functools.partial(megatron_placements, seeds=LLAMA_SEEDS)
tiny_megatron = functools.partial(megatron_placements, seeds=TINY_SEEDS)
tiny_megatron_sp = functools.partial(megatron_placements, seeds=TINY_SEEDS, sequence_parallel=True)


def _collectives_in(code: str) -> set[str]:
    """The reshard steps the annotated code runs, forward and backward, by kind."""
    names = ("all_gather", "all_reduce", "reduce_scatter", "chunk", "all_to_all")
    return {name for name in names if re.search(rf"\b{name}\b", code)}


@pytest.mark.multiprocess
def test_parity_on_two_ranks():
    cases = [
        (tiny_gpt2, replicated_placements),
        (tiny_gpt2, gpt2_megatron),
        (tiny_gpt2, gpt2_megatron_sp),
        (tiny_transformer, tiny_megatron),
        (reshard_mlp, reshard_placements),
        (tiny_llama, llama_megatron),
    ]
    results = check_parity(cases, 2)
    replicated, megatron, megatron_sp, tiny, reshard, llama = results[0]
    assert replicated["errors"]["output"] == 0.0
    assert _collectives_in(replicated["code"]) == set()
    assert {"all_reduce", "all_gather"} <= _collectives_in(megatron["code"])
    assert "reduce_scatter" in _collectives_in(megatron_sp["code"])
    assert {"all_gather", "chunk"} <= _collectives_in(tiny["code"])
    assert "all_to_all" in _collectives_in(reshard["code"])
    assert "scaled_dot_product_attention" in llama["code"]


@pytest.mark.multiprocess
def test_parity_on_four_ranks():
    # At tp=4 Llama's 2 key/value heads do not split: those parts fall back to replicated.
    cases = [
        (tiny_gpt2, gpt2_megatron),
        (tiny_transformer, tiny_megatron_sp),
        (tiny_llama, llama_megatron),
    ]
    results = check_parity(cases, 4)
    assert len(results) == 4


# --- the solver's own plans --------------------------------------------------------------------


def _comm_free_mesh(tp: int):
    """A mesh where communication is free and compute slow: the solver shards everything."""
    from autopar.mesh import DeviceSpec, Mesh

    device = DeviceSpec("slow", peak_flops=1e6, memory_bandwidth=1e9, memory_bytes=2**40)
    return Mesh(
        nodes=1, devices_per_node=tp, device=device, intra_node_bw=1e18, inter_node_bw=1e18,
        intra_node_latency=0.0, inter_node_latency=0.0,
    )  # fmt: skip


def solver_placements(traced, tp_size):
    """The intra-op solver's strategies (solved on rank 0, broadcast so all ranks agree)."""
    import torch.distributed as dist

    from autopar.solver.intra_op import solve_intra_op
    from autopar.strategies import graph_strategies

    chosen = [None]
    if dist.get_rank() == 0:
        strategies = graph_strategies(traced, tp_size)
        chosen[0] = solve_intra_op(traced, strategies, _comm_free_mesh(tp_size), tp_size).strategies
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


@pytest.mark.multiprocess
def test_parity_with_solver_plans():
    """The correctness contract on the solver's own plans (a comm-free mesh makes it shard)."""
    models = [tiny_gpt2, tiny_llama, tiny_bert, tiny_nanogpt]
    results = check_parity([(model, solver_placements) for model in models], 2)
    for case in results[0]:
        assert _collectives_in(case["code"]), "the solver was expected to shard"
