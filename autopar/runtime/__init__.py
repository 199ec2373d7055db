"""Running generated code: ParallelModule and DistributedModule on the mesh's process groups.

`ParallelModule` is one tensor-parallel rank's part of a model; `DistributedModule`
(what `autopar.parallelize` returns) runs a whole plan: dp replicas, tp shards and
pipeline stages (runtime/pipeline.py) on the process groups of runtime/groups.py.
The collectives the generated code calls live in `autopar.ops`.
"""

from autopar.runtime.module import ParallelModule
from autopar.runtime.parallel import DistributedModule

__all__ = ["DistributedModule", "ParallelModule"]
