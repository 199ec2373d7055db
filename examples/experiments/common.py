"""What every experiment shares: plan one point, draw the sweep, write its section.

An experiment sweeps one input of the planner (bandwidth, sequence length, model size,
cluster size, hardware), plans each point with the free search on the meta device
(bf16, Adam), and writes docs/experiments/<name>.png and its own section of
docs/experiments.md (between `<!-- name -->` markers, so experiments rerun one at a
time leave the others' sections alone).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import autopar  # noqa: E402
from autopar.mesh import Mesh  # noqa: E402
from autopar.models import build_model  # noqa: E402

DOC = ROOT / "docs" / "experiments.md"
FIGURES = ROOT / "docs" / "experiments"
TITLE = "# Experiments: how autopar's plan moves with the cluster and the model\n"


@dataclasses.dataclass(frozen=True)
class Point:
    """One planned configuration: what was swept, the plan chosen and its prediction."""

    x: float
    label: str  # the swept value as the table shows it
    layout: str  # dp, tp, pp and the memory choices
    step_s: float
    tokens_per_s: float
    tflops_per_device: float
    memory_gib: float


def plan_point(x, label, model_name, mesh: Mesh, seq: int, global_batch: int, **config) -> Point:
    """The free search's plan for `model_name` (meta device, bf16, Adam) on `mesh`."""
    model, inputs = build_model(model_name, batch=1, seq=seq, **config)
    plan = autopar.plan(model, inputs, mesh, dtype=torch.bfloat16, global_batch_size=global_batch)
    cost = plan.cost
    return Point(
        x, label, describe(plan), cost.step_time_s, global_batch * seq / cost.step_time_s,
        cost.tflops_per_device, cost.memory_per_device_bytes / 2**30,
    )  # fmt: skip


def describe(plan) -> str:
    """dp, tp, pp and what else the plan turns on, in one cell."""
    parts = [f"dp={plan.dp} tp={plan.tp} pp={plan.pp}"]
    if plan.pp > 1:
        parts.append(f"{plan.schedule} m={plan.num_microbatches}")
    if plan.sequence_parallel:
        parts.append("SP")
    if plan.zero:
        parts.append(f"ZeRO-{plan.zero}")
    if plan.recompute != "none":
        parts.append(f"recompute {plan.recompute}")
    return ", ".join(parts)


def sweep(name: str, points) -> list[Point]:
    """Plan every point (a generator of Points), printing progress."""
    found = []
    for point in points:
        found.append(point)
        print(f"{name}: {point.label}: {point.layout}, {point.tokens_per_s:,.0f} tokens/s",
              flush=True)  # fmt: skip
    return found


def layout_changes(points: list[Point]) -> str:
    """Where along the sweep the chosen layout changes, in words."""
    changes = [
        f"{b.layout} from {b.label}" for a, b in zip(points, points[1:], strict=False)
        if a.layout != b.layout
    ]  # fmt: skip
    start = f"{points[0].layout} at {points[0].label}"
    return start + ("; then " + "; ".join(changes) if changes else ", throughout")


def table(points: list[Point], swept: str) -> str:
    rows = [
        f"| {swept} | plan | step | tokens/s | TFLOP/s per GPU | memory per GPU |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {p.label} | {p.layout} | {p.step_s:.2f} s | {p.tokens_per_s:,.0f} | "
        f"{p.tflops_per_device:.0f} | {p.memory_gib:.1f} GiB |"
        for p in points
    ]
    return "\n".join(rows)


def figure(name: str, series: dict[str, list[Point]], xlabel: str, ylabel: str, value,
           logx: bool = True, ideal: list[tuple[float, float]] | None = None) -> Path:  # fmt: skip
    """A line per series of `value(point)` against the swept value, annotated with layouts."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, points in series.items():
        xs, ys = [p.x for p in points], [value(p) for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for p, y in zip(points, ys, strict=True):
            ax.annotate(p.layout.split(",")[0], (p.x, y), fontsize=6, rotation=20,
                        xytext=(3, 4), textcoords="offset points")  # fmt: skip
    if ideal:
        ax.plot(*zip(*ideal, strict=True), "k:", label="linear from the first point")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_section(name: str, title: str, command: str, paragraph: str, tables: str) -> None:
    """Replace (or add) this experiment's section of docs/experiments.md."""
    body = (
        f"<!-- {name} -->\n## {title}\n\n`{command}` "
        f"(plot: [experiments/{name}.png](experiments/{name}.png))\n\n"
        f"![{title}](experiments/{name}.png)\n\n{paragraph}\n\n{tables}\n<!-- /{name} -->"
    )
    text = DOC.read_text() if DOC.exists() else TITLE
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else f"{text}\n{body}\n"
    DOC.write_text(text)
    print(f"wrote {FIGURES / (name + '.png')} and its section of {DOC}")


def timed(fn):
    """Run an experiment's main, saying how long it took."""
    start = time.perf_counter()
    fn()
    print(f"done in {time.perf_counter() - start:.0f} s")
