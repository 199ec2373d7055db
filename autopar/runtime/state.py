"""Where each of the original model's tensors lives on this rank, and how to put it back.

One `Slot` per distinct parameter or buffer of the single-device model (tied
parameters share one slot, found by identity through
`named_parameters(remove_duplicate=False)`). A slot records the tensor's global
shape and its placement on the tp axis (read from the sharded graph's
placeholders); the local shard itself is registered on a container module, so
`parameters()` and `.to()` see it. Under ZeRO-3 a trainable parameter's slot holds
only this dp rank's slice of its tp shard (`DpSlices`); `tp_local` and friends give
the tp shard back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from autopar.capture import TracedModel
from autopar.codegen.params import shard_tensor
from autopar.codegen.zero import DP_AXIS
from autopar.errors import PlanError
from autopar.ops import Axis
from autopar.ops.zero import all_gather_slices, dp_slice
from autopar.placement import Placement, Replicate
from autopar.runtime.groups import all_reduce_coalesced


@dataclass(frozen=True)
class DpSlices:
    """ZeRO-3 over a dp group: each rank stores 1/size of every trainable tp shard."""

    group: dist.ProcessGroup | None
    rank: int
    size: int


def dp_axes(sliced: DpSlices | None) -> dict[str, Axis]:
    """The mesh axis the generated code's ZeRO-3 gathers name, bound to the dp group."""
    if sliced is None:
        return {}
    return {DP_AXIS: Axis(DP_AXIS, sliced.group, sliced.size, sliced.rank)}


@dataclass
class Slot:
    """One stored tensor: its canonical name, container, placement and global shape
    (`sliced`: under ZeRO-3, the stored tensor is this dp rank's slice of its tp shard,
    `tp_shape`)."""

    name: str  # canonical FQN in the original model
    owner: nn.Module
    attr: str
    placement: Placement
    shape: torch.Size
    is_parameter: bool
    sliced: DpSlices | None = None
    tp_shape: torch.Size | None = None

    def local(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)


def tp_local(slot: Slot, grad: bool = False) -> torch.Tensor | None:
    """The slot's tp shard (or its gradient; None if it has none), gathered over dp under
    ZeRO-3 (every rank of the dp group calls it)."""
    value = slot.local().grad if grad else slot.local()
    if slot.sliced is None or value is None:  # the same on every rank: one graph
        return value
    return gather_slices(value, slot.sliced, slot.tp_shape)


def gather_slices(value: torch.Tensor, sliced: DpSlices, shape) -> torch.Tensor:
    """The tensor of `shape` whose dp slices the ranks of `sliced` hold (this one: `value`)."""
    return all_gather_slices([value], [shape], sliced.group, sliced.size)[0]


def load_tp_local(slot: Slot, value: torch.Tensor) -> None:
    """Store `value`, the slot's tp shard, in the slot (its dp slice, under ZeRO-3)."""
    if slot.sliced is not None:
        value = dp_slice(value, slot.sliced.rank, slot.sliced.size)
    with torch.no_grad():
        slot.local().copy_(value)


def sliced_placeholders(traced: TracedModel, model: nn.Module) -> list[str]:
    """The placeholders ZeRO-3 feeds with dp slices: every trainable parameter's."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return [name for name, fqn in traced.param_fqns.items() if named[fqn].requires_grad]


def tensors_by_id(model: nn.Module) -> dict[int, tuple[str, torch.Tensor, bool]]:
    """id(tensor) -> (canonical FQN, tensor, is_parameter), in the model's order."""
    found: dict[int, tuple[str, torch.Tensor, bool]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), (name, param, True))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        found.setdefault(id(buffer), (name, buffer, False))
    return found


