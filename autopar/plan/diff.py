"""What differs between two plans, and where each one's predicted time goes.

`plan_diff(a, b)` is a plain dict (what `autopar diff --json` prints): the settings
that differ (degrees, schedule, sequence parallelism, recomputation, ...) and those
that agree, the nodes whose placement differs per mesh axis, grouped by block (runs of
blocks that differ alike are one group, so 96 identical blocks read as one), and the
predicted step's parts side by side. `format_diff` is the text `autopar diff` prints.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict

from autopar.placement import MESH_AXES
from autopar.plan.summary import communication_parts, human_bytes, human_flops, human_seconds

SETTINGS = {
    "model": lambda p: p.model or "-",
    "model graph": lambda p: p.model_fingerprint[:12],
    "dtype": lambda p: p.dtype or "-",
    "sequence length": lambda p: p.seq_len,
    "global batch": lambda p: p.global_batch_size,
    "mesh": lambda p: p.mesh.get("description", p.mesh_fingerprint[:12]),
    "dp": lambda p: p.dp,
    "tp": lambda p: p.tp,
    "pp": lambda p: p.pp,
    "microbatches": lambda p: p.num_microbatches,
    "microbatch size": lambda p: p.microbatch_size,
    "schedule": lambda p: p.schedule,
    "pipeline stages": lambda p: len(p.stages),
    "sequence parallelism": lambda p: p.sequence_parallel,
    "ZeRO stage": lambda p: p.zero,
    "recomputation": lambda p: p.recompute,
    "recomputation per stage": lambda p: " ".join(s.recompute for s in p.stages),
}
SHOWN_NODES = 8  # per group in the text; --json lists them all


def _time_parts(plan) -> list[tuple[str, float, str, str | None]]:
    """(what, value, unit, the total it is part of) of the predicted step, in the
    summary's order."""
    cost = plan.cost
    parts = [("step", cost.step_time_s, "s", None), ("compute", cost.compute_s, "s", "step"),
             ("optimizer step", cost.optimizer_s, "s", "compute"),
             ("communication", cost.comm_s, "s", "step")]  # fmt: skip
    parts += [(what, s, "s", "communication") for what, s in communication_parts(cost)]
    parts += [("bubble", cost.bubble_s, "s", "step"),
              ("memory per device", cost.memory_per_device_bytes, "bytes", None),
              ("throughput per device", cost.tflops_per_device * 1e12, "flops", None),
              ("MFU", plan.mfu if plan.mfu is not None else 0.0, "fraction", None)]  # fmt: skip
    return parts


def plan_diff(a, b) -> dict:
    settings = {name: (get(a), get(b)) for name, get in SETTINGS.items()}
    rows = zip(_time_parts(a), _time_parts(b), strict=True)
    return {
        "differ": {name: list(v) for name, v in settings.items() if v[0] != v[1]},
        "same": {name: v[0] for name, v in settings.items() if v[0] == v[1]},
        "placements": {
            axis: _axis_groups(a, b, axis)
            for axis in MESH_AXES
            if axis in _split_axes(a) and axis in _split_axes(b)
        },  # fmt: skip
        "axes_not_compared": [
            axis for axis in MESH_AXES if (axis in _split_axes(a)) != (axis in _split_axes(b))
        ],  # fmt: skip
        "time": [
            {"part": what, "a": va, "b": vb, "unit": unit, "part_of": total}
            for (what, va, unit, total), (_, vb, _, _) in rows
        ],
    }


# ----------------------------------------------------------------------------- placements


def _split_axes(plan) -> set[str]:
    return {axis for axis, size in (("dp", plan.dp), ("tp", plan.tp)) if size > 1}


def _text(node, axis: str) -> tuple[str, str]:
    """(output, inputs) as printed."""
    text = node.placements[axis].to_text()
    output = text["output"]
    return ("/".join(output) if isinstance(output, list) else output), " ".join(text["inputs"])


def _shown(mine: tuple[str, str], theirs: tuple[str, str]) -> str:
    return mine[0] if mine[0] != theirs[0] else f"{mine[0]} (sees {mine[1] or 'nothing'})"


def _relative(plan, name: str, layer) -> str:
    """A node's name with its block's index taken out, so that blocks compare alike."""
    if name in plan.param_fqns:
        fqn = plan.param_fqns[name]
        return fqn if layer is None else fqn.split(f".{layer}.", 1)[-1]
    return name if layer is None else re.sub(rf"(?<=[A-Za-z_]){layer}(?=_|$)", "*", name, count=1)


