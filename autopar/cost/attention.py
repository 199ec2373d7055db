"""The attention core as torch's CPU kernel runs it on a calibrated local rank.

On CPU ranks (`Mesh.eager_attention`) `aten.scaled_dot_product_attention` runs
`_scaled_dot_product_flash_attention_for_cpu` (aten/src/ATen/native/cpu/
FlashAttentionKernel.cpp), FlashAttention's tiling (Dao et al. 2022, Algorithms 1 and 4):

- forward: per tile of queries and keys two matmuls (Q K^T, P V) and, per score, the
  scale, the mask, a running maximum, exp and a running sum;
- backward: the scores again from the saved log-sum-exp, then dV, dP, dQ and dK: five
  matmuls of the forward's size against its two, a backward of 2.5x the forward's
  FLOPs (`FLASH_BACKWARD_FLOP_FACTOR`; the roofline's `BACKWARD_FLOP_FACTOR` is 2);
  per score the softmax again and dS = P * (dP - rowsum(dO * O)).

The per-score work is elementwise arithmetic on tiles in cache, serial with the
matmuls on the rank's core. It is priced at the rank's calibrated elementwise rate
(`memory_bandwidth`: bytes read and written per second over `autopar calibrate`'s
elementwise suite, softmax among it), as passes over fp32 scores: the forward's softmax
reads and writes them (`SCORE_FORWARD_PASSES`), the backward's reads and writes them
again and computes dS from P and dP (`SCORE_BACKWARD_PASSES`: 2 + 3).

The GPU presets keep the roofline's two matmuls per score tile: the published runs
they are fit to (Megatron-LM, Korthikanti et al. 2022) ran an unfused attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx

from autopar.cost.compute import BACKWARD_BYTES_FACTOR, compute_time, traffic_bytes

if TYPE_CHECKING:
    from autopar.analyze import NodeInfo
    from autopar.mesh import DeviceSpec

FLASH_BACKWARD_FLOP_FACTOR = 2.5  # five matmuls of the forward's size against its two
SCORE_FORWARD_PASSES = 2  # softmax: read the scores, write the probabilities
SCORE_BACKWARD_PASSES = 5  # the softmax again (2), dS from P and dP (read 2, write 1)
SCORE_BYTES = 4  # the kernel keeps its scores in fp32 whatever the inputs' dtype


def scores(node: fx.Node) -> int:
    """Query-key scores of one SDPA call: batch x heads x query length x key length."""
    query, key = (arg.meta["val"] for arg in node.args[:2])
    return query.shape[:-1].numel() * key.shape[-2]


def eager_attention_seconds(
    node: fx.Node, info: NodeInfo, share: int, device: DeviceSpec, *, training: bool,
    dtype_bytes: int | None,
) -> float:  # fmt: skip
    """An SDPA node on a rank doing 1/`share` of its heads, forward plus backward when
    training: its matmuls and its q, k, v, o traffic on the roofline, then its per-score
    softmax work."""
    flops, nbytes = info.flops / share, traffic_bytes(info, dtype_bytes) / share
    score_bytes = scores(node) / share * SCORE_BYTES
    if not training:
        return compute_time(flops, nbytes, device) + (
            SCORE_FORWARD_PASSES * score_bytes / device.memory_bandwidth
        )
    matmuls = compute_time(
        (1 + FLASH_BACKWARD_FLOP_FACTOR) * flops, (1 + BACKWARD_BYTES_FACTOR) * nbytes, device
    )
    passes = SCORE_FORWARD_PASSES + SCORE_BACKWARD_PASSES
    return matmuls + passes * score_bytes / device.memory_bandwidth
