"""What a plan file must hold, checked when it is read.

A plan file is JSON a person may edit. Read back, it is checked in two passes, so that
a wrong value fails here, naming its field and what it must be, and not later inside
codegen with a message about some node's input:

1. `check_fields`: every field is present and of its type (dp a positive whole number,
   schedule a string, ...), and no field is unknown.
2. `check_plan`: the values agree: dp * tp * pp is the world size of the plan's mesh;
   the schedule is known; the stages are a multiple of pp (one per pp rank unless
   interleaved), stage k on pp rank k % pp, each with a known recomputation mode that
   the plan's `recompute` sums up; each node's placements name the axes the
   plan splits, fit its tensor's rank, and a grouped shard `S(d,gk)` divides dim d by
   k x tp (an ungrouped shard pads, which is allowed).
"""

from __future__ import annotations

import math
from numbers import Real

from autopar.cost.memory import RECOMPUTE_MODES
from autopar.errors import PlanError
from autopar.placement import DP, TP, Shard

WHOLE = "a whole number"
POSITIVE = "a positive whole number"


def _is_whole(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _object_of(test):
    return lambda v: isinstance(v, dict) and all(map(test, v.values()))


def _kind(*types):
    return lambda v: isinstance(v, types)


def _mesh(v) -> bool:
    return isinstance(v, dict) and all(
        _is_whole(v.get(k), 1) for k in ("nodes", "devices_per_node")
    )


COUNT = (lambda v: _is_whole(v, 1), POSITIVE)
TEXT = (_kind(str), "a string")
# field -> (test of its value, what it must be), for every field of a plan file
FIELDS = {
    "dp": COUNT, "tp": COUNT, "pp": COUNT, "num_microbatches": COUNT, "microbatch_size": COUNT,
    "schedule": (_kind(str), "a schedule name (a string)"),
    "strategies": (_kind(dict), "an object of node name -> node"),
    "stages": (lambda v: isinstance(v, list) and all(map(_kind(dict), v)), "a list of objects"),
    "cost": (_object_of(_is_number), "an object of finite numbers"),
    "collectives": (_kind(list), "a list of collectives"),
    "unsupported_ops": (_kind(list), "a list of op names"),
    "model_fingerprint": TEXT,
    "mesh": (_mesh, "an object with positive whole numbers nodes and devices_per_node"),
    "mesh_fingerprint": TEXT,
    "solver": (_kind(dict), "an object"),
    "layer_of": (_object_of(_is_whole), "an object of node name -> block index"),
    "param_fqns": (_object_of(_kind(str)), "an object of placeholder -> parameter name"),
    "tied_params": (_object_of(_kind(str)), "an object of placeholder -> placeholder"),
    "unit_times_s": (_object_of(_is_number), "an object of unit -> seconds"),
    "sequence_parallel": (_kind(bool), "true or false"),
    "recompute": (_kind(str), "a recomputation mode (a string)"),
    "zero": (lambda v: _is_whole(v) and v <= 3, "a ZeRO stage: 0, 1, 2 or 3"),
    "model": TEXT,
    "dtype": TEXT,
    "seq_len": (lambda v: v is None or _is_whole(v, 1), f"null or {POSITIVE}"),
    "global_batch_size": (_is_whole, WHOLE),
    "schema_version": (_is_whole, WHOLE),
}  # fmt: skip


def _wrong(field: str, value, must: str) -> PlanError:
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return PlanError(f"plan field {field} is {shown}; it must be {must}")


def check_fields(data: dict, required: set[str]) -> None:
    """Every field known, the `required` ones present, each of its type."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise PlanError(
            f"plan has unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}"
        )
    missing = sorted(required - set(data))
    if missing:
        raise PlanError(f"plan lacks field(s) {', '.join(missing)}; plan the model again")
    for name, value in data.items():
        test, must = FIELDS[name]
        if not test(value):
            raise _wrong(name, value, must)


# ----------------------------------------------------------------------------- values


def check_plan(plan, schedules) -> None:
    """The values of a well-typed plan agree with each other and with its mesh."""
    _check_degrees(plan)
    if plan.schedule not in schedules:
        raise _wrong("schedule", plan.schedule, f"one of {', '.join(schedules)}")
    _check_zero(plan)
    _check_batch(plan)
    _check_stages(plan)
    _check_recompute(plan)
    for name, node in plan.strategies.items():
        _check_node(plan, name, node)


def _check_degrees(plan) -> None:
    nodes, per_node = plan.mesh["nodes"], plan.mesh["devices_per_node"]
    world = nodes * per_node
    if plan.dp * plan.tp * plan.pp != world:
        raise PlanError(
            f"plan fields dp, tp, pp are {plan.dp}, {plan.tp}, {plan.pp} (product "
            f"{plan.dp * plan.tp * plan.pp}); they must multiply to the world size of the "
            f"plan's mesh, {world} ({nodes} node(s) x {per_node})"
        )


def _check_zero(plan) -> None:
    if plan.zero and plan.dp == 1:
        raise _wrong("zero", plan.zero, "0 at dp=1 (ZeRO shards states over dp replicas)")


def _check_batch(plan) -> None:
    if plan.schedule == "interleaved1f1b" and plan.num_microbatches % plan.pp:
        raise _wrong(
            "num_microbatches", plan.num_microbatches,
            f"a multiple of pp={plan.pp} under interleaved1f1b",
        )  # fmt: skip
    batch = plan.dp * plan.num_microbatches * plan.microbatch_size
    if plan.global_batch_size not in (0, batch):
        raise _wrong(
            "global_batch_size", plan.global_batch_size,
            f"dp * num_microbatches * microbatch_size = {batch}",
        )  # fmt: skip


def _check_stages(plan) -> None:
    count, pp = len(plan.stages), plan.pp
    if count == 0 or count % pp or (plan.schedule != "interleaved1f1b" and count != pp):
        must = "a multiple of" if plan.schedule == "interleaved1f1b" else "exactly"
        raise PlanError(
            f"plan field stages holds {count} stage(s); with pp={pp} and schedule "
            f"{plan.schedule} it must hold {must} {pp}"
        )
    for k, stage in enumerate(plan.stages):
        if stage.index != k:
            raise _wrong(f"stages[{k}].index", stage.index, f"{k} (stages in order)")
        if stage.pp_rank != k % pp:
            raise _wrong(
                f"stages[{k}].pp_rank", stage.pp_rank, f"{k % pp} (stage k on pp rank k % pp)"
            )


def _check_recompute(plan) -> None:
    for k, stage in enumerate(plan.stages):
        if stage.recompute not in RECOMPUTE_MODES:
            raise _wrong(
                f"stages[{k}].recompute", stage.recompute, f"one of {', '.join(RECOMPUTE_MODES)}"
            )
    modes = {stage.recompute for stage in plan.stages}
    overall = modes.pop() if len(modes) == 1 else "mixed"
    if plan.recompute != overall:
        raise _wrong("recompute", plan.recompute, f"{overall!r}, as its stages say")


# ----------------------------------------------------------------------------- placements


def _shapes(shape) -> list:
    """A node's output shapes: one per output (split has several), none for a non-tensor."""
    if shape is None:
        return []
    return shape if shape and isinstance(shape[0], list) else [shape]


def _check_shape(field: str, shape) -> None:
    def valid(s):
        return isinstance(s, list) and all(_is_whole(n) for n in s)

    if shape is not None and not (valid(shape) or (shape and all(map(valid, shape)))):
        raise _wrong(field, shape, "null or a list of whole numbers (a list of them per output)")


def _check_node(plan, name: str, node) -> None:
    field = f"strategies[{name!r}]"
    _check_shape(f"{field}.shape", node.shape)
    missing = [s for s in node.sources if s not in plan.strategies]
    if missing:
        raise PlanError(
            f"plan field {field}.sources names {missing[0]!r}, which is not a node of the plan"
        )
    degrees = {DP: plan.dp, TP: plan.tp}
    for axis, placement in node.placements.items():
        where = f"{field}.placements.{axis}"
        if degrees.get(axis, 1) == 1:
            raise PlanError(
                f"plan field {where} is there, but the plan does not split {axis!r}: only "
                f"{', '.join(a for a, d in degrees.items() if d > 1) or 'no axis'} may hold placements"
            )
        _check_placement(plan, where, node, placement, degrees[axis] if axis == TP else 1)


def _check_placement(plan, where: str, node, placement, tp: int) -> None:
    outputs = placement.output if isinstance(placement.output, tuple) else (placement.output,)
    shapes = _shapes(node.shape)
    if isinstance(placement.output, tuple) and len(outputs) != len(shapes):
        raise _wrong(
            f"{where}.output",
            [str(p) for p in outputs],
            f"one placement per output ({len(shapes)})",
        )
    for output, shape in zip(outputs, shapes or [None] * len(outputs), strict=True):
        _check_fits(f"{where}.output", output, shape, tp)
    if len(placement.inputs) != len(node.sources):
        raise _wrong(f"{where}.inputs", [str(p) for p in placement.inputs],
                     f"one placement per source ({len(node.sources)}: {node.sources})")  # fmt: skip
    for i, (seen, source) in enumerate(zip(placement.inputs, node.sources, strict=True)):
        first = next(iter(_shapes(plan.strategies[source].shape)), None)
        _check_fits(f"{where}.inputs[{i}] (seeing {source})", seen, first, tp)


def _check_fits(field: str, placement, shape, tp: int) -> None:
    """A shard names a dim the tensor has; a grouped shard divides it by groups x tp."""
    if not isinstance(placement, Shard):
        return
    if shape is None:
        raise _wrong(field, str(placement), "R or P: the value is not a tensor")
    rank = len(shape)
    if not -rank <= placement.dim < rank:
        raise _wrong(field, str(placement),
                     f"a shard of a dim the {rank}-d tensor {shape} has ({-rank}..{rank - 1})")  # fmt: skip
    size, parts = shape[placement.dim], placement.groups * tp
    if placement.groups > 1 and size % parts:
        raise _wrong(field, str(placement), f"a shard whose {placement.groups} groups x tp={tp} "
                     f"divide dim {placement.dim} of {shape} ({size} is not a multiple of {parts})")  # fmt: skip