def _block_changes(a, b, axis: str) -> dict:
    """block (None outside them) -> [(relative name, is parameter, a's, b's)]."""
    changes = defaultdict(list)
    for name, node in a.strategies.items():
        other = b.strategies.get(name)
        if other is None or axis not in node.placements or axis not in other.placements:
            continue
        mine, theirs = _text(node, axis), _text(other, axis)
        if mine == theirs:
            continue
        layer = a.layer_of.get(name)
        entry = (_relative(a, name, layer), name in a.param_fqns, _shown(mine, theirs),
                 _shown(theirs, mine))  # fmt: skip
        changes[layer].append(entry)
    return changes


def _axis_groups(a, b, axis: str) -> list[dict]:
    """Groups of blocks whose placements differ alike on `axis` (outside the blocks last)."""
    changes = _block_changes(a, b, axis)
    groups: list[dict] = []
    for layer in sorted(k for k in changes if k is not None):
        nodes = [{"node": n, "parameter": p, "a": x, "b": y} for n, p, x, y in changes[layer]]
        last = groups[-1] if groups else None
        if last and last["nodes"] == nodes and last["blocks"][-1] == layer - 1:
            last["blocks"].append(layer)
        else:
            groups.append({"blocks": [layer], "nodes": nodes})
    if None in changes:
        nodes = [{"node": n, "parameter": p, "a": x, "b": y} for n, p, x, y in changes[None]]
        groups.append({"blocks": None, "nodes": nodes})
    return groups


# ----------------------------------------------------------------------------- text


def _value(value, unit: str) -> str:
    if unit == "s":
        return human_seconds(value)
    if unit == "bytes":
        return human_bytes(value)
    if unit == "flops":
        return human_flops(value)
    return f"{100 * value:.1f}%"


def _change(a: float, b: float) -> str:
    """b against a: a percentage when within a factor of two, else the factor."""
    if a == b:
        return "same"
    if not a or not b:
        return "new" if b else "none"
    return f"{100 * (b - a) / a:+.1f}%" if 0.5 <= b / a <= 2 else f"x{b / a:.3g}"


def _group_title(blocks) -> str:
    if blocks is None:
        return "outside the blocks"
    return f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"


def _placement_lines(groups: list[dict], axis: str) -> list[str]:
    if not groups:
        return [f"placements on {axis}: the same"]
    lines = [f"placements on {axis} that differ:"]
    width = max(len(n["node"]) for g in groups for n in g["nodes"][:SHOWN_NODES])
    for group in groups:
        nodes = sorted(group["nodes"], key=lambda n: not n["parameter"])
        lines.append(f"  {_group_title(group['blocks'])}:")
        lines += [f"    {n['node']:{width}s}  {n['a']:12s} {n['b']}" for n in nodes[:SHOWN_NODES]]
        if len(nodes) > SHOWN_NODES:
            lines.append(f"    and {len(nodes) - SHOWN_NODES} more node(s) (--json lists all)")
    return lines


def format_diff(diff: dict, names: tuple[str, str] = ("a", "b")) -> str:
    width = 40
    head = f"{'':{width}s} {names[0]:22s} {names[1]}"
    lines = [head]
    for k, (a, b) in diff["differ"].items():
        short = len(str(a)) <= 22 and len(str(b)) <= 22
        lines += (
            [f"{k:{width}s} {a!s:22s} {b}"]
            if short
            else [k, f"  {names[0]}: {a}", f"  {names[1]}: {b}"]
        )
    if not diff["differ"]:
        lines.append("the settings are the same")
    same = ", ".join(f"{k} {v}" for k, v in diff["same"].items() if k != "model graph")
    lines += textwrap.wrap(f"same: {same}", 100, subsequent_indent="  ") + [""]
    for axis, groups in diff["placements"].items():
        lines += _placement_lines(groups, axis) + [""]
    for axis in diff["axes_not_compared"]:
        lines += [f"placements on {axis}: not compared (only one plan splits {axis})", ""]
    lines.append(f"{'predicted step':{width}s} {names[0]:22s} {names[1]:22s} change")
    depth = {None: 0, "step": 1, "compute": 2, "communication": 2}
    for row in diff["time"]:
        name = "  " * depth[row["part_of"]] + row["part"]
        a, b = _value(row["a"], row["unit"]), _value(row["b"], row["unit"])
        lines.append(f"{name:{width}s} {a:22s} {b:22s} {_change(row['a'], row['b'])}")
    return "\n".join(lines)
