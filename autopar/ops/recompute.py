"""What generated code calls to run a region under activation recomputation."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from autopar.ops.axes import bound_axes, current_axes


def recomputed(region: torch.nn.Module, *inputs):
    """`region(*inputs)`, keeping only `inputs` for backward: backward runs the region's
    forward again (with the random state and the mesh axes it had) before its own
    backward."""
    axes = current_axes()

    def run(*args):
        with bound_axes(axes):
            return region(*args)

    return checkpoint(run, *inputs, use_reentrant=False)
