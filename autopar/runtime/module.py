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
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from autopar.capture import TracedModel
from autopar.codegen import (
    NodePlacement,
    annotated_code,
    gather_full,
    shard_graph,
    shard_tensor,
)
from autopar.codegen import recompute as recompute_regions
from autopar.codegen.zero import gather_per_block
from autopar.errors import AutoparError
from autopar.ops import Axis, bound_axes
from autopar.ops.zero import regathered_in_backward
from autopar.placement import Replicate
from autopar.runtime.state import (
    DpSlices,
    Slot,
    build_slots,
    dp_axes,
    load_tp_local,
    partial_grad_slots,
    read_params,
    sliced_placeholders,
    state_slots,
    sum_grads,
    tp_local,
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
        self._axes = {axis: Axis(axis, tp_group, tp_size, tp_rank), **dp_axes(sliced)}
        self._sliced = sliced is not None
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
        self._state_slots = state_slots(model, slots)
        self._partial_grads = partial_grad_slots(traced, self.graph_module, model, slots)
        placeholders = self.graph_module.graph.find_nodes(op="placeholder")
        self._feeds = placeholder_feeds(traced, placeholders, model, slots, self, device)
        self.graph_reads = read_params(self._feeds, placeholders)  # for the dp reducer
        self._dtypes = compute_dtypes(self._feeds, placeholders)
        signature = traced.exported.graph_signature
        self._output_kinds = [(spec.kind, spec.target) for spec in signature.output_specs]
        self._in_spec, self._out_spec = traced.in_spec, traced.out_spec
        self._buffer_slots = {**{slot.name: slot for slot in slots.values()}, **self._state_slots}

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
        user_inputs = iter(flat_inputs)
        inputs = [feed.local() if isinstance(feed, Slot) else feed for feed in self._feeds]
        inputs = [next(user_inputs) if value is _USER_INPUT else value for value in inputs]
        if self._dtypes is not None:
            inputs = cast_inputs(inputs, self._dtypes)
        with bound_axes(self._axes), regathered_in_backward(self._sliced):
            outputs = self.graph_module(*inputs)
        return self._route_outputs(outputs)

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
        """Sum over tp the gradients the graph leaves partial (parameters whose Megatron f
        waits for the step); call once after the backward passes of a step."""
        sum_grads(self._partial_grads, self.tp_group)

    def held_slots(self) -> dict[str, Slot]:
        """Every `model.state_dict()` key -> the slot of its tensor (this rank holds all)."""
        return dict(self._state_slots)

    def state_shapes(self) -> dict[str, torch.Size]:
        """Every `model.state_dict()` key -> its full shape."""
        return {key: slot.shape for key, slot in self._state_slots.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model's `state_dict()`: same keys (tied aliases too), full values."""
        gathered: dict[str, torch.Tensor] = {}
        result = {}
        for key, slot in self._state_slots.items():
            if slot.name not in gathered:
                gathered[slot.name] = self._gather(tp_local(slot), slot)
            result[key] = gathered[slot.name]
        return result

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full gradients of the parameters, keyed like `full_state_dict` (None: no grad)."""
        result = {}
        for key, slot in self._state_slots.items():
            grad = tp_local(slot, grad=True) if slot.is_parameter else None
            if slot.is_parameter:
                result[key] = None if grad is None else self._gather(grad, slot)
        return result

    def _gather(self, local: torch.Tensor, slot: Slot) -> torch.Tensor:
        placement = slot.placement if self.tp_size > 1 else Replicate()
        return gather_full(local, placement, self.tp_group, slot.shape)

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a single-device state dict, keeping this rank's shards."""
        check_state_dict(state_dict, self._state_slots)
        for key, slot in self._state_slots.items():
            local = shard_tensor(state_dict[key], slot.placement, self.tp_rank, self.tp_size)
            load_tp_local(slot, local)


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


def compute_dtypes(feeds: list, nodes: list) -> list | None:
    """Mixed precision: the dtype each placeholder was traced with, where a stored tensor
    that feeds one has another (fp32 master weights, a graph traced in bf16); else None.

    The cast is differentiable, so the gradient reaches the fp32 master as fp32 and
    accumulates there (over microbatches too) in fp32.
    """
    traced = [getattr(node.meta.get("val"), "dtype", None) for node in nodes]
    mixed = any(
        isinstance(feed, Slot) and dtype is not None and feed.local().dtype != dtype
        for feed, dtype in zip(feeds, traced, strict=True)
    )
    if not mixed:
        return None
    return [dtype if dtype is not None and dtype.is_floating_point else None for dtype in traced]


def cast_inputs(values: list, dtypes: list) -> list:
    """Each floating tensor in the dtype its placeholder was traced with."""
    return [
        value.to(dtype)
        if dtype is not None
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != dtype
        else value
        for value, dtype in zip(values, dtypes, strict=True)
    ]


class _UserInput:
    def __repr__(self) -> str:
        return "<user input>"


_USER_INPUT = _UserInput()


def placeholder_feeds(traced, nodes, model, slots, module, device=None) -> list:
    """Per placeholder node: the Slot that feeds it, a constant's Slot, or _USER_INPUT.

    Constants are sharded by the node's placement and registered on `module.constants`
    (`module` has `tp_rank` and `tp_size`).
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    fqns = {**traced.param_fqns, **traced.buffer_fqns}
    exported = traced.exported
    constants = {
        spec.arg.name: exported.constants[spec.target]
        for spec in exported.graph_signature.input_specs
        if spec.kind == InputKind.CONSTANT_TENSOR
    }
    feeds = []
    for node in nodes:
        if node.name in fqns:
            feeds.append(slots[id(named[fqns[node.name]])])
        elif node.name in constants:
            feeds.append(_constant_feed(module, node, constants[node.name], device))
        else:
            feeds.append(_USER_INPUT)
    return feeds


def _constant_feed(module: nn.Module, node, value: torch.Tensor, device) -> Slot:
    if not hasattr(module, "constants"):
        module.constants = nn.Module()
    placement = node.meta["placement"]
    local = shard_tensor(value, placement, module.tp_rank, module.tp_size)
    local = local.to(device) if device is not None else local
    module.constants.register_buffer(node.name, local, persistent=False)
    return Slot(node.name, module.constants, node.name, placement, value.shape, False)


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


def check_state_dict(state_dict: Mapping[str, torch.Tensor], slots: dict[str, Slot]) -> None:
    missing = [key for key in slots if key not in state_dict]
    unexpected = [key for key in state_dict if key not in slots]
    wrong = [
        f"{key}: got {tuple(state_dict[key].shape)}, expected {tuple(slot.shape)}"
        for key, slot in slots.items()
        if key in state_dict and state_dict[key].shape != slot.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise AutoparError(
            "load_full_state_dict: " + "; ".join(problems) + " (pass the single-device "
            "model's state_dict())"
        )
