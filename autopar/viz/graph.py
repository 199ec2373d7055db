"""Pictures of a Plan, for where a table of 500 rows would be read by no one.

- `layer_time_figure`: predicted communication per transformer block (forward and
  backward), with compute stacked under it when the caller knows it.
- `block_dataflow_figure`: one block's operators in graph order, coloured by the
  placement of their output (R, S, P), with each parameter's placement beside the
  operator that reads it and every collective marked after the operator whose
  output it moves (a backward one runs on that output's gradient).

matplotlib is optional: figures are drawn on a bare `Figure` with the Agg canvas
(no pyplot, no global backend switch), and `matplotlib_available()` lets callers
skip pictures with a message instead of failing.
"""

from __future__ import annotations

import io
from collections import defaultdict

from autopar.errors import AutoparError

PLACEMENT_COLORS = {"R": "#c9d6e3", "S": "#8fd19e", "P": "#f4b183"}
PHASE_COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "compute": "#a0a0a0"}
# Operators that only rename, reshape or reinterpret memory: left out of the diagram.
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "expand", "unsqueeze",
    "squeeze", "contiguous", "clone", "alias", "detach", "to", "_to_copy", "getitem",
    "dropout", "slice", "select", "lift_fresh_copy",
}  # fmt: skip
# Operators the diagram always draws as their own box.
LANDMARK_OPS = {
    "mm", "addmm", "bmm", "matmul", "linear", "scaled_dot_product_attention", "layer_norm",
    "embedding", "rms_norm",
}  # fmt: skip
MAX_LABELS = 32  # tick labels on a bar chart before they are thinned
MISSING = "matplotlib is not installed; `pip install matplotlib` to draw plan pictures"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float, height: float):
    if not matplotlib_available():
        raise AutoparError(MISSING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure) -> bytes:
    """PNG bytes of a figure from this module."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def short_op(op: str) -> str:
    """'aten.mm.default' -> 'mm'; '<built-in function getitem>' -> 'getitem'."""
    if op.startswith("<built-in function "):
        return op.removeprefix("<built-in function ").rstrip(">")
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[-1]


def placement_kind(placement: str) -> str:
    """'S(1,g3)' -> 'S'."""
    return placement[:1] if placement[:1] in PLACEMENT_COLORS else "R"


# ----------------------------------------------------------------------------- per layer


def layer_label(layer: int | None) -> str:
    return "outside" if layer is None else str(layer)


def communication_by_layer(plan, axis: str = "tp") -> dict[int | None, dict[str, float]]:
    """Seconds of the collectives on `axis` per block and phase (see `Plan.collectives`
    for their scope); None holds what no block owns."""
    table: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for layer in set(plan.layer_of.values()):
        table[layer]["forward"] += 0.0  # blocks without collectives still get a bar
    for c in plan.collectives:
        if c.axis == axis:
            table[c.layer][c.phase] += c.seconds
    return table


def bar_groups(layers: list, values) -> list[tuple[list, tuple]]:
    """Runs of consecutive blocks with identical bars, as (blocks, their values): 96
    identical blocks make one bar, not 96 unreadable ones. `values(layer)` gives a
    block's bar; the blocks' outside (None) is always its own."""
    groups: list[tuple[list, tuple]] = []
    for layer in layers:
        bar = values(layer)
        last = groups[-1] if groups else None
        if last and layer is not None and last[0][-1] is not None and last[1] == bar:
            last[0].append(layer)
        else:
            groups.append(([layer], bar))
    return groups


def _group_label(blocks: list) -> str:
    if blocks[0] is None:
        return "outside"
    return str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}\n(each)"


def layer_time_figure(plan, compute_by_layer: dict[int | None, float] | None = None):
    """Stacked bars per block (runs of identical blocks share one): compute (when
    given) and communication by phase."""
    comm = communication_by_layer(plan)
    layers = sorted(k for k in comm if k is not None) + ([None] if None in comm else [])
    series = {"compute": compute_by_layer} if compute_by_layer else {}
    series |= {phase: {k: comm[k][phase] for k in comm} for phase in ("forward", "backward")}
    groups = bar_groups(  # equal to 9 digits: sums of the same collectives in another order
        layers, lambda k: tuple(float(f"{v.get(k, 0.0):.9g}") for v in series.values())
    )
    figure = _new_figure(max(6.0, 0.3 * len(groups) + 2), 3.2)
    axes = figure.add_subplot()
    x, bottom = list(range(len(groups))), [0.0] * len(groups)
    for i, name in enumerate(series):
        heights = [bar[i] * 1e3 for _, bar in groups]
        label = name if name == "compute" else f"{name} communication"
        axes.bar(x, heights, bottom=bottom, color=PHASE_COLORS[name], label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    step = max(1, -(-len(groups) // MAX_LABELS))  # ceil
    axes.set_xticks(x[::step], [_group_label(g) for g, _ in groups][::step], fontsize=7)
    axes.set_xlabel("transformer block" + (f" (1 in {step} labelled)" if step > 1 else ""))
    axes.set_ylabel("ms")
    what = "time" if compute_by_layer else "tensor-parallel communication"
    axes.set_title(f"Predicted {what} per block\n(one pass of the example batch, tp={plan.tp})",
                   fontsize=9)  # fmt: skip
    axes.legend(fontsize=8)
    return figure


# ----------------------------------------------------------------------------- one block


def _box_of_nodes(plan, layer: int) -> tuple[list[dict], dict[str, int]]:
    """Boxes for one block's operators; runs of small same-placement ops share a box."""
    boxes: list[dict] = []
    box_of: dict[str, int] = {}
    for name, node in plan.strategies.items():
        if plan.layer_of.get(name) != layer or name in plan.param_fqns:
            continue
        if node.op in ("placeholder", "output"):
            continue
        op, kind = short_op(node.op), placement_kind(node.output())
        if op in LAYOUT_OPS:
            source = next((box_of[s] for s in node.sources if s in box_of), None)
            if source is not None:
                box_of[name] = source
            continue
        last = boxes[-1] if boxes else None
        merge = last and op not in LANDMARK_OPS and not last["landmark"] and last["kind"] == kind
        if merge:
            last["ops"].append(op)
        else:
            boxes.append({"ops": [op], "kind": kind, "landmark": op in LANDMARK_OPS,
                          "placement": node.output(), "params": [], "collectives": []})  # fmt: skip
        box_of[name] = len(boxes) - 1
        for source in node.sources:
            if source in plan.param_fqns:
                boxes[-1]["params"].append(source)
    return boxes, box_of


