"""autopar: graph-compiler style auto-parallelization for training transformers in PyTorch.

    mesh = autopar.Mesh.preset("a100-80gb", nodes=2)
    plan = autopar.plan(model, example_inputs, mesh)
    print(plan.summary())

This module only re-exports the public API; each name lives in its own module and
is imported on first use (PEP 562), so that `autopar --help` starts without torch.
"""

import importlib
import sys
import types

_EXPORTS = {
    "AutoparError": "autopar.errors",
    "DeviceSpec": "autopar.mesh",
    "Mesh": "autopar.mesh",
    "Plan": "autopar.plan",
    "PlanError": "autopar.errors",
    "TraceError": "autopar.errors",
    "TracedModel": "autopar.capture",
    "capture": "autopar.capture",
    "load_checkpoint": "autopar.runtime.checkpoint",
    "parallelize": "autopar.api",
    "plan": "autopar.api",
    "save_checkpoint": "autopar.runtime.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps `autopar.plan` and `autopar.capture` the functions once their submodules load.

    Importing autopar/plan.py sets the attribute `autopar.plan` to that module; with
    eager imports the function's binding came later and won, lazily it must be kept.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
