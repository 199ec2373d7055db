"""The `autopar` command's arguments: every option, its type and its help.

A mistake argparse catches raises `AutoparError`, so that it is reported like every
other user error: one line `autopar: error: ...`, exit status 2, no usage dump.
Nothing here imports torch; `autopar --help` and argument errors return at once.
"""

from __future__ import annotations

import argparse
import math

from autopar.errors import AutoparError

DEFAULT_BATCH = 8
# --dtype names -> torch dtype attribute names (torch is imported only to plan)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises AutoparError instead of printing usage and exiting."""

    command_names: tuple[str, ...] = ()  # the top-level parser's subcommands

    def error(self, message: str):
        raise AutoparError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="autopar",
        description="Plan tensor/data/pipeline parallelism for a PyTorch transformer.",
    )
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(metavar="COMMAND")
    _add_plan(commands)
    show = _command(commands, "show", "print the summary of a saved plan")
    show.add_argument("plan", help="a plan file written by `autopar plan --out`")
    _add_json(show)
    diff = _command(commands, "diff", "what differs between two saved plans, side by side")
    diff.add_argument("a", help="a plan file")
    diff.add_argument("b", help="another plan file")
    diff.add_argument("--json", action="store_true", help="print the differences as JSON on stdout")
    report = _command(commands, "report", "write the HTML report of a saved plan")
    report.add_argument("plan", help="a plan file written by `autopar plan --out`")
    report.add_argument("--html", help="output path (default: the plan path with .html)")
    cal = _command(commands, "calibrate", "measure this machine for Mesh.local")
    cal.add_argument("--world-size", type=_positive, default=4,
                     help="measure 1..N local ranks (default 4)")  # fmt: skip
    cal.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                     help="torch.distributed backend (default gloo; nccl: one GPU per rank)")  # fmt: skip
    cal.add_argument("--out", help="output path (default ~/.cache/autopar/calibration.json)")
    _add_quiet(cal)
    _command(commands, "models", "list the built-in models and their sizes")
    demo = _command(
        commands, "demo", "plan GPT-2 for A100 nodes, then train a 3D plan on 8 local ranks"
    )
    demo.add_argument("--html", help="also write the one-node plan's HTML report here")
    _add_quiet(demo)
    demo.add_argument("--no-train", action="store_true", help="skip training on local ranks")
    parser.command_names = tuple(commands.choices)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; AutoparError for any mistake in it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"missing COMMAND, one of: {', '.join(parser.command_names)}")
    return args


def _command(commands, name: str, help_text: str) -> ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    parser.set_defaults(command=name)
    return parser


def _add_plan(commands) -> None:
    plan = _command(commands, "plan", "find a parallel plan for a model on a mesh")
    plan.add_argument("model", help="built-in model name or package.module:factory")
    plan.add_argument(
        "--mesh", required=True, help="PRESET[:NODES] (a100-40gb, a100-80gb, h100-80gb) "
        "or local:WORLD_SIZE",
    )  # fmt: skip
    plan.add_argument("--calibration", metavar="FILE", help="constants for a local:N mesh, "
                      "from `autopar calibrate --out FILE`")  # fmt: skip
    plan.add_argument("--batch", type=_positive, help="example batch of one data-parallel "
                      f"replica (default {DEFAULT_BATCH})")  # fmt: skip
    plan.add_argument("--seq", type=_positive, help="sequence length (default: the context)")
    plan.add_argument("--global-batch", type=_positive, metavar="N", help="global batch size; "
                      "the example batch then only fixes shapes")  # fmt: skip
    for degree in ("tp", "dp", "pp"):
        plan.add_argument(f"--{degree}", type=_positive, help=f"pin the {degree} degree")
    plan.add_argument("--microbatches", type=_positive, metavar="N", help="pin microbatches")
    plan.add_argument("--schedule", help="pin the pipeline schedule: gpipe, 1f1b, interleaved1f1b")
    plan.add_argument("--dtype", choices=tuple(DTYPES), help="training dtype (default bf16)")
    plan.add_argument("--time-limit", type=_seconds, metavar="S", help="ILP time limit, seconds")
    plan.add_argument("--out", help="write the plan (JSON) here")
    plan.add_argument("--html", help="write the HTML report here")
    _add_json(plan)
    _add_quiet(plan)


def _add_json(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the plan as JSON on stdout (messages: stderr)"
    )


def _add_quiet(parser: ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value