def _box_label(box: dict) -> str:
    ops = list(dict.fromkeys(box["ops"]))
    text = ", ".join(ops[:4]) + (", ..." if len(ops) > 4 else "")
    count = f" ({len(box['ops'])} ops)" if len(box["ops"]) > 1 else ""
    return f"{text}{count}  [{box['placement']}]"


def _param_label(plan, placeholder: str) -> str:
    fqn = plan.param_fqns[placeholder]
    short = ".".join(fqn.split(".")[-2:])
    return f"{short} {plan.strategies[placeholder].output()}"


def block_dataflow_figure(plan, layer: int | None = None):
    """One block's operators top to bottom, coloured by output placement."""
    blocks = sorted(set(plan.layer_of.values()))
    if not blocks:
        raise AutoparError("this plan has no transformer blocks to draw")
    layer = blocks[0] if layer is None else layer
    if layer not in blocks:
        raise AutoparError(
            f"block {layer} is not in this plan; blocks are {blocks[0]}-{blocks[-1]}"
        )
    boxes, box_of = _box_of_nodes(plan, layer)
    for c in plan.collectives:
        if c.layer == layer and c.producer in box_of:
            prefix = "" if c.phase == "forward" else "backward "
            boxes[box_of[c.producer]]["collectives"].append(prefix + c.kind.replace("_", "-"))
    figure = _new_figure(8.5, 0.42 * len(boxes) + 1.2)
    _draw_boxes(figure.add_subplot(), plan, boxes)
    figure.suptitle(f"Block {layer} dataflow at tp={plan.tp} (colour = output placement)")
    return figure


def _draw_boxes(axes, plan, boxes: list[dict]) -> None:
    from matplotlib.patches import Patch

    n = len(boxes)
    for i, box in enumerate(boxes):
        y = n - 1 - i
        axes.text(0.5, y, _box_label(box), ha="center", va="center", fontsize=8,
                  bbox={"boxstyle": "round", "fc": PLACEMENT_COLORS[box["kind"]], "ec": "#555"})  # fmt: skip
        if i + 1 < n:
            axes.annotate("", (0.5, y - 0.72), (0.5, y - 0.28),
                          arrowprops={"arrowstyle": "->", "color": "#777"})  # fmt: skip
        params = ", ".join(_param_label(plan, p) for p in box["params"])
        if params:
            axes.text(0.02, y, params, ha="left", va="center", fontsize=7, color="#333")
        if box["collectives"]:
            text = "then " + ", ".join(dict.fromkeys(box["collectives"]))
            axes.text(0.98, y, text, ha="right", va="center", fontsize=8, color="#b00020")
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.8, n - 0.2)
    axes.axis("off")
    legend = [Patch(fc=PLACEMENT_COLORS[k], ec="#555", label=label)
              for k, label in (("R", "replicated"), ("S", "sharded"), ("P", "partial sum"))]  # fmt: skip
    axes.legend(handles=legend, loc="lower left", fontsize=7, ncol=3, bbox_to_anchor=(0, -0.06))
