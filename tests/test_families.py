"""The family matrix: 22 Hugging Face families sharded as Megatron-LM would, and trained.

Every family of tests/families.py (tiny configs from transformers config classes) is
captured, planned at tp=2 on a mesh where sharding pays (`families.family_mesh`) and
at pp=2, and both plans train one step and run one forward on 2 real gloo ranks, all
cases in one launch, against the single-device model (loss, every gradient and the
outputs within 1e-5 relative, fp32). docs/models.md (benchmarks/model_families.py)
reports the same matrix.

Megatron's layout, checked per family (tests/family_layouts.py): every block matmul
weight sharded, the attention output and MLP down projections row-parallel (the rest
column-parallel, fused projections in their parts), and in the forward pass one
all-reduce per row-parallel matmul at most, nothing else. `NOT_MEGATRON` says what
the others do instead, and why; a change in any layout fails here.
"""

from __future__ import annotations

import pytest
from families import FAMILIES, PP_BATCH, RTOL, TP_BATCH, parity_worker, plan_family
from family_layouts import (
    FUSED,
    NOT_MEGATRON,
    ROUTERS,
    ROW_PARALLEL,
    Deviation,
    weight_layout,
)

from autopar.launch import run_local
from autopar.runtime.pipeline import split_plan_stages


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
    expected = NOT_MEGATRON.get(name, Deviation("", []))
    rows, routers = ROW_PARALLEL[name], ROUTERS.get(name, set())
    assert layout.megatron_deviations(rows, routers) == expected.found
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
