"""Data-parallel gradient sync in buckets, overlapped with backward, as DDP's reducer does.

Parameters are grouped into buckets of about `bucket_bytes` (the first one smaller, so
that communication starts early), in reverse order of registration: roughly the order
backward produces their gradients. A hook after each gradient accumulation counts the
parameter's accumulations: after the first of a step, the gradient autograd made is
copied into the parameter's view of its bucket and `.grad` becomes that view, so later
accumulations (microbatches, several stages) add into the bucket in place and nothing
is copied out (no bucket is zeroed before a step either). Once every parameter of a
bucket has all of its accumulations (one per backward pass per graph that reads it),
the bucket's all-reduce starts, asynchronously, while backward goes on. Buckets start in index order, the same on every replica, as the
collectives of a process group must. `finish` starts what backward left (buckets
holding parameters that got no gradient), waits for all of them, and drops the
gradient of each parameter that got none, as autograd would have left it.

The sum over replicas is the mean because each microbatch's loss is divided by the
number of microbatches times dp before its backward (runtime/parallel.py), so no
division runs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
FIRST_BUCKET_BYTES = 2**20  # DDP's first bucket: its all-reduce starts early in backward


@dataclass
class Bucket:
    """Parameters whose gradients live side by side in one flat buffer."""

    params: list[nn.Parameter]
    buffer: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0  # parameters still short of their accumulations this step
    work: dist.Work | None = None


@dataclass
class _Slot:
    bucket: int
    view: torch.Tensor
    expected: int = 0  # accumulations per step
    seen: int = 0


def _buckets_of(params: list[nn.Parameter], bucket_bytes: int, first_bytes: int) -> list[list]:
    """Consecutive runs of `params` (reversed) of one dtype, each about `bucket_bytes`."""
    runs: list[list[nn.Parameter]] = []
    size, limit, dtype = 0, first_bytes, None
    for param in reversed(params):
        nbytes = param.numel() * param.element_size()
        if not runs or param.dtype != dtype or size + nbytes > limit:
            if runs:
                limit = bucket_bytes
            runs.append([])
            size, dtype = 0, param.dtype
        runs[-1].append(param)
        size += nbytes
    return runs


class GradientReducer:
    """Averages the gradients of `params` over `group` during backward.

    `uses[i]` is how many graphs of this rank read `params[i]` (its gradient is
    accumulated once per backward pass of each); every replica passes the same
    parameters, shapes and order.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        uses: list[int],
        group: dist.ProcessGroup,
        bucket_bytes: int = BUCKET_BYTES,
        first_bucket_bytes: int = FIRST_BUCKET_BYTES,
    ):
        self.group = group
        self._uses = {id(p): n for p, n in zip(params, uses, strict=True)}
        trained = [p for p in params if p.requires_grad and self._uses[id(p)] > 0]
        self.buckets: list[Bucket] = []
        self._slots: dict[int, _Slot] = {}
        for index, run in enumerate(_buckets_of(trained, bucket_bytes, first_bucket_bytes)):
            buffer = torch.zeros(sum(p.numel() for p in run), dtype=run[0].dtype,
                                 device=run[0].device)  # fmt: skip
            views = list(buffer.split([p.numel() for p in run]))
            views = [view.view_as(p) for view, p in zip(views, run, strict=True)]
            self.buckets.append(Bucket(run, buffer, views))
            for param, view in zip(run, views, strict=True):
                self._slots[id(param)] = _Slot(index, view)
                param.register_post_accumulate_grad_hook(self._accumulated)
        self._next = 0  # the next bucket to start
        self._active = False

    def prepare(self, backward_passes: int) -> None:
        """Before a step of `backward_passes` backward passes per graph (gradients set to
        None): every count starts again."""
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.params), None
            for param in bucket.params:
                slot = self._slots[id(param)]
                slot.expected, slot.seen = backward_passes * self._uses[id(param)], 0
        self._next, self._active = 0, True

    def _accumulated(self, param: nn.Parameter) -> None:
        if not self._active:  # a backward pass outside train_step
            return
        slot = self._slots[id(param)]
        slot.seen += 1
        if slot.seen == 1:  # the step's first: its gradient into the bucket
            slot.view.copy_(param.grad)
            param.grad = slot.view
        if slot.seen == slot.expected:
            self.buckets[slot.bucket].pending -= 1
            self._start_ready()

    def _start_ready(self) -> None:
        """Start the buckets that are complete, in index order."""
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])
            self._next += 1

    def _start(self, bucket: Bucket) -> None:
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """After the step's backward passes: every bucket summed over the group."""
        for bucket in self.buckets[self._next :]:
            for param, view in zip(bucket.params, bucket.views, strict=True):
                if self._slots[id(param)].seen == 0:  # no gradient: its part of the sum is 0
                    view.zero_()
            self._start(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None  # released here, not by a communication thread at exit
            for param in bucket.params:
                slot = self._slots[id(param)]
                if slot.seen == 0:  # read by no backward pass: no gradient, as autograd leaves it
                    param.grad = None
        self._active = False
