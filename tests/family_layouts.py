"""What a plan's tensor-parallel placements do to each block weight, in Megatron's words.

`weight_layout(plan, traced)` follows every parameter through transposes and views to
the matmul that reads it: column-parallel (the weight sharded, the output split on its
feature dim), row-parallel (the weight sharded, the output Partial: Megatron's g
all-reduces it) or replicated (the matmul sees the whole weight). Below it, what
Megatron-LM would do per family (`ROW_PARALLEL`, `ROUTERS`, `FUSED`) and where a plan
does otherwise today, with the reason (`NOT_MEGATRON`); tests/test_families.py checks
both, benchmarks/model_families.py prints them in docs/models.md.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

WEIGHT_OPS = {
    "aten.linear.default", "aten.mm.default", "aten.matmul.default", "aten.bmm.default",
    "aten.baddbmm.default", "aten._grouped_mm.default", "aten.conv2d.default",
    "transformers.grouped_mm_fallback.default",
}  # fmt: skip
PASS_THROUGH = {
    "aten.t.default", "aten.numpy_T.default", "aten.mT.default", "aten.transpose.int",
    "aten.permute.default", "aten.view.default", "aten.reshape.default", "aten.alias.default",
    "aten.to.dtype", "aten._to_copy.default",
}  # fmt: skip


@dataclass
class Layout:
    """What tensor parallelism does to one family's block weights, and what it costs.

    Weight names have their block index replaced by `*` (`model.layers.*.mlp.up_proj.weight`);
    `forward[b]` counts the forward tp collectives of block b, `rows[b]` its row-parallel
    matmuls (Megatron runs one all-reduce after each)."""

    column: list[str] = field(default_factory=list)
    row: list[str] = field(default_factory=list)
    replicated: list[str] = field(default_factory=list)  # the matmul sees the whole weight
    fused: dict[str, int] = field(default_factory=dict)  # column-parallel in k parts
    forward: dict[int, Counter] = field(default_factory=dict)
    rows: Counter = field(default_factory=Counter)
    unsupported: list[str] = field(default_factory=list)  # ops without a rule

    def megatron_deviations(self, rows: set[str], routers: set[str] = frozenset()) -> list[str]:
        """How this layout differs from Megatron-LM's, given its row-parallel weights (and
        the routers of mixture-of-experts layers, which Megatron keeps replicated)."""
        found = [f"{name} is replicated" for name in self.replicated if name not in routers]
        found += [f"{name} is row-parallel" for name in sorted(set(self.row) - rows)]
        found += [f"{name} is not row-parallel" for name in sorted(rows - set(self.row))]
        blocks: dict[str, list[int]] = {}
        for block, kinds in self.forward.items():
            extra = {k: n for k, n in kinds.items() if k != "all_reduce"}
            if extra or kinds["all_reduce"] > self.rows[block]:
                text = f"run {dict(sorted(kinds.items()))} forward for {self.rows[block]} rows"
                blocks.setdefault(text, []).append(block)
        found += [f"blocks {numbers} {text}" for text, numbers in blocks.items()]
        return found


def _weight_user(param: fx.Node) -> fx.Node | None:
    """The matmul that reads `param` as its weight, through transposes and views."""
    node = param
    while len(node.users) == 1:
        (node,) = node.users
        if str(node.target) in WEIGHT_OPS:
            return node
        if str(node.target) not in PASS_THROUGH:
            return None
    return None


def _role(matmul: fx.Node, param: fx.Node, plan) -> str:
    """Column-parallel: the weight sharded, the output split on its last (feature) dim;
    row-parallel: the weight sharded, the output Partial; else the matmul sees it whole."""
    entry = plan.strategies[matmul.name].placements.get("tp")
    if entry is None:
        return "replicated"
    weight = next(
        p for u, p in zip(matmul.all_input_nodes, entry.inputs, strict=True) if _reads(u, param)
    )
    if not str(weight).startswith("S"):
        return "replicated"
    if str(entry.output).startswith(f"S({matmul.meta['val'].dim() - 1}"):
        return "column"
    return "row" if str(entry.output) == "P" else "replicated"


def _reads(node: fx.Node, param: fx.Node) -> bool:
    """`node` is `param` or made from it alone through transposes and views."""
    while node is not param and str(node.target) in PASS_THROUGH:
        node = node.all_input_nodes[0]
    return node is param


def _any_block(fqn: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", fqn, count=1)


def weight_layout(plan, traced) -> Layout:
    """Column-parallel, row-parallel or replicated, per matmul weight of every block."""
    layout = Layout(unsupported=sorted({plan.strategies[n].op for n in plan.unsupported_ops}))
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    roles: dict[str, set[str]] = {}
    for name, fqn in traced.param_fqns.items():
        user = _weight_user(nodes[name])
        block = plan.layer_of.get(user.name) if user is not None else None
        if block is not None:
            role = _role(user, nodes[name], plan)
            roles.setdefault(_any_block(fqn), set()).add(role)
            layout.rows[block] += role == "row"
    for name, found in sorted(roles.items()):
        role = found.pop() if len(found) == 1 else "replicated"  # blocks disagree: say so
        getattr(layout, role).append(name)
    layout.fused = {
        _any_block(fqn): int(str(plan.strategies[p].output("tp")).split(",g")[1].rstrip(")"))
        for p, fqn in traced.param_fqns.items()
        if ",g" in str(plan.strategies[p].output("tp"))
    }
    blocks = sorted(set(plan.layer_of.values()))
    layout.forward = {b: Counter() for b in blocks}
    for c in plan.collectives:
        if c.layer in layout.forward and c.phase == "forward" and c.axis == "tp":
            layout.forward[c.layer][c.kind] += 1
    return layout


# --- Megatron-LM's layout, per family -------------------------------------------------

_LLAMA = {"model.layers.*.self_attn.o_proj.weight", "model.layers.*.mlp.down_proj.weight"}
ROW_PARALLEL = {
    "gpt2": {"transformer.h.*.attn.c_proj.weight", "transformer.h.*.mlp.c_proj.weight"},
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"), _LLAMA),
    "olmo2": _LLAMA,
    "opt": {"model.decoder.layers.*.self_attn.out_proj.weight", "model.decoder.layers.*.fc2.weight"},
    "gpt_neox": {
        "gpt_neox.layers.*.attention.dense.weight", "gpt_neox.layers.*.mlp.dense_4h_to_h.weight",
    },
    "falcon": {
        "transformer.h.*.self_attention.dense.weight", "transformer.h.*.mlp.dense_4h_to_h.weight",
    },
    "bloom": {
        "transformer.h.*.self_attention.dense.weight", "transformer.h.*.mlp.dense_4h_to_h.weight",
    },
    "gptj": {"transformer.h.*.attn.out_proj.weight", "transformer.h.*.mlp.fc_out.weight"},
    **dict.fromkeys(("bert", "roberta"), {
        "encoder.layer.*.attention.output.dense.weight", "encoder.layer.*.output.dense.weight",
    }),
    "distilbert": {
        "transformer.layer.*.attention.out_lin.weight", "transformer.layer.*.ffn.lin2.weight",
    },
    "t5": {
        "encoder.block.*.layer.0.SelfAttention.o.weight",
        "encoder.block.*.layer.1.DenseReluDense.wo.weight",
        "decoder.block.*.layer.0.SelfAttention.o.weight",
        "decoder.block.*.layer.1.EncDecAttention.o.weight",
        "decoder.block.*.layer.2.DenseReluDense.wo.weight",
    },
    **dict.fromkeys(("mixtral", "qwen3_moe"), {
        "model.layers.*.self_attn.o_proj.weight", "model.layers.*.mlp.experts.down_proj",
    }),
    "starcoder2": {"model.layers.*.self_attn.o_proj.weight", "model.layers.*.mlp.c_proj.weight"},
    "vit": {"layers.*.attention.o_proj.weight", "layers.*.mlp.fc2.weight"},
}  # fmt: skip
ROUTERS = {
    "mixtral": {"model.layers.*.mlp.gate.weight"},
    "qwen3_moe": {"model.layers.*.mlp.gate.weight"},
}
FUSED = {
    "gpt2": {"transformer.h.*.attn.c_attn.weight": 3, "transformer.h.*.attn.c_attn.bias": 3},
    "phi3": {"model.layers.*.self_attn.qkv_proj.weight": 3, "model.layers.*.mlp.gate_up_proj.weight": 2},
    "mixtral": {"model.layers.*.mlp.experts.gate_up_proj": 2},
    "qwen3_moe": {"model.layers.*.mlp.experts.gate_up_proj": 2},
}  # fmt: skip


@dataclass(frozen=True)
class Deviation:
    """Where a family's plan is not Megatron's layout today, and why."""

    reason: str
    found: list[str]  # `Layout.megatron_deviations`, exactly


NOT_MEGATRON = {
    "olmo2": Deviation(
        "OLMo 2 normalizes q and k over all heads. A mean over a sharded dim is Partial "
        "(each rank's sum over the global count), so a norm may all-reduce its per-token "
        "statistic forward and that statistic's gradient backward: two all-reduces, 4 "
        "latency steps at tp=2, where gathering q (or k) forward and its gradient backward "
        "takes 2. At hidden 64 the bandwidth saved is worth less than those 2 steps, so "
        "the plan gathers; a norm over a wide enough output all-reduces the statistic "
        "(tests/test_family_rules.py)",
        ["blocks [0, 1] run {'all_gather': 2, 'all_reduce': 2} forward for 2 rows"],
    ),
}
