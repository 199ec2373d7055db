"""Plain-text views of a Plan: the summary a person reads before trusting it.

Repeated transformer blocks are shown once (block 0) with a note when the others
are identical, so a 96-layer model reads as one block, not 5,000 lines. A plan
without tensor parallelism (tp=1) has no tensor-parallel section at all.
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


def _use_role(plan, node, placeholder: str) -> str:
    """What one consumer does with a sharded parameter, in Megatron's words."""
    if node.op in MATMULS:
        return "column-parallel" if node.output().startswith("S") else "row-parallel"
    if node.op == "aten.embedding.default":
        return "embedding, hidden dim sharded"
    if node.op == "aten.add.Tensor":
        matmul = next((s for s in node.sources if s != placeholder), None)
        produced = plan.strategies[matmul].output() if matmul in plan.strategies else ""
        return "bias of a column-parallel matmul" if produced.startswith("S") else (
            "bias, added to a reduce-scattered output"
        )  # fmt: skip
    return "sharded"


def parameter_role(plan, placeholder: str) -> str:
    """Megatron's names for what a parameter's placement does (every use, for tied ones)."""
    if plan.strategies[placeholder].output() == "R":
        return "replicated"
    roles = [
        _use_role(plan, node, placeholder)
        for node in plan.strategies.values()
        if placeholder in node.sources
    ]
    return " + ".join(dict.fromkeys(roles)) or "sharded"


def _parallelism(plan) -> str:
    cost = plan.cost
    parts = [
        f"data parallel over {plan.dp} replicas (gradient all-reduce "
        f"{human_seconds(cost.dp_sync_s)})"
        if plan.dp > 1
        else "no data parallelism"
    ]
    if plan.tp == 1:
        parts.append("no tensor parallelism (tp=1)")
    elif plan.tp_splits_nothing:
        parts.append(
            f"tp={plan.tp} splits nothing: no op of this model divides {plan.tp} ways, so "
            "every tp rank computes everything (pin a smaller tp, or tp=1)"
        )
    else:
        sp = "on" if plan.sequence_parallel else "off"
        parts.append(f"tensor parallel over {plan.tp} ranks, sequence parallelism {sp}")
    parts.append(f"{plan.pp} pipeline stage{'s' if plan.pp > 1 else ''}")
    return "parallelism: " + "; ".join(parts)


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
        _parallelism(plan),
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
    if plan.tp == 1:
        return []
    by_layer = defaultdict(list)
    for c in plan.collectives:
        if c.axis == "tp":
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
    placement = plan.strategies[placeholder].output()
    return f"  {name:44s} {placement:8s} {parameter_role(plan, placeholder)}"


def _param_lines(plan, placeholders) -> list[str]:
    return [_param_line(plan, p) for p in placeholders]


def plan_summary(plan) -> str:
    blocks = _block_lines(plan)
    lines = _header(plan) + ([""] + blocks if blocks else [])
    if plan.unsupported_ops:
        lines += [
            "",
            f"ops with no sharding rule, run replicated: {', '.join(plan.unsupported_ops)}",
        ]
    return "\n".join(lines)
