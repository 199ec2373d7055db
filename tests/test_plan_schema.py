"""Plan files are checked when read: a hand edit that breaks a plan names the field and
what it must be (one PlanError), before any codegen sees it."""

from __future__ import annotations

import copy
import json

import pytest
from test_cli import one_error_line

from autopar.api import plan as make_plan
from autopar.cli import main
from autopar.errors import AutoparError, PlanError
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.plan import Plan
from autopar.plan.value import readable_json

QKV = "transformer_h0_attn_c_attn_matmul"  # [4, 64, 2304], S(2,g3) on tp


@pytest.fixture(scope="module")
def saved() -> dict:
    """A dp=2 tp=2 pp=2 plan of a two-block GPT-2 on one A100 node, as its file holds it."""
    model, inputs = build_model("gpt2", n_layer=2, batch=4, seq=64)
    plan = make_plan(model, inputs, Mesh.preset("a100-80gb"), tp=2, pp=2, microbatches=2,
                     model_name="gpt2")  # fmt: skip
    return json.loads(readable_json(plan.to_dict()))


def edited(saved: dict, edit) -> dict:
    data = copy.deepcopy(saved)
    edit(data)
    return data


def _tp(data, node=QKV):
    return data["strategies"][node]["placements"]["tp"]


EDITS = {
    "dp=3 on 8 GPUs": (
        lambda d: d.update(dp=3),
        ["dp, tp, pp are 3, 2, 2", "multiply to the world size of the plan's mesh, 8"],
    ),
    "dp a word": (lambda d: d.update(dp="eight"), ["field dp is 'eight'", "positive whole number"]),
    "dp a bool": (lambda d: d.update(dp=True), ["field dp is True"]),
    "pp zero": (lambda d: d.update(pp=0), ["field pp is 0", "positive whole number"]),
    "unknown schedule": (
        lambda d: d.update(schedule="zigzag"),
        ["field schedule is 'zigzag'", "one of gpipe, 1f1b, interleaved1f1b"],
    ),
    "shard of a dim the tensor lacks": (
        lambda d: _tp(d).update(output="S(7)"),
        [
            f"strategies['{QKV}'].placements.tp.output is 'S(7)'",
            "3-d tensor [4, 64, 2304]",
            "(-3..2)",
        ],
    ),  # fmt: skip
    "input shard of a dim its source lacks": (
        lambda d: _tp(d).update(inputs=["R", "S(2)"]),
        ["placements.tp.inputs[1]", "2-d tensor [768, 2304]"],
    ),
    "grouped shard that does not divide": (
        lambda d: _tp(d).update(output="S(2,g5)"),
        ["5 groups x tp=2", "2304 is not a multiple of 10"],
    ),
    "not a placement": (
        lambda d: _tp(d).update(output="S(x)"),
        [f"strategies['{QKV}'] is malformed", "not a placement: 'S(x)'"],
    ),
    "one input placement too few": (
        lambda d: _tp(d).update(inputs=["R"]),
        ["placements.tp.inputs", "one placement per source (2"],
    ),
    "a placement on an axis the plan does not split": (
        lambda d: d["strategies"][QKV]["placements"].update(pp={"output": "R", "inputs": []}),
        ["placements.pp is there", "only dp, tp may hold placements"],
    ),
    "a shard of a non-tensor": (
        lambda d: d["strategies"][QKV].update(shape=None),
        ["placements.dp.output is 'S(0)'", "R or P: the value is not a tensor"],
    ),
    "a shape that is no shape": (
        lambda d: d["strategies"][QKV].update(shape=[4, "wide"]),
        [f"strategies['{QKV}'].shape is list", "a list of whole numbers"],
    ),
    "a source that is no node": (
        lambda d: d["strategies"][QKV].update(sources=["ghost", "ghost"]),
        ["sources names 'ghost'", "not a node of the plan"],
    ),
    "a stage too few": (
        lambda d: d["stages"].pop(),
        ["stages holds 1 stage(s)", "pp=2 and schedule", "exactly 2"],
    ),
    "a stage on the wrong pp rank": (
        lambda d: d["stages"][1].update(pp_rank=0),
        ["stages[1].pp_rank is 0", "must be 1 (stage k on pp rank k % pp)"],
    ),
    "interleaving with too few microbatches": (
        lambda d: d.update(schedule="interleaved1f1b", num_microbatches=3, global_batch_size=0),
        ["num_microbatches is 3", "a multiple of pp=2 under interleaved1f1b"],
    ),
    "a global batch that disagrees": (
        lambda d: d.update(global_batch_size=12),
        ["global_batch_size is 12", "dp * num_microbatches * microbatch_size = 8"],
    ),
    "an unknown recomputation": (
        lambda d: d["stages"][0].update(recompute="some"),
        ["stages[0].recompute is 'some'", "one of none, selective, full"],
    ),
    "a recomputation its stages do not say": (
        lambda d: d.update(recompute="full"),
        ["field recompute is 'full'", "'none', as its stages say"],
    ),
    "ZeRO-4": (lambda d: d.update(zero=4), ["field zero is 4", "0, 1, 2 or 3"]),
    "ZeRO without replicas": (
        lambda d: d.update(dp=1, pp=4, global_batch_size=0, zero=1),
        ["field zero is 1", "0 at dp=1"],
    ),
    "a missing field": (lambda d: d.pop("stages"), ["lacks field(s) stages"]),
    "an unknown field": (
        lambda d: d.update(zeros=3),
        ["unknown field(s) zeros", "the fields are dp"],
    ),
    "a cost that is not a number": (
        lambda d: d["cost"].update(step_time_s="fast"),
        ["field cost is dict", "finite numbers"],
    ),
    "the mesh without nodes": (lambda d: d["mesh"].pop("nodes"), ["field mesh is dict"]),
    "an older schema": (
        lambda d: d.update(schema_version=2),
        ["version 2 is not supported", "plan the model again"],
    ),
}