def tensor_placements(
    traced: TracedModel, graph_module: fx.GraphModule, model: nn.Module
) -> dict[int, Placement]:
    """id(original tensor) -> placement, from the placeholders that use it."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    fqns = {**traced.param_fqns, **traced.buffer_fqns}
    chosen: dict[int, tuple[Placement, str]] = {}
    for node in graph_module.graph.find_nodes(op="placeholder"):
        if node.name not in fqns or not node.users:
            continue
        placement = node.meta.get("placement", Replicate())
        key = id(named[fqns[node.name]])
        previous = chosen.setdefault(key, (placement, node.name))
        if previous[0] != placement:
            raise PlanError(
                f"tied tensor {fqns[node.name]} is placed {placement} at {node.name} but "
                f"{previous[0]} at {previous[1]}; tied parameters need one placement"
            )
    return {key: placement for key, (placement, _) in chosen.items()}


def _container(root: nn.Module, path: list[str]) -> nn.Module:
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root


def build_slots(
    traced: TracedModel,
    graph_module: fx.GraphModule,
    model: nn.Module,
    root: nn.Module,
    rank: int,
    num_shards: int,
    device: torch.device | None,
    keep: set[int] | None = None,
    sliced: DpSlices | None = None,
) -> dict[int, Slot]:
    """Register this rank's shard of every model tensor under `root`; id(original) -> Slot.

    `keep` limits this to the tensors with those ids (a pipeline rank holds only the
    state of its own stages); `sliced` (ZeRO-3) stores trainable parameters as dp slices.
    """
    placements = tensor_placements(traced, graph_module, model)
    persistent = set(model.state_dict().keys())
    slots = {}
    for key, (name, tensor, is_parameter) in tensors_by_id(model).items():
        if keep is not None and key not in keep:
            continue
        placement = placements.get(key, Replicate())
        local = _local_data(tensor, placement, rank, num_shards, device)
        *path, attr = name.split(".")
        owner = _container(root, path)
        slices = sliced if is_parameter and tensor.requires_grad else None
        tp_shape = local.shape
        if slices is not None:
            local = dp_slice(local, slices.rank, slices.size)
        if is_parameter:
            owner.register_parameter(attr, nn.Parameter(local, tensor.requires_grad))
        else:
            owner.register_buffer(attr, local, persistent=name in persistent)
        slots[key] = Slot(name, owner, attr, placement, tensor.shape, is_parameter, slices,
                          tp_shape)  # fmt: skip
    return slots


def _local_data(tensor, placement, rank, num_shards, device) -> torch.Tensor:
    if tensor.device.type == "meta":  # planned without memory: values come from a state dict
        full = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        shape = shard_tensor(full, placement, rank, num_shards).shape
        return torch.empty(shape, dtype=tensor.dtype, device=device or "cpu")
    local = shard_tensor(tensor, placement, rank, num_shards)
    return local.to(device) if device is not None else local


def read_params(feeds: list, nodes: list[fx.Node]) -> list[nn.Parameter]:
    """The parameters that feed placeholders `nodes` which the graph reads, each once
    (a graph accumulates a parameter's gradient once per backward pass)."""
    found = {
        id(feed.local()): feed.local()
        for feed, node in zip(feeds, nodes, strict=True)
        if isinstance(feed, Slot) and feed.is_parameter and node.users
    }
    return list(found.values())


def partial_grad_slots(traced, graph_module: fx.GraphModule, model, slots) -> list[Slot]:
    """The slots of the parameters whose gradients the graph leaves as partial sums over tp
    (codegen's `meta["partial_grads"]`), among those this rank holds."""
    named = dict(model.named_parameters(remove_duplicate=False))
    names = graph_module.meta.get("partial_grads", ())
    keys = dict.fromkeys(id(named[traced.param_fqns[n]]) for n in names)  # one order, all ranks
    return [slots[key] for key in keys if key in slots]


def sum_grads(held: list[Slot], group) -> None:
    """Sum the gradients of `held` over `group` in place of each (one all-reduce per dtype);
    every rank of the group passes the same slots in the same order."""
    params = [slot.local() for slot in held if slot.local().grad is not None]
    if params and dist.is_initialized() and dist.get_world_size(group) > 1:
        summed = all_reduce_coalesced([p.grad for p in params], group)
        for param, grad in zip(params, summed, strict=True):
            param.grad = grad
