"""The `autopar` command (also `python -m autopar`).

    autopar plan gpt2 --mesh a100-80gb:2 --batch 8 --seq 1024 --out gpt2.plan.json --html gpt2.html
    autopar plan mypkg.models:build --mesh h100-80gb --tp 8
    autopar show gpt2.plan.json
    autopar report gpt2.plan.json --html gpt2.html
    autopar calibrate --world-size 2
    autopar models
    autopar demo

MODEL is a built-in name (`autopar models` lists them; built on the meta device,
no downloads) or `package.module:factory`, a callable taking no arguments that
returns `(model, example_inputs)` or just a model, in which case input_ids of
shape (--batch, --seq) are made for it. The current directory is importable.

Errors a user can cause print one line `autopar: error: ...` and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from autopar.errors import AutoparError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_BATCH = 8
EXIT_USER_ERROR = 2
PLAIN_PROGRESS_EVERY_S = 2.0


# ----------------------------------------------------------------------------- progress


class Progress:
    """Step messages for long commands: a rich spinner on a terminal, else lines on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = _rich_console() if sys.stderr.isatty() else None

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[Callable[[str], None]]:
        """Run a step; the yielded callable updates its message (e.g. per layout searched)."""
        start = time.perf_counter()
        if self.quiet:
            yield lambda _text: None
        elif self.console is not None:
            with self.console.status(message) as status:
                yield lambda text: status.update(f"{message}: {text}")
        else:
            print(f"autopar: {message} ...", file=sys.stderr, flush=True)
            yield _throttled(lambda text: print(f"autopar:   {text}", file=sys.stderr, flush=True))
        if not self.quiet:
            self.log(f"{message}: done in {time.perf_counter() - start:.1f} s")

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(f"[dim]autopar: {message}[/dim]", highlight=False)
        else:
            print(f"autopar: {message}", file=sys.stderr, flush=True)


def _throttled(emit: Callable[[str], None], every_s: float = PLAIN_PROGRESS_EVERY_S):
    """At most one plain progress line per `every_s` seconds: a log, not a flood."""
    last = -float("inf")

    def update(text: str) -> None:
        nonlocal last
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            emit(text)

    return update


def layout_progress(update: Callable[[str], None]) -> Callable:
    """The `progress=` callback of `autopar.plan`: shows each (dp, tp, pp) layout tried."""
    count = 0

    def on_layout(layout) -> None:
        nonlocal count
        count += 1
        update(f"layout {count}: dp={layout.dp} tp={layout.tp} pp={layout.pp}")

    return on_layout


def _rich_console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


# ----------------------------------------------------------------------------- models


def _example_ids(model: torch.nn.Module, batch: int, seq: int) -> tuple[torch.Tensor]:
    """Token ids of zeros (valid for any vocabulary) on the model's device."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    return (torch.zeros((batch, seq), dtype=torch.long, device=device),)


def import_factory(spec: str) -> Callable:
    """'package.module:factory' -> the callable, importing from the current directory too."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AutoparError(f"model {spec!r} must look like package.module:factory")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise AutoparError(f"cannot import {module_name!r} for model {spec!r}: {error}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AutoparError(f"{module_name!r} has no callable {attr!r} (from model {spec!r})")
    return factory


def load_model(spec: str, batch: int | None, seq: int | None):
    """(model, example_inputs) for a built-in name or a package.module:factory."""
    from autopar.models import MODEL_NAMES, build_model

    if ":" not in spec:
        if spec not in MODEL_NAMES:
            raise AutoparError(
                f"unknown model {spec!r}; built-in models are: {', '.join(MODEL_NAMES)}; "
                "or pass package.module:factory"
            )
        return build_model(spec, batch=batch or DEFAULT_BATCH, seq=seq)
    result = import_factory(spec)()
    if isinstance(result, torch.nn.Module):
        if seq is None:
            raise AutoparError(
                f"{spec} returned a model without example inputs; pass --seq N (and --batch N) "
                "to make input_ids for it, or return (model, example_inputs)"
            )
        return result, _example_ids(result, batch or DEFAULT_BATCH, seq)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        model, inputs = result
        return model, inputs if isinstance(inputs, tuple | list) else (inputs,)
    raise AutoparError(
        f"{spec} returned {type(result).__name__}; a model factory must return an nn.Module "
        "or a (model, example_inputs) tuple"
    )


def model_facts(name: str) -> dict:
    """Size of a built-in model, read from its config after building it on meta."""
    from autopar.models import build_model

    model, _ = build_model(name, seq=1)
    config = model.config

    def first(*keys):
        return next(
            (getattr(config, k) for k in keys if getattr(config, k, None) is not None), None
        )

    return {
        "name": name,
        "family": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": first("num_hidden_layers", "n_layer"),
        "hidden": first("hidden_size", "n_embd"),
        "heads": first("num_attention_heads", "n_head"),
        "kv_heads": first("num_key_value_heads", "num_attention_heads", "n_head"),
        "context": first("max_position_embeddings", "n_positions", "block_size"),
        "vocab": first("vocab_size"),
    }


def human_count(n: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}"
    return str(int(n))


# ----------------------------------------------------------------------------- commands


