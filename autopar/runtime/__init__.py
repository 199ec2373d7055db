"""Running generated code: collectives, axis bindings and ParallelModule."""

from autopar.runtime import collectives
from autopar.runtime.collectives import bind_axis, bound_axes

__all__ = ["ParallelModule", "bind_axis", "bound_axes", "collectives"]


def __getattr__(name: str):
    # ParallelModule imports codegen, which imports runtime.collectives: load it lazily.
    if name == "ParallelModule":
        from autopar.runtime.module import ParallelModule

        return ParallelModule
    raise AttributeError(name)
