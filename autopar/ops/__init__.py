"""What generated code calls: the reshard of one table entry, recomputed regions, the
vocabulary-parallel ops (`ops.vocab`), and the axis registry.

`codegen` emits calls into this package and `runtime` binds its axes; neither
imports the other for it. `ops.layout` holds the index arithmetic of a shard.
"""

from autopar.ops.axes import Axis, bind_axis, bound_axes, get_axis, unbind_axis
from autopar.ops.collectives import redistribute, run_steps
from autopar.ops.recompute import recomputed

__all__ = [
    "Axis",
    "bind_axis",
    "bound_axes",
    "get_axis",
    "recomputed",
    "redistribute",
    "run_steps",
    "unbind_axis",
]
