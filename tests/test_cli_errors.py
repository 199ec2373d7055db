"""Bad input to the `autopar` command: one line `autopar: error: ...`, exit 2, nothing lost.

Each case runs in a folder holding a file, a symlink to another file, a folder, a
named pipe, a real plan and a few broken files; after the command every one of
them (and /dev/full) must be exactly as it was, and nothing may have been added.
Cases run in-process through `main([...])`; the last tests start real processes
where the process boundary matters (exit status, stdout, what gets imported).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import one_error_line

from autopar.cli import main

MESH = "a100-80gb"
DEVICE = Path("/dev/full")
PLAN = ["plan", "gpt2", "--mesh", MESH]


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory) -> Path:
    """A real plan file (the tiny model of test_cli), for `show` and `report` cases."""
    path = tmp_path_factory.mktemp("plan") / "good.plan.json"
    assert main(["plan", "test_cli:tiny", "--mesh", MESH, "--out", str(path), "--quiet"]) == 0
    return path


@pytest.fixture
def sandbox(tmp_path, monkeypatch, saved_plan) -> Path:
    """The current folder for a case: what a careless command could overwrite or lose."""
    (tmp_path / "keep.json").write_text("keep me\n")
    (tmp_path / "target.json").write_text("the symlink's target\n")
    (tmp_path / "link.json").symlink_to("target.json")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "inside.txt").write_text("inside\n")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "binary.json").write_bytes(b"\x80\x81\xfe")
    shutil.copy(saved_plan, tmp_path / "good.plan.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict:
    """Every entry below `folder` and /dev/full: kind, inode, mtime, contents or link."""
    entries = {}
    for path in [DEVICE, *sorted(folder.rglob("*"))]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            body = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            body = path.read_bytes()
        else:
            body = info.st_rdev
        entries[str(path)] = (stat.S_IFMT(info.st_mode), info.st_ino, info.st_mtime_ns, body)
    return entries


CASES = {
    # argparse's own mistakes
    "no command": ([], ["missing COMMAND", "plan, show, diff, report, calibrate, models, demo"]),
    "unknown command": (["frobnicate"], ["invalid choice: 'frobnicate'", "'plan'"]),
    "plan without model": (["plan"], ["required: model, --mesh"]),
    "plan without mesh": (["plan", "gpt2"], ["required: --mesh"]),
    "tp 0": ([*PLAN, "--tp", "0"], ["--tp: 0 must be at least 1"]),
    "batch -1": ([*PLAN, "--batch", "-1"], ["--batch: -1 must be at least 1"]),
    "batch not a number": ([*PLAN, "--batch", "two"], ["--batch: 'two' is not a whole number"]),
    "dtype int8": ([*PLAN, "--dtype", "int8"], ["invalid choice: 'int8'", "'bf16', 'fp16'"]),
    "time limit -1": ([*PLAN, "--time-limit", "-1"], ["--time-limit: -1 must be a positive"]),
    "time limit nan": ([*PLAN, "--time-limit", "nan"], ["--time-limit: nan must be a positive"]),
    "time limit word": ([*PLAN, "--time-limit", "soon"], ["'soon' is not a number of seconds"]),
    "unknown option": ([*PLAN, "--bogus"], ["unrecognized arguments: --bogus"]),
    "show without plan": (["show"], ["required: plan"]),
    "calibrate world 0": (["calibrate", "--world-size", "0"], ["--world-size: 0 must be"]),
    # meshes, schedules, models
    "mesh empty count": (["plan", "gpt2", "--mesh", "a100-80gb:"], ["'a100-80gb:'", "h100-80gb"]),
    "mesh unknown": (["plan", "gpt2", "--mesh", "tpu-v5:2"], ["'tpu-v5:2'", "local:WORLD_SIZE"]),
    "mesh local bare": (["plan", "gpt2", "--mesh", "local"], ["'local'", "local:WORLD_SIZE"]),
    "mesh zero nodes": (["plan", "gpt2", "--mesh", "a100-80gb:0"], ["nodes=0"]),
    "mesh local 0": (["plan", "gpt2", "--mesh", "local:0"], ["world_size=0"]),
    "schedule": ([*PLAN, "--schedule", "zigzag"], ["'zigzag'", "gpipe, 1f1b, interleaved1f1b"]),
    "unknown model": (["plan", "gpt5", "--mesh", MESH], ["unknown model 'gpt5'", "gpt2-xl"]),
    "microbatches that do not divide": (
        [*PLAN, "--pp", "2", "--microbatches", "3", "--quiet"],
        ["8 rows of one replica's batch do not split into 3 microbatches"],
    ),
    "diff of a missing plan": (["diff", "good.plan.json", "nope.json"], ["no plan file at nope"]),
    # --calibration
    "calibration on a preset": ([*PLAN, "--calibration", "keep.json"], ["local:N meshes only"]),
    "calibration missing": (
        ["plan", "gpt2", "--mesh", "local:2", "--calibration", "nope.json"],
        ["no calibration file at nope.json"],
    ),
    "calibration folder": (
        ["plan", "gpt2", "--mesh", "local:2", "--calibration", "adir"],
        ["adir is a directory, not a calibration file"],
    ),
    "calibration not an object": (
        ["plan", "gpt2", "--mesh", "local:2", "--calibration", "list.json"],
        ["list.json holds no JSON object"],
    ),
    # output paths, caught before planning
    "out folder": ([*PLAN, "--out", "adir"], ["plan to adir: it is a directory"]),
    "out missing folder": ([*PLAN, "--out", "missing/parent/p.json"], ["does not exist"]),
    "out device": ([*PLAN, "--out", str(DEVICE)], ["/dev/full: it is a character device"]),
    "out pipe": ([*PLAN, "--out", "pipe"], ["plan to pipe: it is a named pipe"]),
    "html folder": ([*PLAN, "--html", "adir"], ["report to adir: it is a directory"]),
    "html missing folder": ([*PLAN, "--html", "missing/r.html"], ["does not exist"]),
    "report html missing folder": (
        ["report", "good.plan.json", "--html", "missing/x.html"],
        ["report to missing/x.html", "does not exist", "mkdir -p"],
    ),
    "report html device": (
        ["report", "good.plan.json", "--html", str(DEVICE)],
        ["character device"],
    ),
    "html over out": ([*PLAN, "--out", "keep.json", "--html", "keep.json"], ["is the plan file"]),
    "html over a linked out": ([*PLAN, "--out", "target.json", "--html", "link.json"], ["plan"]),
    "report over its plan": (["report", "good.plan.json", "--html", "good.plan.json"], ["plan"]),
    "calibrate out folder": (["calibrate", "--out", "adir"], ["calibration to adir: it is a dir"]),
    "calibrate out missing folder": (["calibrate", "--out", "nodir/c.json"], ["does not exist"]),
    "demo html folder": (["demo", "--html", "adir"], ["report to adir: it is a directory"]),
    # plan files that cannot be read
    "show folder": (["show", "adir"], ["adir is a directory, not a plan file"]),
    "show missing": (["show", "nope.json"], ["no plan file at nope.json"]),
    "show pipe": (["show", "pipe"], ["pipe is a named pipe, not a plan file"]),
    "show device": (["show", str(DEVICE)], ["/dev/full is a character device"]),
    "show not an object": (["show", "list.json"], ["list.json is not a plan file"]),
    "show not text": (["show", "binary.json"], ["cannot read plan file binary.json"]),
    "report folder": (["report", "adir"], ["adir is a directory, not a plan file"]),
}


@pytest.mark.parametrize(("argv", "expected"), list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(argv, expected, sandbox, capsys):
    before = snapshot(sandbox)
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    for text in expected:
        assert text in line
    assert captured.out == ""
    assert snapshot(sandbox) == before


def _run(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    "argv",
    [[*PLAN, "--tp", "0"], [*PLAN, "--dtype", "int8"], ["plan", "gpt2", "--mesh", "a100-80gb:"]],
    ids=["tp 0", "dtype int8", "mesh empty count"],
)
def test_a_real_process_exits_2_with_one_line_and_no_usage(argv, request):
    result = _run(["-m", "autopar", *argv], request.config.rootpath)
    assert result.returncode == 2
    one_error_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["plan", "--help"], [*PLAN, "--tp", "0"], [*PLAN, "--out", "no/dir/p.json"],
     ["show", "no-such.plan.json"]],
    ids=["help", "plan help", "tp 0", "out missing folder", "show missing"],
)  # fmt: skip
def test_help_and_argument_errors_do_not_import_torch(argv, request):
    """What keeps `autopar --help` and argument errors fast: torch is never loaded."""
    script = (
        "import sys\nfrom autopar.cli import main\ncode = main(sys.argv[1:])\n"
        "sys.exit(3 if 'torch' in sys.modules else code)"
    )
    result = _run(["-c", script, *argv], request.config.rootpath)
    assert result.returncode in (0, 2), result.stderr  # 3: torch was imported
