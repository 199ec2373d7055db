"""The two calls users make: `plan()` finds a Plan, `parallelize()` runs one."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.utils import _pytree as pytree

from autopar.capture import TracedModel, capture
from autopar.cost.memory import OPTIMIZER_STATES, RECOMPUTE_MODES
from autopar.errors import AutoparError
from autopar.plan import Plan
from autopar.solver.assemble import traced_batch
from autopar.solver.search import Pins, search


def _dtype_bytes(dtype) -> int | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise AutoparError(f"dtype={dtype!r} must be a torch.dtype such as torch.bfloat16")
    return dtype.itemsize


def plan(
    model,
    example_inputs,
    mesh,
    *,
    global_batch_size=None,
    training=True,
    dtype=None,
    optimizer="adam",
    dp=None,
    tp=None,
    pp=None,
    microbatches=None,
    microbatch_size=None,
    schedule=None,
    sequence_parallel=None,
    recompute=None,
    zero=None,
    input_roles=None,
    loss_fn=None,
    example_target=None,
    time_limit_s=None,
    example_kwargs=None,
    progress=None,
    model_name=None,
) -> Plan:
    """Trace `model` on `example_inputs` and find the cheapest plan for `mesh`.

    Without `global_batch_size`, `example_inputs` is one data-parallel replica's batch
    (the global batch is that times dp); with it, the example only fixes the shapes
    and costs are scaled to each replica's share of the global batch.
    `input_roles(name, shape, dtype)` says which dims of each user input are "batch"
    and "sequence" (default: `autopar.strategies.default_input_roles`). With `loss_fn`
    and `example_target`, `loss_fn(model(*inputs), target)` is traced with the model, so
    a cross-entropy over vocabulary-sharded logits runs vocabulary-parallel.
    The plan records `model_name` (default: the model's class name) and the dtype, so
    that saved plans can be told apart.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise AutoparError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZER_STATES)}")
    if isinstance(model, TracedModel):
        traced = model
    else:
        traced = capture(
            model, example_inputs, example_kwargs, loss_fn=loss_fn, example_target=example_target
        )
    if sequence_parallel not in (None, True, False):
        raise AutoparError(
            f"sequence_parallel={sequence_parallel!r} must be True, False or None (let the "
            "search choose)"
        )
    if recompute not in (None, *RECOMPUTE_MODES):
        raise AutoparError(
            f"recompute={recompute!r} must be one of {', '.join(RECOMPUTE_MODES)}, or None "
            "(let the search choose per pipeline stage)"
        )
    if zero not in (None, 0, 1, 2, 3):
        raise AutoparError(f"zero={zero!r} must be 0, 1, 2 or 3, or None (let the search choose)")
    pins = Pins(
        dp, tp, pp, microbatches, microbatch_size, schedule, sequence_parallel, recompute, zero
    )
    found = search(
        traced, mesh, pins=pins, training=training, dtype_bytes=_dtype_bytes(dtype),
        optimizer=optimizer,
        time_limit_s=time_limit_s, batch=traced_batch(traced),
        global_batch_size=global_batch_size, progress=progress, input_roles=input_roles,
    )  # fmt: skip
    return dataclasses.replace(
        found, model=model_name or _class_name(model), dtype=_dtype_name(dtype, mesh)
    )


def _class_name(model) -> str:
    return "" if isinstance(model, TracedModel) else type(model).__name__


def _dtype_name(dtype, mesh) -> str:
    if dtype is None:
        return f"the mesh's default ({mesh.device.dtype_bytes}-byte)"
    return str(dtype).removeprefix("torch.")