def cmd_plan(args) -> int:
    from autopar.api import plan as make_plan
    from autopar.capture import capture
    from autopar.mesh import Mesh

    mesh = Mesh.from_string(args.mesh)
    progress = Progress(args.quiet)
    with progress.step(f"building {args.model}"):
        model, inputs = load_model(args.model, args.batch, args.seq)
    with progress.step("capturing the graph (torch.export)"):
        traced = capture(model, inputs)
    dtype = DTYPES[args.dtype] if args.dtype else _default_dtype(args.mesh)
    with progress.step(f"searching layouts of {mesh.world_size} devices") as update:
        plan = make_plan(
            traced, inputs, mesh, dtype=dtype, dp=args.dp, tp=args.tp, pp=args.pp,
            microbatches=args.microbatches, schedule=args.schedule,
            global_batch_size=args.global_batch, time_limit_s=args.time_limit,
            progress=layout_progress(update),
        )  # fmt: skip
    print(plan.summary())
    _write_outputs(plan, args.out, args.html)
    return 0


def _default_dtype(mesh_text: str):
    """bf16 on GPU presets; a local CPU mesh keeps its own (fp32)."""
    return None if mesh_text.startswith("local") else torch.bfloat16


def _write_outputs(plan, out: str | None, html: str | None) -> None:
    if out:
        plan.save(out)
        print(f"plan written to {out}")
    if html:
        from autopar.viz import graph
        from autopar.viz.report import write_report

        write_report(plan, html)
        print(f"report written to {html}")
        if not graph.matplotlib_available():
            print(f"note: {graph.MISSING}; the report has tables and bars only")


def cmd_show(args) -> int:
    from autopar.plan import Plan

    print(Plan.load(args.plan).summary())
    return 0


def cmd_report(args) -> int:
    from autopar.plan import Plan

    plan = Plan.load(args.plan)
    html = args.html or str(Path(args.plan).with_suffix(".html"))
    _write_outputs(plan, None, html)
    return 0


def cmd_calibrate(args) -> int:
    from autopar.calibrate import calibrate, default_calibration_path, format_calibration

    path = Path(args.out) if args.out else default_calibration_path()
    with Progress(args.quiet).step(f"measuring this machine with {args.world_size} gloo ranks"):
        result = calibrate(world_size=args.world_size, out_path=path)
    print(format_calibration(result))
    print(f"calibration written to {path}")
    return 0


def cmd_models(args) -> int:
    from autopar.models import MODEL_NAMES

    header = f"{'model':12s} {'class':18s} {'params':>8s} {'layers':>6s} {'hidden':>6s} "
    header += f"{'heads':>5s} {'kv':>3s} {'context':>7s} {'vocab':>7s}"
    print(header)
    for name in MODEL_NAMES:
        f = model_facts(name)
        print(
            f"{name:12s} {f['family']:18s} {human_count(f['params']):>8s} {f['layers']:>6} "
            f"{f['hidden']:>6} {f['heads']:>5} {f['kv_heads']:>3} {f['context']:>7} "
            f"{f['vocab']:>7}"
        )
    print("\nplan one with: autopar plan NAME --mesh a100-80gb[:NODES]")
    return 0


def cmd_demo(args) -> int:
    from autopar.demo import run_demo

    run_demo(html=args.html, quiet=args.quiet, train=not args.no_train)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopar",
        description="Plan tensor/data/pipeline parallelism for a PyTorch transformer.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plan(commands)
    show = commands.add_parser("show", help="print the summary of a saved plan")
    show.add_argument("plan", help="a plan file written by `autopar plan --out`")
    show.set_defaults(run=cmd_show)
    report = commands.add_parser("report", help="write the HTML report of a saved plan")
    report.add_argument("plan", help="a plan file written by `autopar plan --out`")
    report.add_argument("--html", help="output path (default: the plan path with .html)")
    report.set_defaults(run=cmd_report)
    cal = commands.add_parser("calibrate", help="measure this machine for Mesh.local")
    cal.add_argument("--world-size", type=int, default=2, help="gloo ranks (default 2)")
    cal.add_argument("--out", help="output path (default ~/.cache/autopar/calibration.json)")
    cal.add_argument("--quiet", action="store_true", help="no progress messages")
    cal.set_defaults(run=cmd_calibrate)
    models = commands.add_parser("models", help="list the built-in models and their sizes")
    models.set_defaults(run=cmd_models)
    demo = commands.add_parser(
        "demo", help="plan GPT-2 for A100 nodes, then train a 3D plan on 8 local ranks"
    )
    demo.add_argument("--html", help="also write the one-node plan's HTML report here")
    demo.add_argument("--quiet", action="store_true", help="no progress messages")
    demo.add_argument("--no-train", action="store_true", help="skip training on local ranks")
    demo.set_defaults(run=cmd_demo)
    return parser


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="find a parallel plan for a model on a mesh")
    plan.add_argument("model", help="built-in model name or package.module:factory")
    plan.add_argument(
        "--mesh", required=True, help="PRESET[:NODES] (a100-40gb, a100-80gb, h100-80gb) "
        "or local:WORLD_SIZE",
    )  # fmt: skip
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
    plan.add_argument("--time-limit", type=float, metavar="S", help="ILP time limit, seconds")
    plan.add_argument("--out", help="write the plan (JSON) here")
    plan.add_argument("--html", help="write the HTML report here")
    plan.add_argument("--quiet", action="store_true", help="no progress messages")
    plan.set_defaults(run=cmd_plan)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    try:
        return args.run(args)
    except AutoparError as error:
        print(f"autopar: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
