"""Vocabulary-parallel ops that generated code calls where a vocabulary dim is sharded.

Each rank holds rows [r * V_local, (r + 1) * V_local) of a vocabulary of `vocab_size`
words (the last rank's tail is padding when the vocabulary does not divide, see
ops/layout.py). Both ops are plain torch code plus table reshards, so autograd gives
their backward:

- `vocab_parallel_embedding`: look up only the ids this rank holds, zeros elsewhere:
  a partial sum whose reduction (all-reduce, or reduce-scatter under sequence
  parallelism) the plan's next reshard does (Megatron-LM's VocabParallelEmbedding).
- `vocab_parallel_cross_entropy`: the loss of logits sharded on the class dim without
  gathering them: the max, the sum of exponentials and the target's logit are reduced
  over the axis, one value per token each (Megatron-LM's vocab-parallel cross-entropy),
  so no rank ever holds a full row of logits. Padded classes are masked out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.ops.axes import get_axis
from autopar.ops.collectives import redistribute

# the collectives vocab_parallel_cross_entropy runs, per token: priced by its strategy
CROSS_ENTROPY_REDUCTIONS = ("all_reduce", "all_reduce", "all_reduce")  # max, sum, target


def _local_range(rows: int, axis: str) -> tuple[int, int]:
    bound = get_axis(axis)
    return bound.rank * rows, (bound.rank + 1) * rows


def vocab_parallel_embedding(weight, ids, vocab_size: int, axis: str, padding_idx: int = -1):
    """Rows of this rank's part of the table for the ids in its range, zeros for the rest."""
    start, end = _local_range(weight.shape[0], axis)
    outside = (ids < start) | (ids >= end)
    local_ids = (ids - start).masked_fill(outside, 0)
    local_padding = padding_idx - start if start <= padding_idx < end else None
    rows = F.embedding(local_ids, weight, padding_idx=local_padding)
    return rows.masked_fill(outside.unsqueeze(-1), 0.0)


def _all_reduce_max(x: torch.Tensor, axis: str) -> torch.Tensor:
    bound = get_axis(axis)
    x = x.detach().clone()
    if bound.size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=bound.group)
    return x


def vocab_parallel_cross_entropy(
    logits, target, vocab_size: int, axis: str, reduction: int = 1, ignore_index: int = -100
):
    """`aten.cross_entropy_loss(logits, target, None, reduction, ignore_index)` for 2-d
    logits sharded on the class dim; the loss, whole on every rank."""
    start, end = _local_range(logits.shape[1], axis)
    classes = torch.arange(start, end, device=logits.device)
    logits = logits.masked_fill(classes >= vocab_size, float("-inf"))  # padding
    top = _all_reduce_max(logits.max(dim=1).values, axis)
    summed = torch.exp(logits - top.unsqueeze(1)).sum(dim=1)
    total = redistribute(summed, axis, "P", "R", "R")
    mine = (target >= start) & (target < end)
    picked = logits.gather(1, (target - start).clamp(0, end - start - 1).unsqueeze(1))
    target_logit = redistribute(picked.squeeze(1).masked_fill(~mine, 0.0), axis, "P", "R", "R")
    losses = torch.log(total) + top - target_logit
    kept = target != ignore_index
    losses = losses.masked_fill(~kept, 0.0)
    if reduction == 0:  # none
        return losses
    if reduction == 2:  # sum
        return losses.sum()
    return losses.sum() / kept.sum()
