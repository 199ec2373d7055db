"""The two calls users make: `plan()` finds a Plan, `parallelize()` runs one."""

from __future__ import annotations

import torch

from autopar.capture import TracedModel, capture
from autopar.errors import AutoparError
from autopar.plan import Plan
from autopar.solver.search import search

OPTIMIZERS = ("adam", "adamw", "sgd")


def _batch_size(traced: TracedModel) -> int:
    for node in traced.graph_module.graph.nodes:
        if node.name in traced.user_inputs:
            shape = node.meta["val"].shape
            return int(shape[0]) if len(shape) else 1
    return 1


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
    time_limit_s=None,
    example_kwargs=None,
) -> Plan:
    """Trace `model` on `example_inputs` (one data-parallel replica's batch) and plan it."""
    if optimizer not in OPTIMIZERS:
        raise AutoparError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if microbatches not in (None, 1):
        raise AutoparError(
            f"microbatches={microbatches}: pipeline microbatching is not available yet; "
            "leave it unset or pass 1"
        )
    traced = (
        model if isinstance(model, TracedModel) else capture(model, example_inputs, example_kwargs)
    )
    batch = _batch_size(traced)
    if global_batch_size is not None and dp is not None and global_batch_size != batch * dp:
        raise AutoparError(
            f"global_batch_size={global_batch_size} must equal the example batch ({batch}) x "
            f"dp ({dp}); pass a per-replica example batch of global_batch_size / dp"
        )
    return search(
        traced, mesh, dp=dp, tp=tp, pp=pp, training=training, dtype_bytes=_dtype_bytes(dtype),
        time_limit_s=time_limit_s, batch=batch,
    )  # fmt: skip
