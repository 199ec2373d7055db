"""The HTML report as a browser draws it: headless Chromium (Debian's package, which
`make test` installs through `make browser`) opens a generated report, and the test
fails on console errors, an image that did not decode, or a timeline or block graph
whose region of the screenshot is blank."""

from __future__ import annotations

import pytest
from browser import CHROMIUM, open_page, region_spread

from autopar.api import plan as make_plan
from autopar.mesh import Mesh
from autopar.models import build_model
from autopar.viz.report import write_report

DRAWN = ("timeline", "block-graph", "layer-time")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a dp=2 tp=2 pp=2 GPT-2 plan: every picture is in it."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `make browser` (Debian's chromium)"
    model, inputs = build_model("gpt2", n_layer=2, batch=8, seq=128)
    plan = make_plan(model, inputs, Mesh.preset("a100-80gb"), tp=2, pp=2, microbatches=4)
    return write_report(plan, tmp_path_factory.mktemp("report") / "report.html")


def test_chromium_draws_the_report(report, tmp_path):
    page = open_page(report)
    assert page.console_errors == []
    (tmp_path / "report.png").write_bytes(page.screenshot_png)
    for name in DRAWN:
        rect = page.rects[name]
        assert rect["decoded"] and rect["width"] > 300 and rect["height"] > 150, rect
        spread, inked = region_spread(page.screenshot_png, rect)
        assert spread > 10 and inked > 0.02, (name, spread, inked)
    margin = {"x": 0, "y": 0, "width": 30, "height": page.rects["timeline"]["y"]}
    assert region_spread(page.screenshot_png, margin) == (0.0, 0.0)  # blank reads as blank


def test_a_console_error_fails_the_page(report, tmp_path):
    broken = tmp_path / "broken.html"
    script = "<script>console.error('drawing failed'); undefined_call();</script>"
    broken.write_text(report.read_text().replace("</body>", script + "</body>"))
    errors = open_page(broken).console_errors
    assert "drawing failed" in errors[0] and "undefined_call" in " ".join(errors)
