"""The `autopar` command (also `python -m autopar`).

    autopar plan gpt2 --mesh a100-80gb:2 --batch 8 --seq 1024 --out gpt2.plan.json --html gpt2.html
    autopar plan mypkg.models:build --mesh h100-80gb --tp 8
    autopar plan gpt2 --mesh local:4 --calibration cal.json --json
    autopar show gpt2.plan.json [--json]
    autopar diff a.plan.json b.plan.json [--json]
    autopar report gpt2.plan.json --html gpt2.html
    autopar calibrate --world-size 2
    autopar models
    autopar demo

MODEL is a built-in name (`autopar models` lists them; built on the meta device,
no downloads) or `package.module:factory`, a callable taking no arguments that
returns `(model, example_inputs)` or just a model, in which case input_ids of
shape (--batch, --seq) are made for it. The current directory is importable.

Errors a user can cause print one line `autopar: error: ...` and exit with 2.
Every command checks its arguments and paths before it starts long work, and
imports torch only once they are good.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from autopar.cli_args import DEFAULT_BATCH, DTYPES, parse_args
from autopar.console import Progress, human_count, layout_progress, write_plan_files
from autopar.errors import AutoparError
from autopar.fileio import check_readable, check_writable

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------- models


def _example_ids(model, batch: int, seq: int) -> tuple:
    """Token ids of zeros (valid for any vocabulary) on the model's device."""
    import torch

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


def model_builder(spec: str) -> Callable[[int | None, int | None], tuple]:
    """`build(batch, seq) -> (model, example_inputs)` for MODEL, checked before work starts.

    A built-in name must be known and a factory importable here, so that a typo fails
    before the progress line of the (possibly long) build.
    """
    if ":" in spec:
        return functools.partial(_from_factory, spec, import_factory(spec))
    from autopar.models import MODEL_NAMES, build_model

    if spec not in MODEL_NAMES:
        raise AutoparError(
            f"unknown model {spec!r}; built-in models are: {', '.join(MODEL_NAMES)}; "
            "or pass package.module:factory"
        )
    return lambda batch, seq: build_model(spec, batch=batch or DEFAULT_BATCH, seq=seq)


def _from_factory(spec: str, factory: Callable, batch: int | None, seq: int | None):
    """(model, example_inputs) from what a user's factory returns."""
    from torch import nn

    result = factory()
    if isinstance(result, nn.Module):
        if seq is None:
            raise AutoparError(
                f"{spec} returned a model without example inputs; pass --seq N (and --batch N) "
                "to make input_ids for it, or return (model, example_inputs)"
            )
        return result, _example_ids(result, batch or DEFAULT_BATCH, seq)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
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


# ----------------------------------------------------------------------------- plan


def cmd_plan(args) -> int:
    _check_outputs(args.out, args.html)  # before importing torch: a bad path fails at once
    from autopar.api import plan as make_plan
    from autopar.capture import capture
    from autopar.solver.search import normalize_schedule

    mesh = plan_mesh(args.mesh, args.calibration)
    schedule = normalize_schedule(args.schedule)
    build = model_builder(args.model)
    progress = Progress(args.quiet)
    with progress.step(f"building {args.model}"):
        model, inputs = build(args.batch, args.seq)
    with progress.step("capturing the graph (torch.export)"):
        traced = capture(model, inputs)
    with progress.step(f"searching layouts of {mesh.world_size} devices") as update:
        plan = make_plan(
            traced, inputs, mesh, dtype=_dtype(args.dtype, args.mesh), dp=args.dp, tp=args.tp,
            pp=args.pp, microbatches=args.microbatches, schedule=schedule,
            global_batch_size=args.global_batch, time_limit_s=args.time_limit,
            progress=layout_progress(update), model_name=args.model,
        )  # fmt: skip
    _print_plan(plan, args.json)
    write_plan_files(plan, args.out, args.html, file=sys.stderr if args.json else None)
    return 0


def plan_mesh(text: str, calibration: str | None):
    """The --mesh, with --calibration's constants when it names a local mesh."""
    from autopar.mesh import Mesh

    mesh = Mesh.from_string(text)
    if calibration is None:
        return mesh
    if not text.startswith("local:"):
        raise AutoparError(
            f"--calibration applies to local:N meshes only (a measurement of this machine); "
            f"--mesh {text} uses its preset's datasheet constants: drop --calibration"
        )
    return Mesh.local(mesh.world_size, calibration=check_readable(calibration, "calibration file"))


def _dtype(name: str | None, mesh_text: str):
    """--dtype, else bf16 on GPU presets; a local CPU mesh keeps its own (fp32)."""
    import torch

    if name is None:
        return None if mesh_text.startswith("local") else torch.bfloat16
    return getattr(torch, DTYPES[name])


def _check_outputs(out: str | None = None, html: str | None = None, plan_file=None) -> None:
    """Fail now, not after minutes of work, if the plan or report path cannot be written,
    or if the report would overwrite the plan (`out`, or the `plan_file` being read)."""
    plan_target = None if out is None else check_writable(out, "plan")
    if html is None:
        return
    plan_target = plan_target or (plan_file and Path(os.path.realpath(plan_file)))
    if check_writable(html, "report") == plan_target:
        raise AutoparError(f"--html {html} is the plan file; write the report to another path")


def _print_plan(plan, as_json: bool) -> None:
    """The summary, or with --json the plan file's contents and nothing else on stdout."""
    print(json.dumps(plan.to_dict(), indent=1) if as_json else plan.summary())


# ----------------------------------------------------------------------------- other commands


def load_plan(path: str):
    """The plan saved at `path`; any reason it cannot be read becomes one AutoparError."""
    check_readable(path, "plan file")
    from autopar.plan import Plan

    try:
        return Plan.load(path)
    except (OSError, UnicodeDecodeError) as error:
        raise AutoparError(f"cannot read plan file {path}: {error}") from None


def cmd_show(args) -> int:
    _print_plan(load_plan(args.plan), args.json)
    return 0


def cmd_diff(args) -> int:
    from autopar.plan.diff import format_diff, plan_diff
    from autopar.plan.value import readable_json

    diff = plan_diff(load_plan(args.a), load_plan(args.b))
    print(readable_json(diff) if args.json else format_diff(diff, (args.a, args.b)))
    return 0


def cmd_report(args) -> int:
    html = args.html or str(Path(args.plan).with_suffix(".html"))
    _check_outputs(html=html, plan_file=args.plan)
    write_plan_files(load_plan(args.plan), None, html)
    return 0


def cmd_calibrate(args) -> int:
    if args.out is not None:
        check_writable(args.out, "calibration")
    from autopar.calibrate import calibrate, format_calibration
    from autopar.profile import default_calibration_path

    path = Path(args.out) if args.out else default_calibration_path()
    what = f"measuring this machine with 1..{args.world_size} {args.backend} ranks"
    with Progress(args.quiet).step(what) as update:
        result = calibrate(args.world_size, out_path=path, backend=args.backend, progress=update)
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
    _check_outputs(html=args.html)
    from autopar.demo import run_demo

    run_demo(html=args.html, quiet=args.quiet, train=not args.no_train)
    return 0


COMMANDS = {
    "plan": cmd_plan,
    "show": cmd_show,
    "diff": cmd_diff,
    "report": cmd_report,
    "calibrate": cmd_calibrate,
    "models": cmd_models,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help printed its text (mistakes raise AutoparError)
        return exit_.code
    except AutoparError as error:
        return _report(error)
    try:
        return COMMANDS[args.command](args)
    except AutoparError as error:
        return _report(error)
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130


def _report(error: AutoparError) -> int:
    print(f"autopar: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
