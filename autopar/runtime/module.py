"""ParallelModule: one tensor-parallel rank's part of a model, callable like the model.

It holds this rank's shards of the original parameters and buffers (registered
under `pm.shards` with the original FQNs, so any `torch.optim` optimizer works on
`pm.parameters()`), the sharded graph (`pm.graph_module`) and its readable
source (`pm.code`). `forward` flattens its arguments as `torch.export` did when
the model was captured, feeds parameters, buffers and inputs in placeholder
order, and rebuilds the model's output structure (`pm(ids).logits` works).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.export.graph_signature import OutputKind
from torch.utils import _pytree as pytree

from autopar.capture import TracedModel
from autopar.codegen import NodePlacement, annotated_code, shard_graph, shard_tensor
from autopar.codegen import recompute as recompute_regions
from autopar.codegen.zero import gather_per_block
from autopar.errors import AutoparError
from autopar.ops import Axis
from autopar.runtime.feeds import FedGraph, placeholder_feeds
from autopar.runtime.held import HeldState, held_tensors
from autopar.runtime.state import (
    DpSlices,
    build_slots,
    dp_axes,
    partial_grad_slots,
    sliced_placeholders,
)

_USER_OUTPUTS = (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)


class ParallelModule(nn.Module):
    """This rank's part of `model` under a tensor-parallel placement map.

    `traced` is `capture(model, ...)`; `placements` maps node names to
    `NodePlacement`s (missing nodes are replicated); `tp_group` is the process
    group of the tp axis (None: the default group, or a single rank when
    torch.distributed is not initialized); `tp_size` and `tp_rank` default to that
    group's and are checked against it. `recompute` ("none", "selective", "full") says
    which regions run again in backward instead of keeping their activations; `sliced`
    (ZeRO-3) stores trainable parameters as dp slices, gathered per block. `model`
    supplies the values (it may live on the meta device; then call
    `load_full_state_dict`).
    """

    def __init__(
        self,
        traced: TracedModel,
        placements: Mapping[str, NodePlacement],
        model: nn.Module,
        *,
        tp_size: int | None = None,
        tp_rank: int | None = None,
        tp_group: dist.ProcessGroup | None = None,
        axis: str = "tp",
        device: torch.device | str | None = None,
        recompute: str = "none",
        sliced: DpSlices | None = None,
    ):
        super().__init__()
        tp_size, tp_rank = _size_and_rank(tp_size, tp_rank, tp_group)
        self.tp_size, self.tp_rank, self.tp_group, self.axis = tp_size, tp_rank, tp_group, axis
        tp = Axis(axis, tp_group, tp_size, tp_rank)
        self.graph_module = shard_graph(traced, placements, tp_size, axis=axis)
        self.shards = nn.Module()
        slots = build_slots(
            traced, self.graph_module, model, self.shards, tp_rank, tp_size, device,
            sliced=sliced,
        )  # fmt: skip
        if sliced is not None:
            names = sliced_placeholders(traced, model)
            gather_per_block(self.graph_module, names, sliced.size)
        self.graph_module = recompute_regions(self.graph_module, recompute)
        held = held_tensors(traced, self.graph_module, model)
        partial = partial_grad_slots(traced, self.graph_module, model, slots)
        self.state = HeldState(model, held, slots, partial, tp, sliced=sliced)
        placeholders = self.graph_module.graph.find_nodes(op="placeholder")
        feeds = placeholder_feeds(traced, placeholders, model, slots, self, device)
        axes = {axis: tp, **dp_axes(sliced)}
        self.fed = FedGraph(self.graph_module, feeds, axes, regather=sliced is not None)
        self.graph_reads = self.fed.graph_reads  # for the dp reducer
        signature = traced.exported.graph_signature
        self._output_kinds = [(spec.kind, spec.target) for spec in signature.output_specs]
        self._in_spec, self._out_spec = traced.in_spec, traced.out_spec
        self._buffer_slots = {**{slot.name: slot for slot in slots.values()},
                              **self.state.held_slots()}  # fmt: skip

    @property
    def code(self) -> str:
        """This rank's generated Python source, annotated with placements and local shapes."""
        header = (
            f"rank {self.tp_rank} of {self.tp_size} on mesh axis {self.axis!r}\n"
            "from autopar.ops import redistribute; from autopar.ops.vocab import "
            "vocab_parallel_cross_entropy, vocab_parallel_embedding"
        )
        return annotated_code(self.graph_module, header)

    def forward(self, *args, **kwargs):
        outputs = self.run_flat(flatten_inputs(self._in_spec, args, kwargs))
        return pytree.tree_unflatten(outputs, self._out_spec)

    def run_flat(self, flat_inputs: list) -> list:
        """Run on the flattened user inputs; the flattened user outputs."""
        return self._route_outputs(self.fed.run(flat_inputs))

    def _route_outputs(self, outputs) -> list:
        """Store buffer mutations in the local buffers; return the user's outputs."""
        user = []
        for value, (kind, target) in zip(outputs, self._output_kinds, strict=True):
            if kind in _USER_OUTPUTS:
                user.append(value)
            elif kind == OutputKind.BUFFER_MUTATION:
                slot = self._buffer_slots[target]
                local = shard_tensor(value, slot.placement, self.tp_rank, self.tp_size)
                with torch.no_grad():
                    slot.local().copy_(local)
            else:
                raise AutoparError(f"graph output of kind {kind.name} is not supported")
        return user

    def sum_partial_grads(self) -> None:
        """Sum over tp the gradients the graph leaves partial; once per step, after backward."""
        self.state.sum_partial_grads()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model's `state_dict()`: same keys (tied aliases too), full values."""
        return self.state.full_state_dict()

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full gradients of the parameters, keyed like `full_state_dict` (None: no grad)."""
        return self.state.full_grads()

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a single-device state dict, keeping this rank's shards."""
        self.state.load_full_state_dict(state_dict)


def flatten_inputs(in_spec: pytree.TreeSpec, args: tuple, kwargs: dict) -> list:
    """Flatten (args, kwargs) like torch.export did at capture, checking the structure."""
    expected_kwargs = in_spec.child(1).context
    if set(kwargs) == set(expected_kwargs):
        kwargs = {name: kwargs[name] for name in expected_kwargs}
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    if spec != in_spec:
        raise AutoparError(
            f"inputs do not match the ones the model was captured with: got structure "
            f"{spec}, captured {in_spec}; call with the same arguments and keywords"
        )
    return flat


def _size_and_rank(tp_size: int | None, tp_rank: int | None, group) -> tuple[int, int]:
    """The tp group's size and this rank in it, checked against any values given."""
    if tp_size == 1 and tp_rank in (None, 0) and group is None:
        return 1, 0  # one rank per tp group (say, pure data parallel): no collective runs
    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    elif group is None:
        size, rank = 1, 0
    else:
        raise AutoparError(
            "a tp_group was given but torch.distributed is not initialized "
            "(run under torchrun, or call init_process_group first)"
        )
    given = (size if tp_size is None else tp_size, rank if tp_rank is None else tp_rank)
    if given != (size, rank):
        raise AutoparError(
            f"tp_size={tp_size}, tp_rank={tp_rank} disagree with the process group "
            f"(size {size}, this rank {rank}); pass the tp group's own size and rank, or neither"
        )
    return size, rank
