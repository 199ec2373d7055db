"""Roofline time of one operator on one device.

An operator is bounded either by arithmetic or by memory traffic, whichever is
slower (Williams, Waterman and Patterson, "Roofline", CACM 2009):

    t = max(flops / (peak_flops * matmul_efficiency), nbytes / memory_bandwidth)

`matmul_efficiency` scales the datasheet peak down to what a large matmul
sustains (see `DeviceSpec`); elementwise and normalization operators land on the
memory side of the roofline, so the efficiency hardly matters for them.
Communication and pipeline bubbles are priced elsewhere (`cost.comm`,
`solver.stages`), never folded into this number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.errors import AutoparError

if TYPE_CHECKING:
    from autopar.mesh import DeviceSpec

# The backward pass of a matmul computes two products the size of the forward
# one (gradient w.r.t. the input and w.r.t. the weight), hence training costs
# about 3x the forward FLOPs: the 6N FLOPs per token of Kaplan et al. 2020
# ("Scaling Laws for Neural Language Models", sec. 2.1) against 2N forward, also
# used by Narayanan et al. 2021 (Megatron-LM, SC'21, appendix). It reads the
# saved activations and the weights and writes two gradients, so we scale the
# bytes moved by the same factor.
BACKWARD_FACTOR = 2.0


def compute_time(flops: float, nbytes: float, device: DeviceSpec) -> float:
    """Seconds for an operator doing `flops` and moving `nbytes` on `device`."""
    if flops < 0 or nbytes < 0:
        raise AutoparError(
            f"compute_time(flops={flops}, nbytes={nbytes}): counts cannot be negative"
        )
    arithmetic = flops / (device.peak_flops * device.matmul_efficiency)
    memory = nbytes / device.memory_bandwidth
    return max(arithmetic, memory)


def training_compute_time(forward_flops: float, forward_nbytes: float, device: DeviceSpec) -> float:
    """Seconds for an operator's forward plus backward pass: 1 + BACKWARD_FACTOR times forward.

    Summing the forward and backward rooflines equals one roofline of the summed
    counts, because both scale by the same factor.
    """
    scale = 1.0 + BACKWARD_FACTOR
    return compute_time(scale * forward_flops, scale * forward_nbytes, device)
