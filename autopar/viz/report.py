"""One self-contained HTML page that explains a Plan: `write_report(plan, path)`.

Sections: degrees and mesh; the predicted step split into compute, communication
and bubble, and memory against the device's; parameter placements per group of
identical blocks with Megatron's role names; communication by kind and phase;
per-stage time and memory; the ops that had no sharding rule. Bars are plain
CSS, so the page reads without matplotlib; with it, the pictures of `viz.graph`
and the pipeline timeline of `viz.timeline` are embedded as base64 PNG. No
external assets: the file can be mailed or attached to a ticket as is.
"""

from __future__ import annotations

import base64
import html
import os
from collections import defaultdict
from pathlib import Path

from autopar.errors import AutoparError
from autopar.fileio import write_atomic
from autopar.plan.roles import Roles
from autopar.plan.summary import (
    communication_parts,
    human_bytes,
    human_seconds,
    model_line,
    plan_summary,
    search_line,
    throughput,
)
from autopar.viz import graph, timeline

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
.muted { color: #666; } code, pre { font: 12px/1.4 ui-monospace, monospace; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .25em .8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.degrees span { display: inline-block; margin-right: 1.2em; font-size: 1.25em; }
.bar { background: #eef1f4; width: 360px; height: 14px; position: relative; }
.bar div { height: 14px; position: absolute; left: 0; top: 0; }
.R { background: #c9d6e3; } .S { background: #8fd19e; } .P { background: #f4b183; }
.compute { background: #a0a0a0; } .comm { background: #4c72b0; }
.bubble { background: #dd8452; } .memory { background: #55a868; }
.tag { padding: 0 .4em; border-radius: 3px; font: 12px ui-monospace, monospace; }
img { max-width: 100%; }
"""


# What Plan.collectives holds, said wherever they are summed.
COLLECTIVES_SCOPE = (
    "the collectives of the whole model for one forward and backward pass of the example "
    "batch (each pipeline stage runs only its own blocks' share, once per microbatch)"
)


def write_report(plan, path: str | os.PathLike) -> Path:
    """Write the report for `plan` to `path` atomically and return the path."""
    write_atomic(path, render_report(plan))
    return Path(path)


def render_report(plan) -> str:
    sections = [
        _header(plan),
        _cost_section(plan),
        _pictures_section(plan),
        _placement_section(plan),
        _communication_section(plan),
        _stage_section(plan),
        _unsupported_section(plan),
        _section("Plain-text summary", f"<pre>{_e(plan_summary(plan))}</pre>"),
    ]
    title = f"autopar plan dp={plan.dp} tp={plan.tp} pp={plan.pp}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- helpers


def _e(text) -> str:
    return html.escape(str(text))


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{body}\n</section>"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(v, i in numeric) for i, v in enumerate(row)) + "</tr>\n"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _cell(value, numeric: bool) -> str:
    raw = isinstance(value, _Html)
    text = value.text if raw else _e(value)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


class _Html:
    """Markup a table cell holds as is (bars, placement tags)."""

    def __init__(self, text: str):
        self.text = text


def _bar(fraction: float, css_class: str) -> _Html:
    width = max(0.0, min(fraction, 1.0)) * 100
    return _Html(
        f'<div class="bar"><div class="{css_class}" style="width:{width:.1f}%"></div></div>'
    )


def _tag(placement) -> _Html:
    text = "/".join(placement) if isinstance(placement, list) else placement
    return _Html(f'<span class="tag {graph.placement_kind(placement)}">{_e(text)}</span>')


def layer_ranges(layers) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    layers, parts = sorted(layers), []
    for layer in layers:
        if parts and layer == parts[-1][1] + 1:
            parts[-1][1] = layer
        else:
            parts.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


# ----------------------------------------------------------------------------- sections


def _header(plan) -> str:
    degrees = "".join(
        f"<span><b>{name}</b> = {value}</span>"
        for name, value in (("dp", plan.dp), ("tp", plan.tp), ("pp", plan.pp))
    )
    status = f"solver: {search_line(plan.solver)}" if plan.solver else "solver: no record"
    return (
        f"<h1>autopar plan</h1>\n<div class='degrees'>{degrees}</div>\n"
        f"<p>{plan.num_microbatches} microbatch(es) of {plan.microbatch_size}, schedule "
        f"<code>{_e(plan.schedule)}</code><br>{_e(model_line(plan))}"
        f"<br>mesh: {_e(plan.mesh.get('description', ''))}"
        f"<br><span class='muted'>{_e(status)}; model fingerprint "
        f"<code>{_e(plan.model_fingerprint[:12])}</code></span></p>"
    )


def _cost_section(plan) -> str:
    cost = plan.cost
    step = cost.step_time_s or 1.0
    parts = [("compute", cost.compute_s, "compute"), ("communication", cost.comm_s, "comm")]
    parts += [(f"&nbsp;&nbsp;{what}", s, "comm") for what, s in communication_parts(cost) if s]
    parts.append(("pipeline bubble", cost.bubble_s, "bubble"))
    rows = [
        [_Html(part), human_seconds(seconds), f"{100 * seconds / step:.1f}%",
         _bar(seconds / step, css)]
        for part, seconds, css in parts
    ]  # fmt: skip
    capacity = plan.mesh.get("device", {}).get("memory_bytes")
    share = cost.memory_per_device_bytes / capacity if capacity else 0.0
    of = f"{100 * share:.1f}% of {human_bytes(capacity)}" if capacity else ""
    rows.append(
        ["memory per device", human_bytes(cost.memory_per_device_bytes), of, _bar(share, "memory")]
    )
    body = (
        f"<p>predicted step <b>{human_seconds(cost.step_time_s)}</b>, {_e(throughput(plan))}</p>\n"
        + _table(["", "predicted", "share", ""], rows, numeric={1, 2})
    )
    return _section("Predicted cost", body)


def _pictures_section(plan) -> str:
    if not graph.matplotlib_available():
        return _section("Pictures", f"<p class='muted'>{_e(graph.MISSING)}.</p>")
    parts = [_img(graph.layer_time_figure(plan), "layer-time", "time per block")]
    if plan.layer_of:
        parts.append(_img(graph.block_dataflow_figure(plan), "block-graph", "block dataflow"))
    if plan.pp > 1:
        try:
            parts.append(_img(timeline.timeline_figure(plan), "timeline", "pipeline timeline"))
        except AutoparError as error:
            parts.append(f"<p class='muted'>No pipeline timeline: {_e(error)}</p>")
    return _section("Pictures", "\n".join(parts))


def _img(figure, name: str, alt: str) -> str:
    """A picture as an inline PNG, with an id a browser test can find it by."""
    data = base64.b64encode(graph.figure_png(figure)).decode()
    return f'<p><img id="{name}" alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _block_groups(plan) -> list[tuple[list[int], list[str]]]:
    """Blocks whose parameters are placed alike, with the parameters of the first."""
    by_layer = defaultdict(list)
    for placeholder in plan.param_fqns:
        if placeholder in plan.strategies and placeholder in plan.layer_of:
            by_layer[plan.layer_of[placeholder]].append(placeholder)
    groups: dict[tuple, tuple[list[int], list[str]]] = {}
    for layer in sorted(by_layer):
        params = by_layer[layer]
        key = tuple(plan.strategies[p].output() for p in params)
        groups.setdefault(key, ([], params))[0].append(layer)
    return list(groups.values())


def _param_rows(plan, placeholders) -> list[list]:
    """Name, placement and role; a tied parameter shows the placement it shares."""
    roles = Roles(plan)
    return [
        [plan.param_fqns[p], _tag(roles.placement(p)), roles.role(p) + roles.tied_note(p)]
        for p in placeholders
    ]


def _placement_section(plan) -> str:
    parts = []
    for layers, params in _block_groups(plan):
        title = f"blocks {layer_ranges(layers)}" if len(layers) > 1 else f"block {layers[0]}"
        parts.append(f"<h3>{_e(title)}</h3>")
        parts.append(
            _table(["parameter (first block)", "placement", "role"], _param_rows(plan, params))
        )
    outside = [p for p in plan.param_fqns if p in plan.strategies and p not in plan.layer_of]
    if outside:
        parts.append("<h3>outside the blocks</h3>")
        parts.append(_table(["parameter", "placement", "role"], _param_rows(plan, outside)))
    legend = (
        "<p class='muted'>R replicated, S(d) sharded on tensor dim d over the tp ranks "
        "(g: in that many interleaved groups, e.g. fused q/k/v), P partial sums.</p>"
    )
    return _section("Parameter placements", legend + "\n".join(parts))


def collective_totals(plan, axis: str | None = None) -> dict[tuple[str, str], tuple]:
    """(kind, phase) -> (count, bytes, seconds) over the plan's collectives (those on
    `axis` when given)."""
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0])
    for c in plan.collectives:
        if axis in (None, c.axis):
            entry = totals[c.kind, c.phase]
            entry[0] += 1
            entry[1] += c.nbytes
            entry[2] += c.seconds
    return {key: tuple(value) for key, value in totals.items()}


def _communication_section(plan) -> str:
    totals = {axis: collective_totals(plan, axis) for axis in ("tp", "dp")}
    largest = max((t[2] for by in totals.values() for t in by.values()), default=0.0) or 1.0
    rows = [
        [axis, kind, phase, n, human_bytes(nbytes), human_seconds(s), _bar(s / largest, "comm")]
        for axis, by in totals.items()
        for (kind, phase), (n, nbytes, s) in sorted(by.items())
    ]
    headers = ["axis", "collective", "phase", "count", "bytes", "time", ""]
    note = (
        f"<p class='muted'>tp: {COLLECTIVES_SCOPE}, and the sums of parameter gradients "
        "once per step. dp: the gradient sync, once per step.</p>"
    )
    body = _table(headers, rows, numeric={3, 4, 5}) if rows else "<p>No collectives.</p>"
    return _section("Communication by axis, kind and phase", note + body)


def _stage_section(plan) -> str:
    longest = max((s.time_s for s in plan.stages), default=0.0) or 1.0
    capacity = plan.mesh.get("device", {}).get("memory_bytes") or 0
    rows = [
        [s.index, s.pp_rank, layer_ranges(s.layers) or "-", len(s.nodes),
         human_seconds(s.time_s), _bar(s.time_s / longest, "compute"),
         human_bytes(s.memory_bytes), _bar(s.memory_bytes / capacity if capacity else 0.0, "memory")]
        for s in plan.stages
    ]  # fmt: skip
    headers = ["stage", "pp rank", "blocks", "nodes", "time per microbatch", "", "memory", ""]
    note = (
        f"<p class='muted'>{plan.num_microbatches} microbatch(es) of {plan.microbatch_size}, "
        f"schedule {_e(plan.schedule)}; time is one microbatch's forward and backward.</p>"
    )
    return _section("Pipeline stages", note + _table(headers, rows, numeric={0, 1, 3, 4, 6}))


def _unsupported_section(plan) -> str:
    if not plan.unsupported_ops:
        body = "<p>Every op had a sharding rule.</p>"
    else:
        items = "".join(f"<li><code>{_e(op)}</code></li>" for op in plan.unsupported_ops)
        body = f"<p>These ops had no sharding rule and run replicated:</p><ul>{items}</ul>"
    return _section("Ops with no sharding rule", body)
