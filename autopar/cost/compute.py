"""Roofline time of one operator on one device, forward and backward; the optimizer step.

An operator is bounded either by arithmetic or by memory traffic, whichever is
slower (Williams, Waterman and Patterson, "Roofline", CACM 2009):

    t = max(flops / (peak_flops * matmul_efficiency), nbytes / memory_bandwidth)

`matmul_efficiency` scales the datasheet peak down to what a large matmul
sustains (see `DeviceSpec`), and on GPUs a matmul's shape scales it further
(`cost.gemm`: tile quantization, the inner loop's fill); elementwise and
normalization operators land on the memory side of the roofline, so the
efficiency hardly matters for them.
Communication and pipeline bubbles are priced elsewhere (`cost.comm`,
`solver.stages`), never folded into this number. Every stage that needs the time
of a node (the ILP, the pricing of a plan, the timeline) reads `node_seconds`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from autopar.cost.gemm import Product, efficiency
from autopar.errors import AutoparError

if TYPE_CHECKING:
    from autopar.analyze import NodeInfo
    from autopar.mesh import DeviceSpec

# The backward pass of a matmul computes two products the size of the forward one
# (gradient w.r.t. the input and w.r.t. the weight), hence training costs about 3x the
# forward FLOPs: the 6N FLOPs per token of Kaplan et al. 2020 ("Scaling Laws for
# Neural Language Models", sec. 2.1) against 2N forward, also used by Narayanan et
# al. 2021 (Megatron-LM, SC'21, appendix).
BACKWARD_FLOP_FACTOR = 2.0
# A memory-bound op's backward reads the output gradient and writes the input gradient:
# about the forward's traffic again. An add or sub hands its gradient on untouched
# (autograd runs no kernel) except to a broadcast operand, whose gradient is a sum
# that reads the output gradient once: about half the forward's traffic.
BACKWARD_BYTES_FACTOR = 1.0
PASS_THROUGH_BACKWARD_FACTOR = 0.0
BROADCAST_SUM_BACKWARD_FACTOR = 0.5
# Ops whose backward autograd runs as more than one such kernel (eager, unfused):
# a product's gradient is one product per tensor operand (grad * other, each the
# forward's traffic), pow(x, p)'s is p * x^(p-1) * grad (a pow and two products over
# the tensor: 7 tensors against the forward's 2), tanh's reads the output and the
# gradient and writes one (3 against 2). Profiled on the GPT-2 block's GELU.
PER_OPERAND_BACKWARD = (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor)
BACKWARD_BYTES_BY_OP = {torch.ops.aten.pow.Tensor_Scalar: 3.5, torch.ops.aten.tanh.default: 1.5}
# Mixed-precision Adam touches ~32 bytes of memory per parameter per step: read and
# write fp32 master weight, momentum and variance (24 B), read the 16-bit gradient and
# write the 16-bit weight (4 B), plus slack for the gradient zeroing (4 B).
OPTIMIZER_BYTES_PER_PARAM = 32
# AdamW stepping fp32 weights in place as torch.optim runs it (torch/optim/adamw.py and
# adam.py, `_single_tensor_adam`, the same sequence over lists in its foreach twin),
# bytes read and written per parameter: the decoupled weight decay w *= 1 - lr wd (8),
# m.lerp_(g) (12), v.mul_(b2) (8) and v.addcmul_(g, g) (12), the denominator sqrt(v)
# (8), / sqrt(1 - b2^t) (8), + eps (8), and w.addcdiv_(m, denominator) (16). No master
# copy: the weights are the fp32 ones. (Adam without weight decay skips the first: 72.)
FP32_OPTIMIZER_BYTES_PER_PARAM = 80

_PASS_THROUGH = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def compute_time(
    flops: float, nbytes: float, device: DeviceSpec, efficiency: float | None = None
) -> float:
    """Seconds for an operator doing `flops` and moving `nbytes` on `device`, its
    arithmetic at `efficiency` of peak (`cost.gemm.efficiency` of its matmul shapes;
    the device's flat `matmul_efficiency` when None)."""
    if flops < 0 or nbytes < 0:
        raise AutoparError(
            f"compute_time(flops={flops}, nbytes={nbytes}): counts cannot be negative"
        )
    efficiency = device.matmul_efficiency if efficiency is None else efficiency
    arithmetic = flops / (device.peak_flops * efficiency)
    memory = nbytes / device.memory_bandwidth
    return max(arithmetic, memory)


def training_time(
    flops: float, nbytes: float, device: DeviceSpec, backward_bytes=BACKWARD_BYTES_FACTOR,
    efficiency: float | None = None,
) -> float:  # fmt: skip
    """Forward plus backward: 1 + BACKWARD_FLOP_FACTOR times the FLOPs, 1 +
    `backward_bytes` (a node's `backward_bytes_factor`) times the bytes, on one roofline."""
    flops, nbytes = (1 + BACKWARD_FLOP_FACTOR) * flops, (1 + backward_bytes) * nbytes
    return compute_time(flops, nbytes, device, efficiency)


def traffic_bytes(info: NodeInfo, dtype_bytes: int | None) -> float:
    """Bytes a node moves, at the training dtype when one is given."""
    nbytes = info.bytes_read + info.bytes_written
    if dtype_bytes and info.dtype is not None and info.dtype.is_floating_point:
        return nbytes * dtype_bytes / info.dtype.itemsize
    return nbytes


def backward_bytes_factor(node: fx.Node) -> float:
    """Bytes the backward of `node` moves, as a multiple of its forward's: the one rule
    `training_time` prices the backward traffic by."""
    if node.target in BACKWARD_BYTES_BY_OP:
        return BACKWARD_BYTES_BY_OP[node.target]
    if node.target in PER_OPERAND_BACKWARD:
        floating = [a for a in node.all_input_nodes if is_floating(a)]
        return BACKWARD_BYTES_FACTOR * max(len(floating), 1)
    if node.target not in _PASS_THROUGH:
        return BACKWARD_BYTES_FACTOR
    out_shape = node.meta["val"].shape
    broadcast = any(arg.meta["val"].shape != out_shape for arg in node.all_input_nodes)
    return BROADCAST_SUM_BACKWARD_FACTOR if broadcast else PASS_THROUGH_BACKWARD_FACTOR


def is_floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def node_seconds(
    node: fx.Node, info: NodeInfo, share: int, device: DeviceSpec, *, training: bool,
    dtype_bytes: int | None, products: tuple[Product, ...] = (),
) -> float:  # fmt: skip
    """Roofline time of a call_function node on a rank doing 1/`share` of its work,
    forward plus backward when training; `products` are its matmuls' local shapes
    (`cost.gemm.local_products`), which set the share of peak its arithmetic gets."""
    flops, nbytes = info.flops / share, traffic_bytes(info, dtype_bytes) / share
    rate = efficiency(products, device, training=training)
    if not training:
        return compute_time(flops, nbytes, device, rate)
    return training_time(flops, nbytes, device, backward_bytes_factor(node), rate)


def optimizer_seconds(local_numel: float, device: DeviceSpec, dtype_bytes: int | None = None):
    """The optimizer step's memory traffic for `local_numel` parameters on one rank,
    trained in mixed precision (16-bit weights, fp32 master) or in fp32."""
    fp32 = (dtype_bytes or device.dtype_bytes) == 4
    per_param = FP32_OPTIMIZER_BYTES_PER_PARAM if fp32 else OPTIMIZER_BYTES_PER_PARAM
    return local_numel * per_param / (device.optimizer_bandwidth or device.memory_bandwidth)
