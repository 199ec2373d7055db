"""Bytes one device holds while training: weights, gradients, optimizer states, activations.

Model states follow the ZeRO paper's accounting (Rajbhandari et al., SC'20,
sec. 3.1): mixed-precision Adam keeps 16-bit weights (2 B) and 16-bit gradients
(2 B) plus an fp32 master copy of the weights, momentum and variance
(4 + 4 + 4 = 12 B): 16 bytes per parameter. Plain fp32 training keeps 4 B
weights, 4 B gradients and 8 B of Adam states, again 16. ZeRO stage 1 shards
the optimizer states (master copy included) over the data-parallel ranks,
stage 2 also the gradients, stage 3 also the weights (FSDP's full sharding).

Activations are what the forward pass saves for backward (`saved_for_backward`: what
autograd keeps, node by node), per microbatch, times the microbatches in flight (1F1B
keeps up to pp of them on the first stage). Recomputation (solver/pipeline.py) keeps
less: a block recomputed in full keeps only its input, plus, while its backward runs,
one block's activations; selective recomputation drops what only the attention core
keeps (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models", MLSys 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from autopar.errors import AutoparError

if TYPE_CHECKING:
    from autopar.analyze import NodeInfo

# Optimizer states per parameter, each kept at fp32 under mixed precision.
# torch.optim.Adam / AdamW: exp_avg and exp_avg_sq; plain SGD (momentum=0): none.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 0}

# Bytes of an fp32 value: master weights and optimizer states under mixed precision.
FP32_BYTES = 4


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device; `total` is the sum of the four parts."""

    params: float
    grads: float
    optimizer: float
    activations: float
    total: float = field(init=False)

    def __post_init__(self) -> None:
        total = self.params + self.grads + self.optimizer + self.activations
        object.__setattr__(self, "total", total)


def training_memory(
    num_params: float,
    activation_bytes_per_microbatch: float,
    *,
    microbatches_in_flight: int = 1,
    param_shard: int = 1,
    dtype_bytes: int = 2,
    optimizer: str = "adam",
    mixed_precision: bool = True,
    zero_stage: int = 0,
    dp: int = 1,
) -> MemoryBreakdown:
    """Memory per device for training.

    num_params: parameters before model-parallel sharding (a stage's, or the model's).
    activation_bytes_per_microbatch: what this device saves for backward for one
        microbatch (already divided by tp and restricted to its stage).
    param_shard: how many ways the parameters are split (tp, or tp * pp when
        `num_params` counts the whole model).
    mixed_precision: keep fp32 master weights and fp32 optimizer states; adds
        nothing when `dtype_bytes` is already 4.
    """
    _check(optimizer, zero_stage, dp, param_shard, microbatches_in_flight)
    local_params = num_params / param_shard
    state_bytes = max(dtype_bytes, FP32_BYTES) if mixed_precision else dtype_bytes
    master_bytes = state_bytes if state_bytes != dtype_bytes else 0
    optimizer_bytes = master_bytes + OPTIMIZER_STATES[optimizer] * state_bytes
    return MemoryBreakdown(
        params=local_params * dtype_bytes / (dp if zero_stage >= 3 else 1),
        grads=local_params * dtype_bytes / (dp if zero_stage >= 2 else 1),
        optimizer=local_params * optimizer_bytes / (dp if zero_stage >= 1 else 1),
        activations=activation_bytes_per_microbatch * microbatches_in_flight,
    )


def _check(
    optimizer: str,
    zero_stage: int,
    dp: int,
    param_shard: int,
    microbatches_in_flight: int,
) -> None:
    if optimizer not in OPTIMIZER_STATES:
        raise AutoparError(
            f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZER_STATES)}"
        )
    if zero_stage not in (0, 1, 2, 3):
        raise AutoparError(f"zero_stage={zero_stage}; valid stages are 0, 1, 2 and 3")
    if dp < 1 or param_shard < 1 or microbatches_in_flight < 1:
        raise AutoparError(
            f"dp={dp}, param_shard={param_shard}, microbatches_in_flight="
            f"{microbatches_in_flight}: each must be a positive integer"
        )


def tensor_bytes(node: fx.Node, dtype_bytes: int | None) -> int:
    """Size of a node's (first) tensor output, floating point at the training dtype."""
    val = node.meta.get("val")
    val = val[0] if isinstance(val, list | tuple) else val
    if not isinstance(val, torch.Tensor):
        return 0
    width = dtype_bytes if dtype_bytes and val.dtype.is_floating_point else val.element_size()
    return val.numel() * width


aten = torch.ops.aten
# Ops whose backward needs none of their inputs' values (only shapes, or a mask of their
# own): what feeds only them is freed after the forward. Autograd's derivative formulas
# (tools/autograd/derivatives.yaml) say which inputs each op saves.
_BACKWARD_WITHOUT_INPUTS = {
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.to.dtype, aten.to.dtype_layout,
    aten.to.device, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.dropout.default, aten.native_dropout.default, aten.expand.default,
    aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor,
    aten.select.int, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.sum.dim_IntList, aten.mean.dim,
}  # fmt: skip
_SCALED = {aten.mul.Tensor, aten.div.Tensor}  # by a Python number: linear in the input
# Ops whose backward reads their own output (and so keep it).
_SAVE_OUTPUT = {
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.sigmoid.default, aten.tanh.default, aten.exp.default, aten.rsqrt.default,
    aten.sqrt.default, aten.scaled_dot_product_attention.default,
}  # fmt: skip


# What selective recomputation recomputes in backward instead of keeping (Korthikanti et
# al. 2022, sec. 5): the attention core. A fused attention op keeps its output and
# its inputs; recomputed, it keeps only the inputs.
ATTENTION_CORE = {aten.scaled_dot_product_attention.default}
RECOMPUTE_MODES = ("none", "selective", "full")


def _read_in_backward(user: fx.Node) -> bool:
    """Does `user`'s backward read the values of its inputs?"""
    if user.op != "call_function" or user.target in _BACKWARD_WITHOUT_INPUTS:
        return False
    tensors = [a for a in user.args[:2] if isinstance(a, fx.Node)]
    return not (user.target in _SCALED and len(tensors) == 1)


def saved_for_backward(node: fx.Node, info: NodeInfo, training: bool, dtype_bytes) -> int:
    """Bytes of the whole output a training step keeps for backward: a new (not a view or
    alias: analyze.py knows those by their storage) value that a gradient flows through,
    and that its own backward or a consumer's reads."""
    if not (training and node.op == "call_function" and info.requires_grad):
        return 0
    if info.bytes_written == 0:
        return 0
    kept = node.target in _SAVE_OUTPUT or any(_read_in_backward(u) for u in node.users)
    return tensor_bytes(node, dtype_bytes) if kept else 0


def state_bytes_per_param(
    training: bool, dtype_bytes: int, optimizer: str, zero: int = 0, dp: int = 1
) -> float:
    """Memory one parameter holds on a rank: its weight and, in training, its gradient and
    optimizer state (mixed-precision Adam: the 16 bytes of the ZeRO paper), the parts
    ZeRO stage `zero` shards over `dp` ranks divided."""
    if not training:
        return dtype_bytes
    return training_memory(
        1, 0, dtype_bytes=dtype_bytes, optimizer=optimizer, zero_stage=zero, dp=dp
    ).total
