"""How the whole search grows with the model's depth and with the cluster.

    .venv/bin/python benchmarks/solver_scaling.py              # both sweeps, 1 run each
    .venv/bin/python benchmarks/solver_scaling.py --runs 3 --sweep layers

Two sweeps of GPT-3 175B's width (hidden 12288, 96 heads, sequence 2048) on the meta
device, bf16 with Adam, global batch 1536:

- layers: 12 to 192 blocks on 128 A100-80GB nodes (1,024 GPUs);
- gpus:   8 to 4,096 GPUs (1 to 512 nodes) at 96 blocks.

Each case times what a user waits for: building the model on meta, `autopar.capture`
and `autopar.plan` (the free search over dp, tp, pp, schedules, microbatches,
recomputation and ZeRO), the median of --runs. A case no plan fits is timed too (the
search that proves it is part of the answer). Prints a table and the growth ratio of
each step against the previous one (time ratio over size ratio: 1.0 is linear), writes
benchmarks/results/solver_scaling.json and a log-log plot docs/solver_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from autopar.api import plan as make_plan
from autopar.capture import capture
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.models import build_model

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 1536
SWEEPS = {
    "layers": [(layers, 128) for layers in (12, 24, 48, 96, 128, 192)],
    "gpus": [(96, nodes) for nodes in (1, 4, 16, 64, 128, 256, 512)],
}


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(layers: int, nodes: int, runs: int) -> dict:
    """Median build, capture and plan seconds of one case, and the plan it finds."""
    mesh = Mesh.preset("a100-80gb", nodes=nodes)
    builds, captures, plans, found = [], [], [], None
    for _ in range(runs):
        (model, inputs), seconds = _timed(lambda: build_model("gpt3-175b", n_layer=layers))
        builds.append(seconds)
        traced, seconds = _timed(lambda m=model, i=inputs: capture(m, i))
        captures.append(seconds)
        start = time.perf_counter()
        try:
            plan = make_plan(traced, inputs, mesh, dtype=torch.bfloat16,
                             global_batch_size=GLOBAL_BATCH)  # fmt: skip
            schedule = f" {plan.schedule}" if plan.pp > 1 else ""
            found = (f"dp={plan.dp} tp={plan.tp} pp={plan.pp}{schedule} "
                     f"recompute={plan.recompute} zero={plan.zero}, "
                     f"{plan.cost.step_time_s:.2f} s")  # fmt: skip
        except AutoparError as exc:
            found = "no plan: " + str(exc).splitlines()[0]
        plans.append(time.perf_counter() - start)
    row = {"layers": layers, "gpus": mesh.world_size, "build_s": statistics.median(builds),
           "capture_s": statistics.median(captures), "plan_s": statistics.median(plans),
           "plan": found}  # fmt: skip
    row["total_s"] = row["build_s"] + row["capture_s"] + row["plan_s"]
    return row


def growth(rows: list[dict], size_key: str) -> list[float | None]:
    """Each case's total time ratio to the previous case's, over their size ratio."""
    ratios = [None]
    for before, after in zip(rows, rows[1:], strict=False):
        size = after[size_key] / before[size_key]
        ratios.append(after["total_s"] / before["total_s"] / size)
    return ratios


def table(sweep: str, rows: list[dict], ratios: list) -> str:
    lines = [f"{'layers':>6s} {'GPUs':>5s} {'build':>6s} {'capture':>7s} {'plan':>6s} "
             f"{'total':>6s} {'growth':>6s}  plan"]  # fmt: skip
    for row, ratio in zip(rows, ratios, strict=True):
        lines.append(
            f"{row['layers']:6d} {row['gpus']:5d} {row['build_s']:6.2f} {row['capture_s']:7.2f} "
            f"{row['plan_s']:6.2f} {row['total_s']:6.2f} "
            f"{'' if ratio is None else f'{ratio:.2f}':>6s}  {row['plan']}"
        )
    return f"sweep over {sweep} (seconds; growth: time ratio / size ratio)\n" + "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (sweep, rows) in zip(axes[0], results.items(), strict=True):
        key = "layers" if sweep == "layers" else "gpus"
        sizes = [row[key] for row in rows]
        for step in ("capture_s", "plan_s", "total_s"):
            ax.plot(sizes, [row[step] for row in rows], marker="o", label=step[:-2])
        linear = [rows[0]["total_s"] * s / sizes[0] for s in sizes]
        ax.plot(sizes, linear, linestyle=":", color="gray", label="linear")
        ax.set(xscale="log", yscale="log", xlabel=key, ylabel="seconds",
               title=f"GPT-3 width, {sweep} sweep")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=[*SWEEPS, "both"], default="both")
    parser.add_argument("--runs", type=int, default=1, help="repetitions per case (median)")
    args = parser.parse_args(argv)
    sweeps = list(SWEEPS) if args.sweep == "both" else [args.sweep]
    measure(12, 1, 1)  # untimed: imports and the first export are not the search's cost
    results = {}
    for sweep in sweeps:
        rows = []
        for layers, nodes in SWEEPS[sweep]:
            print(f"... {layers} layers on {nodes * 8} GPUs", file=sys.stderr, flush=True)
            rows.append(measure(layers, nodes, args.runs))
        ratios = growth(rows, "layers" if sweep == "layers" else "gpus")
        for row, ratio in zip(rows, ratios, strict=True):
            row["growth"] = ratio
        print(table(sweep, rows, ratios) + "\n")
        results[sweep] = rows
    out = ROOT / "benchmarks" / "results" / "solver_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "load": os.getloadavg()}
    out.write_text(json.dumps({"machine": meta, "runs": args.runs, "sweeps": results}, indent=1))
    plot(results, ROOT / "docs" / "solver_scaling.png")
    print(f"written to {out} and docs/solver_scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
