"""The experiments' shared machinery (examples/experiments/common.py): a planned point,
its plot, and a section of docs/experiments.md rewritten without touching the others."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "experiments"))
import common  # noqa: E402

from autopar.mesh import Mesh  # noqa: E402


def test_a_point_is_the_free_search_plan_and_its_figure_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "FIGURES", tmp_path)
    point = common.plan_point(8, "8 GPUs", "gpt2", Mesh.preset("a100-80gb"), 1024, 64)
    assert point.layout.startswith("dp=") and point.step_s > 0
    assert point.tokens_per_s == pytest.approx(64 * 1024 / point.step_s)
    path = common.figure("probe", {"gpt2": [point]}, "GPUs", "tokens/s", lambda p: p.tokens_per_s)
    assert path.exists() and path.stat().st_size > 1000


def test_sections_are_replaced_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DOC", tmp_path / "experiments.md")
    common.write_section("one", "One", "cmd one", "first run", "| a |")
    common.write_section("two", "Two", "cmd two", "other", "| b |")
    common.write_section("one", "One", "cmd one", "second run", "| c |")
    text = common.DOC.read_text()
    assert text.startswith(common.TITLE)
    assert text.count("<!-- one -->") == 1 and "second run" in text and "first run" not in text
    assert "other" in text and text.index("<!-- one -->") < text.index("<!-- two -->")
