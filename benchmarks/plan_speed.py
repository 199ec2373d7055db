"""How long `autopar.plan` takes, from GPT-2 small to GPT-3 175B, side by side in one run.

    .venv/bin/python benchmarks/plan_speed.py            # all models, 3 runs each
    .venv/bin/python benchmarks/plan_speed.py --runs 1 gpt2 llama2-7b

Every model is built on the meta device (no weights in memory). Each case times
three steps separately and reports the median over --runs repetitions:

- capture: torch.export of the model into an fx graph, plus the graph analysis;
- plan:    the whole search over (dp, tp, pp, ...) on the captured graph;
- ILP:     the intra-op solver's time for the chosen layout (`plan.solver`).

Prints a table and writes benchmarks/results/plan_speed.json. Times depend on
the machine; the JSON records its CPU count and the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from autopar.api import plan as make_plan
from autopar.capture import capture
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    model: str
    mesh: str  # PRESET[:NODES]
    batch: int  # of the example inputs
    seq: int
    global_batch: int | None = None  # None: the example batch is one replica's


CASES = (
    Case("gpt2", "a100-80gb", 8, 1024),
    Case("gpt2-medium", "a100-80gb", 8, 1024),
    Case("gpt2-large", "a100-80gb", 8, 1024),
    Case("gpt2-xl", "a100-80gb:2", 8, 1024),
    Case("llama2-7b", "a100-80gb:4", 4, 4096),
    # 1536 x 2048 = 3.1M tokens, about GPT-3's 3.2M-token batch (Brown et al. 2020, table 2.1)
    Case("gpt3-175b", "a100-80gb:128", 1, 2048, global_batch=1536),
)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(case: Case, runs: int) -> dict:
    """Median capture, plan and ILP seconds of `runs` repetitions, and the plan found."""
    mesh = Mesh.from_string(case.mesh)
    captures, plans, ilps, plan, error = [], [], [], None, None
    for _ in range(runs):
        model, inputs = build_model(case.model, batch=case.batch, seq=case.seq)
        params = sum(p.numel() for p in model.parameters())
        traced, seconds = _timed(lambda m=model, i=inputs: capture(m, i))
        captures.append(seconds)
        try:
            plan, seconds = _timed(
                lambda t=traced, i=inputs: make_plan(
                    t, i, mesh, dtype=torch.bfloat16, global_batch_size=case.global_batch
                )
            )
        except AutoparError as exc:  # a case no plan fits is a result too
            error = str(exc).splitlines()[0]
            break
        plans.append(seconds)
        ilps.append(_ilp_seconds(plan.solver))
    return _row(case, mesh, traced, params, captures, plans, ilps, plan, error)


def _ilp_seconds(solver: dict) -> float | None:
    for key in ("ilp_time_s", "total_solve_time_s", "solve_time_s"):
        if isinstance(solver.get(key), int | float):
            return float(solver[key])
    return None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _row(case, mesh, traced, params, captures, plans, ilps, plan, error) -> dict:
    row = {
        "model": case.model,
        "mesh": case.mesh,
        "world_size": mesh.world_size,
        "batch": case.batch,
        "seq": case.seq,
        "global_batch": case.global_batch,
        "graph_nodes": len(traced.graph_module.graph.nodes),
        "blocks": traced.num_layers,
        "params": params,
        "capture_s": _median(captures),
        "plan_s": _median(plans),
        "ilp_s": _median(ilps),
        "runs": len(plans),
        "error": error,
    }
    if plan is not None and error is None:
        row |= {
            "dp": plan.dp, "tp": plan.tp, "pp": plan.pp,
            "microbatches": plan.num_microbatches, "schedule": plan.schedule,
            "step_time_s": plan.cost.step_time_s,
            "tflops_per_device": plan.cost.tflops_per_device,
            "layouts_searched": plan.solver.get("layouts_searched"),
            "solver": plan.solver,
        }  # fmt: skip
    return row


def _fmt(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        f"{'model':12s} {'mesh':14s} {'graph':>6s} {'capture s':>9s} {'plan s':>7s} "
        f"{'ILP s':>6s} {'layouts':>7s}  plan"
    ]
    for r in rows:
        found = (
            f"dp={r['dp']} tp={r['tp']} pp={r['pp']}, step {r['step_time_s'] * 1e3:.1f} ms, "
            f"{r['tflops_per_device']:.0f} TFLOP/s"
            if r["error"] is None
            else f"no plan: {r['error']}"
        )
        lines.append(
            f"{r['model']:12s} {r['mesh']:14s} {r['graph_nodes']:6d} {_fmt(r['capture_s']):>9s} "
            f"{_fmt(r['plan_s']):>7s} {_fmt(r['ilp_s']):>6s} {r.get('layouts_searched') or '-':>7}  "
            f"{found}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="subset of: " + ", ".join(c.model for c in CASES))
    parser.add_argument("--runs", type=int, default=3, help="repetitions per case (median)")
    parser.add_argument("--out", default=str(RESULTS / "plan_speed.json"))
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.models or c.model in args.models]
    rows = []
    for case in cases:
        print(f"... {case.model} on {case.mesh}", file=sys.stderr, flush=True)
        rows.append(measure(case, args.runs))
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    out.write_text(json.dumps({"machine": meta, "runs": args.runs, "results": rows}, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
