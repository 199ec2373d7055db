"""The `autopar` command, run in-process through `main([...])` (plus one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_profile

from autopar.cli import main
from autopar.models import build_model
from autopar.plan import Plan

MESH = "a100-80gb"


def tiny():
    """`test_cli:tiny`: a (model, example_inputs) factory the CLI imports by name.

    Two GPT-2 blocks on the meta device, big enough that sharding pays off on A100s.
    """
    return build_model("gpt2", n_layer=2, batch=4, seq=256)


def tiny_model_only():
    """`test_cli:tiny_model_only`: returns a bare model, so the CLI makes input_ids."""
    return tiny()[0]


def not_a_model():
    return 42


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Plan the tiny model once; tests share its plan file, report and output."""
    folder = tmp_path_factory.mktemp("cli")
    plan_path, html_path = folder / "tiny.plan.json", folder / "tiny.html"
    argv = ["plan", "test_cli:tiny", "--mesh", MESH, "--out", str(plan_path)]
    code = main([*argv, "--html", str(html_path), "--quiet"])
    return code, plan_path, html_path


def one_error_line(err: str) -> str:
    """The error line, asserting it is the only line (test_cli_errors uses it too)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autopar: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_plan_writes_a_loadable_plan_and_a_report(planned):
    code, plan_path, html_path = planned
    assert code == 0
    plan = Plan.load(plan_path)
    assert plan.dp * plan.tp * plan.pp == 8
    html = html_path.read_text()
    assert f"<b>tp</b> = {plan.tp}" in html
    assert "transformer.h.0.attn.c_attn.weight" in html


def test_plan_prints_the_summary_and_where_files_went(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["plan", "test_cli:tiny", "--mesh", MESH, "--tp", "2", "--pp", "1", "--dtype", "fp32"]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "autopar plan: dp=4 tp=2 pp=1" in captured.out
    assert f"plan written to {out}" in captured.out
    assert "autopar: capturing the graph" in captured.err  # progress goes to stderr


def test_factory_returning_a_bare_model_needs_seq(tmp_path, capsys):
    argv = ["plan", "test_cli:tiny_model_only", "--mesh", MESH, "--quiet"]
    assert main(argv) == 2
    assert "--seq" in one_error_line(capsys.readouterr().err)
    assert main([*argv, "--batch", "2", "--seq", "64"]) == 0
    assert "autopar plan:" in capsys.readouterr().out


def test_show_prints_the_summary(planned, capsys):
    _, plan_path, _ = planned
    assert main(["show", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == Plan.load(plan_path).summary().strip()


def test_json_alone_on_stdout_and_out_through_a_symlink(tmp_path, capsys):
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("an older plan")
    link.symlink_to(target)
    argv = ["plan", "test_cli:tiny", "--mesh", MESH, "--tp", "2", "--pp", "1", "--json"]
    assert main([*argv, "--out", str(link)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert (printed["dp"], printed["tp"], printed["pp"]) == (4, 2, 1)
    assert link.is_symlink() and json.loads(target.read_text()) == printed
    assert f"plan written to {link}" in captured.err


def test_show_json_prints_the_plan_file(planned, capsys):
    _, plan_path, _ = planned
    assert main(["show", str(plan_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(plan_path.read_text())


def test_calibration_file_prices_a_local_mesh(tmp_path, capsys):
    calibration = write_profile(tmp_path / "cal.json", worlds=(1, 2), matmul_flops=8e10)
    argv = ["plan", "test_cli:tiny", "--mesh", "local:2", "--calibration", str(calibration)]
    assert main([*argv, "--json", "--quiet"]) == 0
    device = json.loads(capsys.readouterr().out)["mesh"]["device"]
    assert device["name"] == "cpu (calibrated)"
    assert device["peak_flops"] == 8e10  # what each of the two ranks measured with both busy


def test_report_writes_html(planned, tmp_path, capsys):
    _, plan_path, _ = planned
    html_path = tmp_path / "again.html"
    assert main(["report", str(plan_path), "--html", str(html_path)]) == 0
    assert f"report written to {html_path}" in capsys.readouterr().out
    assert "Parameter placements" in html_path.read_text()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["plan", "no-such-model", "--mesh", MESH], ["unknown model 'no-such-model'", "gpt2"]),
        (["plan", "gpt2", "--mesh", "tpu-v5:2"], ["cannot read mesh 'tpu-v5:2'", "a100-80gb"]),
        (["plan", "no_such_module:f", "--mesh", MESH], ["cannot import 'no_such_module'"]),
        (["plan", "test_cli:missing", "--mesh", MESH], ["no callable 'missing'"]),
        (["plan", "test_cli:not_a_model", "--mesh", MESH], ["returned int"]),
        (["plan", "test_cli:tiny", "--mesh", MESH, "--tp", "3"], ["tp=3"]),
        (["show", "/no/such/plan.json"], ["no plan file at /no/such/plan.json"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, expected, capsys):
    assert main([*argv, "--quiet"] if argv[0] == "plan" else argv) == 2
    line = one_error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line


def test_a_file_that_is_not_a_plan(tmp_path, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[1, 2]")
    assert main(["show", str(bogus)]) == 2
    assert "not a plan file" in one_error_line(capsys.readouterr().err)


def test_usage_errors_exit_2_without_running(capsys):
    assert main(["plan", "gpt2"]) == 2  # --mesh missing
    assert "--mesh" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--mesh", MESH, "--batch", "0"]) == 2
    assert main([]) == 2


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("plan", "show", "report", "calibrate", "models", "demo"):
        assert command in out


def test_python_dash_m_autopar_models_lists_the_zoo():
    from autopar.models import MODEL_NAMES

    result = subprocess.run(
        [sys.executable, "-m", "autopar", "models"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert set(MODEL_NAMES) <= set(rows)
    assert "175.0B" in rows["gpt3-175b"] or "174.6B" in rows["gpt3-175b"]
    assert rows["llama3-8b"].split()[6] == "8"  # kv heads (grouped-query attention)


def test_demo_tables_on_a_tiny_model():
    from autopar.api import plan as make_plan
    from autopar.capture import capture
    from autopar.demo import demo_collective_table, demo_compare_table, demo_layer_table
    from autopar.mesh import Mesh

    model, inputs = tiny()
    traced = capture(model, inputs)
    plan = make_plan(traced, inputs, Mesh.preset(MESH), tp=2, pp=1)
    layers = demo_layer_table(traced)
    assert "outside" in layers and "total" in layers
    rows = demo_collective_table(plan).splitlines()[1:-1]  # between the header and the total
    axes = {row.split()[0] for row in rows}
    assert plan.dp > 1 and axes == {"tp", "dp"}, rows  # the dp gradient sync is labelled dp
    assert "1 node" in demo_compare_table({"1 node": plan})
