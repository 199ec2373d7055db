"""The HTML report and the plan pictures, on a two-block GPT-2 planned for one A100 node."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from autopar.api import plan as make_plan
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.viz import graph, timeline
from autopar.viz.report import collective_totals, layer_ranges, render_report, write_report


@pytest.fixture(scope="module")
def plan():
    model, inputs = build_model("gpt2", n_layer=2, batch=4, seq=256)  # meta device
    return make_plan(model, inputs, Mesh.preset("a100-80gb"), tp=4, pp=1)


def test_report_is_one_self_contained_file(plan, tmp_path):
    path = write_report(plan, tmp_path / "report.html")
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<b>dp</b> = 2" in html and "<b>tp</b> = 4" in html and "<b>pp</b> = 1" in html
    assert "http://" not in html and "https://" not in html  # no external assets
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no .tmp left behind


def test_report_tables(plan):
    html = render_report(plan)
    assert "<h3>blocks 0-1</h3>" in html  # identical blocks share one table
    assert "transformer.h.0.mlp.c_fc.weight" in html
    assert "column-parallel" in html and "row-parallel" in html
    assert "Communication by axis, kind and phase" in html
    assert "all_reduce" in html and "backward" in html
    assert "Pipeline stages" in html
    assert "Every op had a sharding rule." in html


def test_report_lists_ops_with_no_rule(plan):
    html = render_report(dataclasses.replace(plan, unsupported_ops=["aten.<weird>.default"]))
    assert "aten.&lt;weird&gt;.default" in html  # listed, and escaped


def test_report_embeds_pictures_when_matplotlib_is_there(plan):
    pytest.importorskip("matplotlib")
    assert render_report(plan).count('src="data:image/png;base64,') == 2


def test_report_without_matplotlib(plan, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert not graph.matplotlib_available()
    html = render_report(plan)
    assert "<img" not in html and "pip install matplotlib" in html
    with pytest.raises(AutoparError, match="pip install matplotlib"):
        graph.layer_time_figure(plan)


def test_figures_render_to_png(plan):
    pytest.importorskip("matplotlib")
    for figure in (
        graph.layer_time_figure(plan),
        graph.layer_time_figure(plan, compute_by_layer={0: 1e-3, 1: 1e-3, None: 2e-3}),
        graph.block_dataflow_figure(plan, layer=1),
    ):
        assert graph.figure_png(figure).startswith(b"\x89PNG")


def test_block_diagram_of_a_missing_block(plan):
    pytest.importorskip("matplotlib")
    with pytest.raises(AutoparError, match="block 7 is not in this plan"):
        graph.block_dataflow_figure(plan, layer=7)


def test_communication_by_layer_adds_up(plan):
    by_layer = graph.communication_by_layer(plan)
    assert set(by_layer) >= {0, 1}
    total = sum(sum(phases.values()) for phases in by_layer.values())
    assert total == pytest.approx(sum(c.seconds for c in plan.collectives if c.axis == "tp"))
    assert any(c.axis == "dp" for c in plan.collectives)  # the gradient sync: not per block
    counts = collective_totals(plan)
    assert sum(n for n, _, _ in counts.values()) == len(plan.collectives)
    on_dp = collective_totals(plan, "dp")
    assert sum(n for n, _, _ in on_dp.values()) == sum(c.axis == "dp" for c in plan.collectives)


def test_small_helpers():
    assert layer_ranges([5, 0, 1, 2]) == "0-2, 5"
    assert layer_ranges([]) == ""
    assert graph.short_op("aten.mm.default") == "mm"
    assert graph.short_op("<built-in function getitem>") == "getitem"
    assert graph.placement_kind("S(1,g3)") == "S"


# ----------------------------------------------------------------------------- pipeline timeline


@pytest.mark.parametrize(
    ("schedule", "stage_time", "num_stages", "expected"),
    [
        ("gpipe", 1.0, 4, 8 + 3),  # (m + pp - 1) t
        ("1f1b", 1.0, 4, 8 + 3),
        ("interleaved1f1b", 0.5, 8, 8 + 3 / 2),  # (m + (pp - 1) / v) t, v = 2 chunks
    ],
)
def test_timeline_matches_the_textbook_step(schedule, stage_time, num_stages, expected):
    actions = timeline.simulate([stage_time] * num_stages, pp=4, m=8, schedule=schedule)
    assert max(a.end for a in actions) == pytest.approx(expected)
    assert len(actions) == 2 * 8 * num_stages
    for rank in range(4):  # a rank runs one action at a time
        mine = sorted((a.start, a.end) for a in actions if a.rank == rank)
        assert all(
            end <= start + 1e-12 for (_, end), (start, _) in zip(mine, mine[1:], strict=False)
        )


def test_1f1b_keeps_fewer_microbatches_in_flight_than_gpipe():
    def peak_in_flight(schedule):
        actions = timeline.simulate([1.0] * 4, pp=4, m=8, schedule=schedule)
        rank0 = sorted((a for a in actions if a.rank == 0), key=lambda a: a.start)
        alive = peak = 0
        for a in rank0:
            alive += 1 if a.kind == "F" else -1
            peak = max(peak, alive)
        return peak

    assert peak_in_flight("gpipe") == 8
    assert peak_in_flight("1f1b") == 4


def test_interleaving_needs_microbatches_in_multiples_of_pp():
    with pytest.raises(AutoparError, match="deadlocks"):
        timeline.simulate([0.5] * 8, pp=4, m=6, schedule="interleaved1f1b")


def test_report_draws_the_timeline_of_a_pipelined_plan():
    pytest.importorskip("matplotlib")
    model, inputs = build_model("gpt2", n_layer=4, batch=4, seq=256)
    piped = make_plan(model, inputs, Mesh.preset("a100-80gb"), tp=2, pp=4, microbatches=4)
    assert piped.pp == 4
    assert render_report(piped).count('src="data:image/png;base64,') == 3
    assert "<th>pp rank</th>" in render_report(piped)