def parallelize(model, mesh, example_inputs, plan=None, **plan_kwargs):
    """This rank's part of `model` under `plan`, ready to train; call on every rank.

    Run inside an initialized process group of `mesh.world_size` ranks (torchrun).
    `example_inputs` is one data-parallel replica's batch. Without `plan`, rank 0
    plans with `autopar.plan(model, example_inputs, mesh, **plan_kwargs)` and sends
    the plan to every rank; a given plan must have been made for this model.
    Every rank must hold the same weights (same seed, or load a state dict).
    Returns a `DistributedModule`: `pm(*inputs)`, `pm.train_step(inputs, target,
    loss_fn)`, `pm.parameters()`, `pm.full_state_dict()`, `pm.code`.
    """
    import torch.distributed as dist

    from autopar.runtime.groups import check_process_group, mesh_groups
    from autopar.runtime.parallel import DistributedModule

    check_process_group(mesh.world_size)
    example_kwargs = plan_kwargs.get("example_kwargs")
    loss = {key: plan_kwargs.pop(key, None) for key in ("loss_fn", "example_target")}
    traced = capture(model, example_inputs, example_kwargs, **loss)
    if plan is None:
        plan = _plan_on_rank_zero(traced, example_inputs, mesh, plan_kwargs)
    elif plan_kwargs:
        raise AutoparError(
            f"parallelize got a plan and planning options {sorted(plan_kwargs)}; pass one or "
            "the other"
        )
    else:
        plan.check_applies_to(traced.fingerprint())
    if plan.dp * plan.tp * plan.pp != dist.get_world_size():
        raise AutoparError(
            f"the plan's dp*tp*pp = {plan.dp}*{plan.tp}*{plan.pp} does not match the world size "
            f"{dist.get_world_size()}; plan for this mesh"
        )
    runtime_traced, runtime_plan = _traced_at(
        model, traced, example_inputs, example_kwargs, plan, loss
    )
    groups = mesh_groups(plan.pp, plan.dp, plan.tp)
    pm = DistributedModule(runtime_plan, runtime_traced, model, groups)
    pm.plan = plan  # as made; the runtime's copy names the nodes of its own trace
    return pm


def _plan_on_rank_zero(traced, example_inputs, mesh, plan_kwargs) -> Plan:
    """Rank 0 plans and broadcasts the plan (or its error), so every rank agrees."""
    import torch.distributed as dist

    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = plan(traced, example_inputs, mesh, **plan_kwargs).to_dict()
        except AutoparError as error:
            payload[0] = error
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return Plan.from_dict(payload[0])


def _traced_at(
    model, traced, example_inputs, example_kwargs, plan, loss
) -> tuple[TracedModel, Plan]:
    """The model traced at the plan's microbatch size (graphs have static shapes) and in
    the plan's compute dtype, and the plan applied to that graph by its stable node names
    (runtime/retrace.py).

    Mixed precision (`dtype=torch.bfloat16` of an fp32 model): the graph is traced on a
    bf16 copy of the model, so its casts are the ones the model makes in bf16 (norms
    and softmax upcast where the model says so); the runtime keeps the fp32 weights as
    masters and feeds the graph their bf16 casts.
    """
    compute = _compute_dtype(plan, model)
    if traced_batch(traced) == plan.microbatch_size and compute is None:
        return traced, plan
    from autopar.runtime.retrace import plan_for

    args = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    args, kwargs, target = pytree.tree_map(
        lambda x: _with_rows(x, plan.microbatch_size, compute),
        (tuple(args), dict(example_kwargs or {}), loss["example_target"]),
    )
    source = model if compute is None else copy.deepcopy(model).to(compute)
    again = capture(source, args, kwargs or None, loss_fn=loss["loss_fn"], example_target=target)
    del source
    try:
        return again, plan_for(plan, again.graph_module.graph)
    except AutoparError as error:
        raise AutoparError(
            f"{error}; traced at the microbatch size {plan.microbatch_size} instead of the "
            f"example batch {traced_batch(traced)}, the model's graph changes: plan with "
            f"example inputs of {plan.microbatch_size} rows (and global_batch_size), or pin "
            f"microbatch_size={traced_batch(traced)}"
        ) from error


def _compute_dtype(plan, model) -> torch.dtype | None:
    """The 16-bit dtype the plan trains in when the model's weights are wider (fp32
    masters, 16-bit compute); None when the graph runs in the model's own dtype."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(plan.dtype)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtype is None or not floating or floating == {dtype}:
        return None
    return dtype


def _with_rows(x, rows: int, dtype: torch.dtype | None = None):
    """`x` with `rows` rows along dim 0 (its first rows, repeated if it has fewer); a
    floating tensor in `dtype` when one is given."""
    if not isinstance(x, torch.Tensor):
        return x
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    if x.dim() == 0 or x.shape[0] == rows:
        return x
    return x[torch.arange(rows, device=x.device) % x.shape[0]]
