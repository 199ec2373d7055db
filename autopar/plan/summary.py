"""Plain-text views of a Plan: the summary a person reads before trusting it.

Repeated transformer blocks are shown once (block 0) with a note when the others
are identical, so a 96-layer model reads as one block, not 5,000 lines. A plan
without tensor parallelism (tp=1) has no tensor-parallel section at all.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from autopar.plan.roles import Roles

COLLECTIVES_SCOPE = "tensor-parallel collectives, one forward and backward of the traced batch"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_flops(per_second: float) -> str:
    """FLOP/s in the largest unit that keeps a digit before the point (a CPU mesh runs
    at GFLOP/s, where TFLOP/s would print 0.0)."""
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if per_second >= factor:
            return f"{per_second / factor:.1f} {unit}FLOP/s"
    return f"{per_second:.0f} FLOP/s"


def human_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _parallelism(plan) -> str:
    cost = plan.cost
    zero = f", ZeRO-{plan.zero} (states sharded over dp)" if plan.zero else ""
    parts = [
        f"data parallel over {plan.dp} replicas (gradient sync {human_seconds(cost.dp_sync_s)}"
        f"{zero})"
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
    stages = len(plan.stages)
    on = f" on {plan.pp} pipeline ranks (interleaved)" if stages > plan.pp else ""
    parts.append(f"{stages} pipeline stage{'s' if stages > 1 else ''}{on}")
    parts.append(f"activation recomputation {_recompute(plan)}")
    return "parallelism: " + "; ".join(parts)


def _recompute(plan) -> str:
    """The plan's recomputation, or each stage's where they differ ("full on stages 0-1,
    none on stages 2-3")."""
    if plan.recompute != "mixed":
        return plan.recompute
    runs = []  # [mode, first stage, last stage]
    for k, stage in enumerate(plan.stages):
        if runs and runs[-1][0] == stage.recompute:
            runs[-1][2] = k
        else:
            runs.append([stage.recompute, k, k])
    return ", ".join(
        f"{mode} on stage {a}" if a == b else f"{mode} on stages {a}-{b}" for mode, a, b in runs
    )


def communication_parts(cost) -> list[tuple[str, float]]:
    """Where the communication time goes: tp collectives (with the tp gradient sums),
    the dp gradient sync, the pipeline's sends and receives, and the once-a-step sums of
    tied gradients over pp and of the loss."""
    return [
        ("tensor parallel", cost.comm_s - cost.dp_sync_s - cost.p2p_s - cost.step_sync_s),
        ("data parallel", cost.dp_sync_s),
        ("pipeline send/recv", cost.p2p_s),
        ("tied gradients and loss", cost.step_sync_s),
    ]


def _communication(cost) -> str:
    """The communication total, and its parts where there is more than one."""
    shown = [f"{what} {human_seconds(s)}" for what, s in communication_parts(cost) if s > 0]
    detail = f" ({', '.join(shown)})" if len(shown) > 1 else ""
    return f"communication {human_seconds(cost.comm_s)}{detail}"


def throughput(plan) -> str:
    """Model FLOP/s per device, and MFU: that rate over the device's peak."""
    rate = human_flops(plan.cost.tflops_per_device * 1e12) + " per device"
    return rate if plan.mfu is None else f"{rate} (MFU {100 * plan.mfu:.1f}%)"


def search_line(solver: dict) -> str:
    """How the search went: the same layout count the progress line shows."""
    searched = solver.get("layouts_searched", solver.get("layouts_tried", 1))
    fit = solver.get("layouts_tried")
    fitting = f", {fit} pipeline configuration(s) fit" if fit is not None else ""
    return (
        f"{solver.get('status')} in {solver.get('solve_time_s', 0):.2f} s "
        f"({solver.get('num_variables')} variables, {solver.get('num_constraints')} "
        f"constraints); {searched} (dp, tp, pp) layouts searched{fitting}"
    )


def model_line(plan) -> str:
    parts = [plan.model or "an unnamed model", plan.dtype or "dtype not recorded"]
    if plan.seq_len:
        parts.append(f"sequence {plan.seq_len}")
    if plan.global_batch_size:
        parts.append(f"global batch {plan.global_batch_size}")
    return "model: " + ", ".join(parts)


def _header(plan) -> list[str]:
    cost, mesh = plan.cost, plan.mesh.get("description", "")
    lines = [
        f"autopar plan: dp={plan.dp} tp={plan.tp} pp={plan.pp}, {plan.num_microbatches} "
        f"microbatch(es) of {plan.microbatch_size}, schedule {plan.schedule}",
        model_line(plan),
        f"mesh: {mesh}",
        f"predicted step {human_seconds(cost.step_time_s)}: compute "
        f"{human_seconds(cost.compute_s)}, {_communication(cost)}, bubble "
        f"{human_seconds(cost.bubble_s)}; {human_bytes(cost.memory_per_device_bytes)} per "
        f"device; {throughput(plan)}",
        _parallelism(plan),
    ]
    if plan.solver:
        lines.append(f"solver: {search_line(plan.solver)}")
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


def _param_line(plan, roles: Roles, placeholder: str) -> str:
    name = plan.param_fqns[placeholder]
    placement, role = roles.placement(placeholder), roles.role(placeholder)
    return f"  {name:44s} {placement:8s} {role}{roles.tied_note(placeholder)}"


def _param_lines(plan, placeholders) -> list[str]:
    roles = Roles(plan)
    return [_param_line(plan, roles, p) for p in placeholders]


def plan_summary(plan) -> str:
    blocks = _block_lines(plan)
    lines = _header(plan) + ([""] + blocks if blocks else [])
    if plan.unsupported_ops:
        lines += [
            "",
            f"ops with no sharding rule, run replicated: {', '.join(plan.unsupported_ops)}",
        ]
    return "\n".join(lines)
