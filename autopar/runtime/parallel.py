"""DistributedModule: one rank's part of a model under a whole plan (dp x tp x pp).

What runs where, for rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank:

- pp == 1: a `ParallelModule` (this tp rank's shards, collectives on the tp group);
  `train_step` is a gradient-accumulation loop over the microbatches.
- pp > 1: a `PipelineModule` with this pp rank's stages, driven by the plan's
  torch.distributed.pipelining schedule over the pp group.
- dp: each replica trains on its own batch (what a `DistributedSampler` with
  `num_replicas=pm.dp_size, rank=pm.dp_rank` yields; the tp and pp ranks of one
  replica pass the same batch). Each microbatch's loss is divided by the number of
  microbatches times dp, so gradients summed over dp are those of the mean loss: in
  buckets during backward (runtime/reducer.py, as DDP), or, under ZeRO 1 and 2,
  reduce-scattered after it into this rank's slices (runtime/zero.py), which are then
  the parameters an optimizer steps; under ZeRO-3 the parts store only those slices
  and their graphs gather each block's parameters and reduce-scatter its gradients
  (ops/zero.py).

`train_step` leaves in `.grad` the gradient of the mean of `loss_fn` over the
microbatches and replicas (equal to the unsplit model's on the global batch when
`loss_fn` is a mean over equally sized microbatches) and returns that mean loss on
every rank. `pm(*inputs)` returns the full output on every rank. Every graph is
traced at `plan.microbatch_size` rows, so inputs are cut into chunks of that many rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import _pytree as pytree

from autopar.capture import TracedModel
from autopar.errors import AutoparError
from autopar.runtime.checkpoint import load_model_state_dict, model_state_dict
from autopar.runtime.groups import MeshGroups
from autopar.runtime.module import ParallelModule, flatten_inputs
from autopar.runtime.pipeline import PipelineModule
from autopar.runtime.reducer import GradientReducer
from autopar.runtime.state import DpSlices
from autopar.runtime.zero import DataParallelShards


class DistributedModule(nn.Module):
    """What `autopar.parallelize` returns: call it like the model, train with `train_step`.

    `pm.parameters()` are this rank's shards (all its stages), for any torch.optim
    optimizer; `pm.full_state_dict()` / `pm.full_grads()` rebuild single-device
    values on every rank; `pm.code` is this rank's generated source.
    """

    def __init__(self, plan, traced: TracedModel, model: nn.Module, groups: MeshGroups):
        super().__init__()
        self.plan = plan
        self.groups = groups
        self.microbatch_size = plan.microbatch_size
        sliced = DpSlices(groups.dp_group, groups.dp_rank, plan.dp) if plan.zero == 3 else None
        if plan.pp == 1:
            self.part = ParallelModule(
                traced, plan.node_placements(), model, tp_group=groups.tp_group,
                device=groups.device, recompute=plan.stages[0].recompute, sliced=sliced,
            )  # fmt: skip
        else:
            self.part = PipelineModule(traced, plan, model, groups, sliced)
        self._in_spec, self._out_spec = traced.in_spec, traced.out_spec
        self.traced_loss = traced.traced_loss
        self.shards = None  # ZeRO: this dp rank's slices, what the optimizer steps
        self.reducer = None  # otherwise the gradients' sum over dp, during backward
        params = list(self.part.parameters())
        if plan.zero in (1, 2) and plan.dp > 1:
            self.shards = DataParallelShards(params, groups.dp_group, groups.dp_rank, plan.dp)
        elif plan.dp > 1 and sliced is None:  # ZeRO-3's graphs reduce-scatter gradients
            reads = Counter(id(p) for p in self.part.graph_reads)
            self.reducer = GradientReducer(params, [reads[id(p)] for p in params], groups.dp_group)

    def parameters(self, recurse: bool = True):
        """What an optimizer steps: this rank's shards (under ZeRO, its dp slices of them)."""
        if self.shards is not None:
            return iter(self.shards.shards)
        return super().parameters(recurse)

    def gather_stepped_params(self) -> None:
        """Under ZeRO 1 and 2, all-gather the dp slices the optimizer stepped into the
        parameters the graph reads (nothing if unchanged; every rank calls it). Forward,
        `train_step`, state dicts and checkpoints call it first."""
        if self.shards is not None:
            self._guarded("ZeRO all-gather", self.shards.gather_params)

    @property
    def code(self) -> str:
        """This rank's generated Python source (all its pipeline stages)."""
        return f"# {self.groups.describe()}\n{self.part.code}"

    # --- forward -------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The model's output for the whole batch, on every rank.

        Rows are processed `microbatch_size` at a time. With pp == 1 the result is
        differentiable (every rank computes it); with pp > 1 it is not (train with
        `train_step`).
        """
        self.gather_stepped_params()
        device = self.groups.device
        flat = [_to(x, device) for x in flatten_inputs(self._in_spec, args, kwargs)]
        chunks = _split_rows(flat, self.microbatch_size, self.microbatch_size)
        if isinstance(self.part, ParallelModule):
            outputs = [self.part.run_flat(chunk) for chunk in chunks]
        else:
            outputs = [self._guarded("forward", self.part.run_flat, chunk) for chunk in chunks]
        return pytree.tree_unflatten(_join_rows(outputs), self._out_spec)

    # --- training ------------------------------------------------------------------------

    def train_step(self, inputs, target: torch.Tensor, loss_fn: Callable | None = None) -> float:
        """Forward and backward on this replica's batch; the mean loss over all replicas.

        `inputs` (a tuple, or one tensor) and `target` are this data-parallel replica's
        batch (`pm.dp_rank` of `pm.dp_size`), the same on its tp and pp ranks;
        `loss_fn(output, target)` gets the model's output structure for one microbatch,
        unless the loss was traced with the model (`loss_fn=` at plan time): then the
        graph computes it. Gradients are set afresh (previous `.grad` values are dropped).
        """
        inputs = inputs if isinstance(inputs, tuple | list) else (inputs,)
        loss_fn = self._loss_fn(loss_fn)
        self.gather_stepped_params()
        if self.traced_loss:
            inputs = (*inputs, target)  # the graph reads the target as its last input
        flat = flatten_inputs(self._in_spec, tuple(inputs), {})
        self._check_rows(_batch_rows(flat + [target]))
        device = self.groups.device
        flat, target = [_to(x, device) for x in flat], _to(target, device)
        self.zero_grad(set_to_none=True)
        if self.reducer is not None:
            self.reducer.prepare(_batch_rows(flat + [target]) // self.microbatch_size)
        local = self._guarded("train_step", self._forward_backward, flat, target, loss_fn)
        self._guarded("train_step", self._sync_grads)
        return self._guarded("train_step", self._mean_loss, local)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica: `DistributedSampler(rank=pm.dp_rank)`."""
        return self.groups.dp_rank

    @property
    def dp_size(self) -> int:
        """The number of data-parallel replicas: `DistributedSampler(num_replicas=...)`."""
        return self.groups.dp

    @property
    def tp_rank(self) -> int:
        return self.groups.tp_rank

    @property
    def pp_rank(self) -> int:
        return self.groups.pp_rank

    def _loss_fn(self, loss_fn: Callable | None) -> Callable:
        if self.traced_loss and loss_fn is not None:
            raise AutoparError(
                "the loss was traced with the model (loss_fn= at plan time): call "
                "train_step(inputs, target) without a loss_fn"
            )
        if self.traced_loss:
            return _traced
        if loss_fn is None:
            raise AutoparError(
                "train_step needs loss_fn(output, target), or trace the loss with the model: "
                "autopar.parallelize(..., loss_fn=fn, example_target=y)"
            )
        return loss_fn

    def _check_rows(self, rows: int) -> None:
        """A replica's batch must split into the plan's microbatches (all of them, pp > 1)."""
        size, count = self.microbatch_size, self.plan.num_microbatches
        pipelined = isinstance(self.part, PipelineModule)
        if (rows != size * count) if pipelined else (rows % size):
            wanted = (
                f"{count} microbatches of {size} rows" if pipelined else f"a multiple of {size}"
            )
            raise AutoparError(
                f"train_step got a batch of {rows} rows, but this plan runs {wanted} per "
                f"replica (dp={self.plan.dp}); pass this replica's batch of "
                f"{size * count} rows (a DistributedSampler with num_replicas=pm.dp_size, "
                "rank=pm.dp_rank)"
            )

    def _forward_backward(self, flat: list, target: torch.Tensor, loss_fn) -> torch.Tensor | None:
        if isinstance(self.part, PipelineModule):
            return self.part.run_schedule(flat, target, loss_fn)
        return self._accumulate(flat, target, loss_fn)

    def _accumulate(self, flat: list, target: torch.Tensor, loss_fn) -> torch.Tensor:
        """pp == 1: gradient accumulation over the microbatches; the mean loss / dp."""
        size = self.microbatch_size
        chunks = _split_rows(flat + [target], size, size)
        total = torch.zeros((), dtype=torch.float64, device=self.groups.device)
        for *chunk, chunk_target in chunks:
            output = pytree.tree_unflatten(self.part.run_flat(chunk), self._out_spec)
            loss = loss_fn(output, chunk_target) / (len(chunks) * self.plan.dp)
            loss.backward()
            total += loss.detach()
        return total

    def _sync_grads(self) -> None:
        """Sum every gradient over dp (the mean: each replica's loss was divided by dp),
        tied copies' over pp and the ones left partial over tp."""
        if self.reducer is not None:
            self.reducer.finish()  # before anything else reads its buckets
        self.part.state.sum_tied_grads()
        self.part.state.sum_partial_grads()
        if self.shards is not None:
            self.shards.scatter_grads()

    def _mean_loss(self, local: torch.Tensor | None) -> float:
        """The sum over dp replicas of the last stage's loss / dp, on every rank (one
        all-reduce over the world)."""
        share = torch.zeros((), dtype=torch.float64, device=self.groups.device)
        if local is not None:  # every tp rank of the last stage holds the same value
            share += local.to(torch.float64) / self.plan.tp
        dist.all_reduce(share)
        return float(share)

    def _guarded(self, what: str, fn, *args):
        """Run `fn`; a failing collective says which rank and what to look for."""
        try:
            return fn(*args)
        except (RuntimeError, dist.DistError) as error:
            if isinstance(error, dist.DistError) or _looks_like_comm(error):
                error.add_note(
                    f"autopar: {what} on {self.groups.describe()} failed in communication; "
                    "another rank has probably died or stopped (timeout "
                    f"{self.groups.timeout}); check the other ranks' logs"
                )
            raise

    # --- state ---------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model's `state_dict()` (same keys, full values) on every rank."""
        self.gather_stepped_params()
        return self.part.state.full_state_dict()

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a single-device state dict; each rank keeps its shards."""
        self.part.state.load_full_state_dict(state_dict)
        if self.shards is not None:
            self.shards.reset_from_params()

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """This rank's part of the single-device state dict, for `torch.distributed.checkpoint`
        (tp-sharded tensors as DTensors; runtime/checkpoint.py). Every rank calls it."""
        return model_state_dict(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a `pm.state_dict()` that `dcp.load` filled (the checkpoint may come from any
        plan of the same model); with an optimizer use `autopar.load_checkpoint`."""
        load_model_state_dict(self, state_dict)

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full gradients of the parameters on every rank (for tests and debugging)."""
        if self.shards is None:
            return self.part.state.full_grads()
        for param, grad in zip(self.shards.params, self.shards.gathered_grads(), strict=True):
            param.grad = grad
        try:
            return self.part.state.full_grads()
        finally:
            for param in self.shards.params:
                param.grad = None


def _traced(output, target):
    """The loss a traced graph returns is its output."""
    return output


_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def _looks_like_comm(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in _COMM_WORDS)


def _to(x, device: torch.device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _batched(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def _batch_rows(values: Sequence) -> int:
    rows = {x.shape[0] for x in values if _batched(x)}
    if len(rows) != 1:
        raise AutoparError(
            f"every batched input (and the target) needs the same number of rows (dim 0), "
            f"got {sorted(rows) or 'no batched tensor'}"
        )
    return rows.pop()


def _rows(x: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return x.narrow(0, start, size)


def _split_rows(flat: list, size: int, multiple: int) -> list[list]:
    """Cut every batched value into chunks of `size` rows; unbatched values repeat."""
    rows = _batch_rows(flat)
    if rows % multiple:
        raise AutoparError(
            f"the batch has {rows} rows, not a multiple of the plan's microbatch size "
            f"{multiple} (every graph is traced at that size)"
        )
    return [
        [_rows(x, start, size) if _batched(x) else x for x in flat]
        for start in range(0, rows, size)
    ]


def _join_rows(chunks: list[list]) -> list:
    if len(chunks) == 1:
        return chunks[0]
    joined = []
    for values in zip(*chunks, strict=True):
        if not _batched(values[0]):
            raise AutoparError(
                "the model returns a value without a batch dimension; call it with "
                "microbatch_size rows at a time"
            )
        joined.append(torch.cat(values))
    return joined
