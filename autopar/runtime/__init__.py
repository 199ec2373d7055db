"""Running generated code: collectives, axis bindings, ParallelModule and DistributedModule.

`ParallelModule` is one tensor-parallel rank's part of a model; `DistributedModule`
(what `autopar.parallelize` returns) runs a whole plan: dp replicas, tp shards and
pipeline stages (runtime/pipeline.py) on the process groups of runtime/groups.py.
"""

from autopar.runtime import collectives
from autopar.runtime.collectives import bind_axis, bound_axes

__all__ = ["DistributedModule", "ParallelModule", "bind_axis", "bound_axes", "collectives"]


def __getattr__(name: str):
    # These import codegen, which imports runtime.collectives: load them lazily.
    if name == "ParallelModule":
        from autopar.runtime.module import ParallelModule

        return ParallelModule
    if name == "DistributedModule":
        from autopar.runtime.parallel import DistributedModule

        return DistributedModule
    raise AttributeError(name)
