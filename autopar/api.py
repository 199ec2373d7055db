"""The two calls users make: `plan()` finds a Plan, `parallelize()` runs one."""

from __future__ import annotations

import torch

from autopar.capture import TracedModel, capture
from autopar.errors import AutoparError
from autopar.plan import Plan
from autopar.solver.search import Pins, search, traced_batch

OPTIMIZERS = ("adam", "adamw", "sgd")


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
    time_limit_s=None,
    example_kwargs=None,
    progress=None,
) -> Plan:
    """Trace `model` on `example_inputs` and find the cheapest plan for `mesh`.

    Without `global_batch_size`, `example_inputs` is one data-parallel replica's batch
    (the global batch is that times dp); with it, the example only fixes the shapes
    and costs are scaled to each replica's share of the global batch.
    """
    if optimizer not in OPTIMIZERS:
        raise AutoparError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if isinstance(model, TracedModel):
        traced = model
    else:
        traced = capture(model, example_inputs, example_kwargs)
    pins = Pins(dp, tp, pp, microbatches, microbatch_size, schedule)
    return search(
        traced, mesh, pins=pins, training=training, dtype_bytes=_dtype_bytes(dtype),
        time_limit_s=time_limit_s, batch=traced_batch(traced),
        global_batch_size=global_batch_size, progress=progress,
    )  # fmt: skip
