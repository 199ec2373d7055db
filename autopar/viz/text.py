"""Plain-text views of a Plan: the summary a person reads before trusting it.

Repeated transformer blocks are shown once (block 0) with a note when the others
are identical, so a 96-layer model reads as one block, not 5,000 lines.
"""

from __future__ import annotations

from collections import Counter, defaultdict

COLLECTIVES_SCOPE = "tensor-parallel collectives, one forward and backward of the traced batch"
MATMULS = ("aten.mm.default", "aten.linear.default", "aten.bmm.default", "aten.matmul.default")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _use_role(plan, entry: dict, placeholder: str) -> str:
    """What one consumer does with a sharded parameter, in Megatron's words."""
    if entry["op"] in MATMULS:
        return "column-parallel" if entry["output"].startswith("S") else "row-parallel"
    if entry["op"] == "aten.embedding.default":
        return "embedding, hidden dim sharded"
    if entry["op"] == "aten.add.Tensor":
        matmul = next((s for s in entry["sources"] if s != placeholder), None)
        produced = plan.strategies.get(matmul, {}).get("output", "")
        return "bias of a column-parallel matmul" if produced.startswith("S") else (
            "bias, added to a reduce-scattered output"
        )  # fmt: skip
    return "sharded"


def parameter_role(plan, placeholder: str) -> str:
    """Megatron's names for what a parameter's placement does (every use, for tied ones)."""
    if plan.strategies[placeholder]["output"] == "R":
        return "replicated"
    roles = [
        _use_role(plan, entry, placeholder)
        for entry in plan.strategies.values()
        if placeholder in entry["sources"]
    ]
    return " + ".join(dict.fromkeys(roles)) or "sharded"


def _header(plan) -> list[str]:
    cost, mesh = plan.cost, plan.mesh.get("description", "")
    solver = plan.solver
    lines = [
        f"autopar plan: dp={plan.dp} tp={plan.tp} pp={plan.pp}, {plan.num_microbatches} "
        f"microbatch(es) of {plan.microbatch_size}, schedule {plan.schedule}",
        f"mesh: {mesh}",
        f"predicted step {human_seconds(cost.step_time_s)}: compute "
        f"{human_seconds(cost.compute_s)}, communication {human_seconds(cost.comm_s)}, bubble "
        f"{human_seconds(cost.bubble_s)}; {human_bytes(cost.memory_per_device_bytes)} per "
        f"device; {cost.tflops_per_device:.1f} TFLOP/s per device",
    ]
    if solver:
        lines.append(
            f"solver: {solver.get('status')} in {solver.get('solve_time_s', 0):.2f} s "
            f"({solver.get('num_variables')} variables, {solver.get('num_constraints')} "
            f"constraints; {solver.get('layouts_tried', 1)} layouts searched)"
        )
    return lines


def _collective_lines(collectives, indent="    ") -> list[str]:
    counts = Counter((c.phase, c.kind, c.nbytes) for c in collectives)
    seconds = defaultdict(float)
    for c in collectives:
        seconds[c.phase, c.kind, c.nbytes] += c.seconds
    return [
        f"{indent}{phase:8s} {kind:14s} x{n} of {human_bytes(nbytes)} "
        f"({human_seconds(seconds[phase, kind, nbytes])})"
        for (phase, kind, nbytes), n in sorted(counts.items())
    ] or [f"{indent}none"]


def _block_lines(plan) -> list[str]:
    by_layer = defaultdict(list)
    for c in plan.collectives:
        by_layer[c.layer].append(c)
    params = [p for p in plan.param_fqns if p in plan.strategies]
    layers = sorted({plan.layer_of[p] for p in params if p in plan.layer_of})
    lines = []
    if layers:
        shape = lambda layer: sorted((c.phase, c.kind, c.nbytes) for c in by_layer[layer])  # noqa: E731
        same = all(shape(layer) == shape(layers[0]) for layer in layers)
        others = f"{layers[1]}-{layers[-1]}" if len(layers) > 2 else f"{layers[-1]}"
        note = (
            f" (block{'s' * (len(layers) > 2)} {others} identical)"
            if same and len(layers) > 1
            else ""
        )
        lines.append(f"block {layers[0]}{note}:")
        lines += _param_lines(plan, [p for p in params if plan.layer_of.get(p) == layers[0]])
        lines.append(f"  {COLLECTIVES_SCOPE}:")
        lines += _collective_lines(by_layer[layers[0]])
    lines.append("outside the blocks:")
    lines += _param_lines(plan, [p for p in params if p not in plan.layer_of])
    lines.append(f"  {COLLECTIVES_SCOPE}:")
    lines += _collective_lines(by_layer[None])
    return lines


def _param_line(plan, placeholder: str) -> str:
    name = plan.param_fqns[placeholder]
    twin = plan.tied_params.get(placeholder)
    if twin is not None:
        return f"  {name:44s} {'':8s} tied to {plan.param_fqns[twin]}"
    return f"  {name:44s} {plan.strategies[placeholder]['output']:8s} {parameter_role(plan, placeholder)}"


def _param_lines(plan, placeholders) -> list[str]:
    return [_param_line(plan, p) for p in placeholders]


def plan_summary(plan) -> str:
    lines = _header(plan) + [""] + _block_lines(plan)
    if plan.unsupported_ops:
        lines += [
            "",
            f"ops with no sharding rule, run replicated: {', '.join(plan.unsupported_ops)}",
        ]
    return "\n".join(lines)
