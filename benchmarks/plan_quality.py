"""autopar's predictions for published Megatron-LM runs, pinned and free, side by side.

    .venv/bin/python benchmarks/plan_quality.py

For each run of autopar/published.py (Korthikanti et al. 2022, Table 5) and each of its
two variants (full recomputation; sequence parallelism with selective recomputation):
the predicted iteration time of the published configuration pinned, the published
time and the prediction's error; then autopar's free choice on the same GPUs and
batch (its layout, predicted time and memory per device) and how it compares with the
faster of the published variants. Writes benchmarks/results/plan_quality.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autopar.api import plan as make_plan
from autopar.capture import capture
from autopar.published import KORTHIKANTI_2022, VARIANTS

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _layout(plan) -> str:
    parts = [f"dp={plan.dp} tp={plan.tp} pp={plan.pp}"]
    if plan.pp > 1:
        parts.append(f"{plan.schedule} m={plan.num_microbatches}")
    parts.append(f"mb={plan.microbatch_size} recompute={plan.recompute} zero={plan.zero}")
    parts.append("SP" if plan.sequence_parallel else "no SP")
    return " ".join(parts)


def _summary(plan) -> dict:
    return {
        "layout": _layout(plan),
        "predicted_s": plan.cost.step_time_s,
        "memory_gib": plan.cost.memory_per_device_bytes / GIB,
    }


def compare(run) -> dict:
    """The pinned variants against the published times, and the free choice."""
    model, inputs = run.model()
    traced, mesh = capture(model, inputs), run.mesh()
    pinned = {}
    for variant in VARIANTS:
        plan = make_plan(traced, inputs, mesh, **run.pins(variant), **run.options())
        published = run.seconds[variant]
        pinned[variant] = _summary(plan) | {
            "published_s": published,
            "error": plan.cost.step_time_s / published - 1,
        }
    free = _summary(make_plan(traced, inputs, mesh, **run.options()))
    fastest_pinned = min(p["predicted_s"] for p in pinned.values())
    free["speedup_over_pinned"] = fastest_pinned / free["predicted_s"]
    return {"run": run.name, "gpus": run.gpus, "global_batch": run.global_batch,
            "pinned": pinned, "free": free}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        f"{'run':5s} {'variant':10s} {'published':>9s} {'predicted':>9s} {'error':>7s}  layout"
    ]
    for row in rows:
        for variant, p in row["pinned"].items():
            lines.append(
                f"{row['run']:5s} {variant:10s} {p['published_s']:8.2f}s {p['predicted_s']:8.2f}s "
                f"{100 * p['error']:+6.1f}%  {p['layout']}, {p['memory_gib']:.1f} GiB"
            )
        free = row["free"]
        lines.append(
            f"{row['run']:5s} {'free':10s} {'':9s} {free['predicted_s']:8.2f}s {'':7s}  "
            f"{free['layout']}, {free['memory_gib']:.1f} GiB, "
            f"{free['speedup_over_pinned']:.2f}x the faster pinned variant"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    rows = []
    for run in KORTHIKANTI_2022:
        print(f"... {run.name} on {run.gpus} GPUs", file=sys.stderr, flush=True)
        rows.append(compare(run))
    print(table(rows))
    errors = [abs(p["error"]) for row in rows for p in row["pinned"].values()]
    print(f"\nlargest |error| {100 * max(errors):.1f}% over {len(errors)} published runs")
    out = RESULTS / "plan_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"source": "Korthikanti et al. 2022, Table 5", "runs": rows}, indent=1)
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