@pytest.mark.parametrize(("edit", "expected"), list(EDITS.values()), ids=list(EDITS))
def test_a_broken_plan_names_its_field(saved, edit, expected):
    with pytest.raises(PlanError) as caught:
        Plan.from_dict(edited(saved, edit))
    assert isinstance(caught.value, AutoparError)
    for text in expected:
        assert text in str(caught.value)


def test_the_saved_plan_loads_and_pads_an_ungrouped_shard(saved):
    plan = Plan.from_dict(copy.deepcopy(saved))
    head = plan.strategies["p_lm_head_weight"]
    assert head.shape == [50257, 768] and head.output() == "S(0)"  # 50,257 rows at tp=2: padded
    assert plan.strategies[QKV].shape == [4, 64, 2304]
    assert plan.strategies["transformer_h0_attn_split"].shape == [[4, 64, 768]] * 3
    assert (plan.model, plan.seq_len, plan.global_batch_size) == ("gpt2", 64, 8)
    assert plan.dtype == "the mesh's default (2-byte)"


def test_a_plan_file_reads_as_text(saved, tmp_path):
    Plan.from_dict(copy.deepcopy(saved)).save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert '"shape": [4, 64, 2304],' in text  # a shape on one line
    assert max(map(len, text.splitlines())) <= 140
    assert json.loads(text) == saved


@pytest.mark.parametrize("command", ["show", "report", "diff"])
def test_the_cli_says_the_field_in_one_line(saved, tmp_path, capsys, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps(edited(saved, lambda d: d.update(dp=3))))
    argv = {"show": ["show", "bad.json"], "report": ["report", "bad.json", "--html", "r.html"],
            "diff": ["diff", "bad.json", "bad.json"]}[command]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "dp, tp, pp are 3, 2, 2" in one_error_line(captured.err)
    assert captured.out == "" and not (tmp_path / "r.html").exists()
