"""What a person reads of a plan: the summary's figures (MFU, FLOP/s, send/recv time,
the layout count), parameter roles, `autopar diff`, and the report's timeline rows."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autopar.api import plan as make_plan
from autopar.cli import main
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.placement import parse_placement
from autopar.plan.diff import format_diff, plan_diff
from autopar.plan.roles import Roles
from autopar.viz import graph, timeline
from autopar.viz.report import render_report

A100 = Mesh.preset("a100-80gb")


def gpt2(**pins):
    model, inputs = build_model("gpt2", n_layer=2, batch=8, seq=128)
    return make_plan(model, inputs, A100, model_name="gpt2", **pins)


@pytest.fixture(scope="module")
def piped():
    """dp=2 tp=2 pp=2: every part of the step is there, sends and receives included."""
    return gpt2(tp=2, pp=2, microbatches=4, schedule="1f1b")


@pytest.fixture(scope="module")
def tp4():
    return gpt2(tp=4, pp=1)


def test_the_step_adds_up_and_prices_the_pipeline_sends(piped, tp4):
    for plan in (piped, tp4):
        cost = plan.cost
        assert cost.compute_s + cost.comm_s + cost.bubble_s == pytest.approx(cost.step_time_s)
        assert cost.comm_s >= cost.dp_sync_s + cost.p2p_s
    assert tp4.cost.p2p_s == 0.0

    # a stage's time is its units' plus its sends and receives: the slowest one's, m times
    def sends_of(stage):
        ends = ["prologue"] * (stage.index == 0) + ["epilogue"] * (stage.index == piped.pp - 1)
        units = [*ends, *(f"block {i}" for i in stage.layers)]
        return stage.time_s - sum(piped.unit_times_s[u] for u in units)

    slowest = max(piped.stages, key=lambda s: s.time_s)
    sends = sends_of(slowest)
    assert piped.cost.p2p_s == pytest.approx(piped.num_microbatches * sends)
    # at least the hidden state forward and its gradient back, over the node's NVLink
    hidden = 8 // 2 // 4 * 128 * 768 * 2  # rows of a microbatch x seq x width x bf16
    assert sends >= 2 * A100.collective_time("send_recv", hidden, (0, 4))
    assert "pipeline send/recv " in piped.summary()


def test_mfu_and_flop_rates(piped):
    assert piped.mfu == pytest.approx(piped.cost.tflops_per_device * 1e12 / 312e12)
    assert f"(MFU {100 * piped.mfu:.1f}%)" in piped.summary()
    model, inputs = build_model("gpt2", n_layer=2, n_embd=64, n_head=4, batch=2, seq=32)
    local = make_plan(model, inputs, Mesh.local(2), tp=2)
    assert local.cost.tflops_per_device < 0.05  # a CPU: GFLOP/s, not "0.0 TFLOP/s"
    assert " GFLOP/s per device (MFU " in local.summary()
    assert "0.0 TFLOP/s" not in local.summary()


def test_one_layout_count_in_the_progress_and_the_summary():
    seen = []
    model, inputs = build_model("gpt2", n_layer=2, batch=8, seq=64)
    plan = make_plan(model, inputs, A100, progress=seen.append)
    assert plan.solver["layouts_searched"] == len(seen) > 1
    assert f"; {len(seen)} (dp, tp, pp) layouts searched" in plan.summary()


def test_the_plan_records_what_was_planned(piped):
    assert (piped.model, piped.seq_len, piped.global_batch_size) == ("gpt2", 128, 8 * piped.dp)
    assert piped.summary().splitlines()[1].startswith("model: gpt2, ")


# ----------------------------------------------------------------------------- roles


def test_lm_head_is_column_parallel_tied_or_not(piped):
    roles = Roles(piped)
    assert roles.placement("p_lm_head_weight") == "S(0)"
    assert roles.role("p_lm_head_weight") == "column-parallel"
    # the token embedding shares lm_head's tensor: the same placement, its own role
    assert roles.placement("p_transformer_wte_weight") == "S(0)"
    assert roles.role("p_transformer_wte_weight") == "vocabulary-parallel embedding"
    assert roles.tied_note("p_transformer_wte_weight") == " (tied to lm_head.weight)"
    model, inputs = build_model("llama2-7b", num_hidden_layers=1, batch=1, seq=64)
    untied = make_plan(model, inputs, A100, tp=8)
    assert untied.strategies["p_lm_head_weight"].output() == "S(0)"
    assert Roles(untied).role("p_lm_head_weight") == "column-parallel"


def test_the_report_shows_a_tied_pair_in_one_placement(piped):
    html = render_report(piped)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        row = html[html.index(f"<td>{name}</td>") :].split("</tr>")[0]
        assert '<span class="tag S">S(0)</span>' in row


# ----------------------------------------------------------------------------- diff


def test_diff_of_two_tp_degrees(piped, tp4):
    diff = plan_diff(tp4, piped)
    assert diff["differ"]["tp"] == [4, 2] and diff["differ"]["pp"] == [1, 2]
    assert diff["same"]["model"] == "gpt2" and "dp" not in diff["differ"]
    assert [row["part"] for row in diff["time"]][:2] == ["step", "compute"]
    sends = next(row for row in diff["time"] if row["part"] == "pipeline send/recv")
    assert (sends["a"], sends["b"]) == (0.0, piped.cost.p2p_s)
    text = format_diff(diff, ("tp4.json", "piped.json"))
    assert "tp " in text and "pipeline send/recv" in text and "new" in text


def test_diff_groups_blocks_that_differ_alike(tp4):
    other = dataclasses.replace(tp4, strategies=dict(tp4.strategies))
    for name in ("p_transformer_h_0_mlp_c_fc_weight", "p_transformer_h_1_mlp_c_fc_weight"):
        node = other.strategies[name]
        tp = dataclasses.replace(node.placements["tp"], output=parse_placement("R"))
        other.strategies[name] = dataclasses.replace(node, placements={**node.placements, "tp": tp})
    groups = plan_diff(tp4, other)["placements"]["tp"]
    assert groups == [{"blocks": [0, 1], "nodes": [
        {"node": "mlp.c_fc.weight", "parameter": True, "a": "S(1)", "b": "R"}]}]  # fmt: skip
    assert plan_diff(tp4, tp4)["placements"] == {"dp": [], "tp": []}


def test_cli_diff_json(piped, tp4, tmp_path, capsys):
    piped.save(tmp_path / "a.json")
    tp4.save(tmp_path / "b.json")
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["differ"]["tp"] == [2, 4]


# ----------------------------------------------------------------------------- pictures


def test_timeline_rows_are_stages_with_their_gpus(piped):
    assert timeline.rank_labels(piped) == [
        "stage 0 (pp rank 0, 4 GPUs)",
        "stage 1 (pp rank 1, 4 GPUs)",
    ]
    interleaved = gpt2(tp=2, pp=2, microbatches=4, schedule="interleaved1f1b")
    assert timeline.rank_labels(interleaved)[1] == "stages 1, 3 (pp rank 1, 4 GPUs)"


def test_identical_blocks_share_one_bar():
    same = lambda k: (1.0,)  # noqa: E731
    assert graph.bar_groups([*range(96), None], same) == [
        (list(range(96)), (1.0,)),
        ([None], (1.0,)),
    ]
    odd = graph.bar_groups(list(range(5)), lambda k: (2.0,) if k == 2 else (1.0,))
    assert [blocks for blocks, _ in odd] == [[0, 1], [2], [3, 4]]


def test_a_chart_of_96_different_blocks_thins_its_labels(tp4):
    pytest.importorskip("matplotlib")
    many = dataclasses.replace(tp4, layer_of={f"n{i}": i for i in range(96)}, collectives=[])
    figure = graph.layer_time_figure(many, compute_by_layer={i: i * 1e-3 for i in range(96)})
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert 16 <= len(labels) <= graph.MAX_LABELS and labels[0] == "0"


def test_the_summary_and_report_say_what_memory_choices_were_made(piped):
    chosen = gpt2(tp=2, pp=2, microbatches=4, schedule="1f1b", zero=1, recompute="full",
                  sequence_parallel=True)  # fmt: skip
    text = chosen.summary()
    assert "ZeRO-1" in text and "sequence parallelism on" in text
    assert "activation recomputation full" in text
    assert "ZeRO-1" in render_report(chosen)
    stages = [dataclasses.replace(stage, recompute=mode)
              for stage, mode in zip(piped.stages, ("full", "none"), strict=True)]  # fmt: skip
    mixed = dataclasses.replace(piped, stages=stages, recompute="mixed")
    assert "activation recomputation full on stage 0, none on stage 1" in mixed.summary()
