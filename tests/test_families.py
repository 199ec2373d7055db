"""The family matrix: 22 Hugging Face families sharded as Megatron-LM would, and trained.

Every family of tests/families.py (tiny configs from transformers config classes) is
captured, planned at tp=2 on a mesh where sharding pays (`families.family_mesh`) and
at pp=2, and both plans train one step and run one forward on 2 real gloo ranks, all
cases in one launch, against the single-device model (loss, every gradient and the
outputs within 1e-5 relative, fp32). docs/models.md (benchmarks/model_families.py)
reports the same matrix.

Megatron's layout, checked per family: every block matmul weight sharded, the
attention output and MLP down projections row-parallel (the rest column-parallel,
fused projections in their parts), and in the forward pass one all-reduce per
row-parallel matmul at most, nothing else. `NOT_MEGATRON` lists, with the reason,
what three families do instead; a change in any layout fails here.
"""

from __future__ import annotations

import pytest
from families import FAMILIES, PP_BATCH, RTOL, TP_BATCH, parity_worker, plan_family, weight_layout

from autopar.launch import run_local
from autopar.runtime.pipeline import split_plan_stages

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
NOT_MEGATRON = {
    # (batch * heads, seq, seq) attention scores: a dim merged from batch and heads has the
    # batch role, which tp may not split; the attention runs whole between two all-gathers
    "bloom": [
        "transformer.h.*.self_attention.dense.weight is not row-parallel",
        "blocks [0, 1] run {'all_gather': 2, 'all_reduce': 1} forward for 1 rows",
    ],
    # per-head q/k norms computing x * (1 + w): an all-gather now and a reduce-scatter in
    # backward cost what the all-reduce of the weight's partial gradient does, a tie
    "gemma3": ["blocks [0, 1] run {'all_gather': 2, 'all_reduce': 2} forward for 2 rows"],
    # q/k RMS norms over all heads: a mean over a sharded dim has no rule (it would be a
    # Partial sum divided by the global count), so q and k are gathered for the norm
    "olmo2": ["blocks [0, 1] run {'all_gather': 2, 'all_reduce': 2} forward for 2 rows"],
}


@pytest.fixture(scope="module")
def planned() -> dict:
    """name -> (traced, tp=2 plan, pp=2 plan), made once in this process."""
    return {name: plan_family(name) for name in FAMILIES}


def test_every_family_traces_and_every_op_has_a_rule(planned):
    assert len(FAMILIES) >= 22
    for name, (traced, tp, pp) in planned.items():
        assert traced.num_layers >= 2, name
        assert (tp.tp, pp.pp) == (2, 2), name
        assert weight_layout(tp, traced).unsupported == [], name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tp2_layout_is_megatron_s(planned, name):
    traced, tp, _ = planned[name]
    layout = weight_layout(tp, traced)
    deviations = layout.megatron_deviations(ROW_PARALLEL[name], ROUTERS.get(name, set()))
    assert deviations == NOT_MEGATRON.get(name, [])
    assert layout.column and layout.row
    assert layout.fused == FUSED.get(name, {})


def test_mixture_of_experts_split_every_experts_matmuls(planned):
    for name in ("mixtral", "qwen3_moe"):
        traced, tp, _ = planned[name]
        layout = weight_layout(tp, traced)
        assert "model.layers.*.mlp.experts.gate_up_proj" in layout.column, name
        assert "model.layers.*.mlp.experts.down_proj" in layout.row, name


def test_later_stages_read_user_inputs_directly(planned):
    """T5's decoder ids and attention mask reach stage 1 from the caller, not down the pipe."""
    traced, _, pp = planned["t5"]
    stages = split_plan_stages(traced.graph_module, pp, traced)
    names = dict(
        zip(traced.user_inputs, ("input_ids", "attention_mask", "decoder_input_ids"), strict=True)
    )
    assert [names[n] for n in stages[1].inputs] == ["attention_mask", "decoder_input_ids"]
    assert not set(stages[1].received) & set(traced.user_inputs)


@pytest.mark.multiprocess
def test_every_family_trains_at_tp2_and_pp2_like_one_device(planned):
    cases = [
        (name, plan.to_dict(), batch)
        for name, (_, tp, pp) in planned.items()
        for plan, batch in ((tp, TP_BATCH), (pp, PP_BATCH))
    ]
    results = run_local(parity_worker, 2, cases, timeout_s=600)
    failures = [
        f"rank {rank}, {case[0]} {'tp' if case[2] == TP_BATCH else 'pp'}=2: "
        f"{result['worst']} off by {result['error']:.1e}"
        for rank, per_case in enumerate(results)
        for case, result in zip(cases, per_case, strict=True)
        if result["error"] > RTOL
    ]
    assert not failures, "\n".join(failures)
