"""autopar: graph-compiler style auto-parallelization for training transformers in PyTorch.

    mesh = autopar.Mesh.preset("a100-80gb", nodes=2)
    plan = autopar.plan(model, example_inputs, mesh)
    print(plan.summary())

This module only re-exports the public API; each name lives in its own module.
"""

from autopar.api import parallelize, plan
from autopar.capture import TracedModel, capture
from autopar.errors import AutoparError, PlanError, TraceError
from autopar.mesh import DeviceSpec, Mesh
from autopar.plan import Plan

__all__ = [
    "AutoparError",
    "DeviceSpec",
    "Mesh",
    "Plan",
    "PlanError",
    "TraceError",
    "TracedModel",
    "capture",
    "parallelize",
    "plan",
]
