"""The model state this rank holds, seen as the single-device model's.

One place for what every runtime part answers, one pipeline stage or many: each
`model.state_dict()` key with its full shape, its full value and gradient on every
rank, a single-device state dict loaded into this rank's shards, and the gradient
sums the step needs besides dp's (partial sums over tp, tied copies over pp).

A tensor is held by the pp ranks whose stages read it (`HeldTensor.holders`; one
read by no stage, or with a single pp rank every tensor, stays with pp rank 0). The
first holder gathers it over tp and, with several pp ranks, broadcasts it over pp.
A parameter held on several pp ranks (GPT-2's tied embedding and LM head) gets the
sum of their gradients, so the copies see the same gradient and stay equal under any
optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from autopar.codegen import gather_full, shard_tensor
from autopar.errors import AutoparError
from autopar.ops import Axis
from autopar.ops.layout import padded
from autopar.placement import Placement, Replicate
from autopar.runtime.groups import all_reduce_coalesced
from autopar.runtime.state import (
    DpSlices,
    Slot,
    load_tp_local,
    sum_grads,
    tensor_placements,
    tensors_by_id,
    tp_local,
)


@dataclass(frozen=True)
class HeldTensor:
    """One parameter or buffer of the model, and the pipeline ranks that hold a copy."""

    key: int  # id() of the model's tensor
    name: str
    shape: torch.Size
    dtype: torch.dtype
    placement: Placement
    is_parameter: bool
    holders: tuple[int, ...]  # pp ranks, ascending; the first one answers for it

    def local_shape(self, tp_rank: int, tp_size: int) -> torch.Size:
        meta = torch.empty(self.shape, dtype=self.dtype, device="meta")
        return shard_tensor(meta, self.placement, tp_rank, tp_size).shape


def held_tensors(
    traced, graph_module, model: nn.Module, readers: Mapping[int, set[int]] | None = None
) -> dict[int, HeldTensor]:
    """Every model tensor (tied ones once), held by the pp ranks `readers` gives for its
    id (those whose stages read it), or by pp rank 0."""
    readers = readers or {}
    placements = tensor_placements(traced, graph_module, model)
    return {
        key: HeldTensor(
            key,
            name,
            tensor.shape,
            tensor.dtype,
            placements.get(key, Replicate()),
            is_parameter,
            tuple(sorted(readers.get(key, {0}))),
        )  # fmt: skip
        for key, (name, tensor, is_parameter) in tensors_by_id(model).items()
    }


class HeldState:
    """This rank's slots (`slots`: id(model tensor) -> Slot) as the model's state.

    `held` is every model tensor (`held_tensors`); `partial` the slots whose gradients
    the graphs leave as partial sums over tp; `pp` the pipeline axis (None: one pp
    rank, no pp collective); `sliced` ZeRO-3's dp slicing of trainable parameters.
    """

    def __init__(
        self, model: nn.Module, held: dict[int, HeldTensor], slots: dict[int, Slot],
        partial: list[Slot], tp: Axis, pp: Axis | None = None,
        device: torch.device | None = None, sliced: DpSlices | None = None,
    ):  # fmt: skip
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(model.named_buffers(remove_duplicate=False))
        # every state_dict key -> id of its tensor (tied aliases share one)
        self._keys = {key: id(named[key]) for key in model.state_dict() if key in named}
        self._held, self._slots, self._partial = held, slots, partial
        self._tp, self._pp, self._device, self._sliced = tp, pp, device, sliced
        self._pp_rank = 0 if pp is None else pp.rank

    def held_slots(self) -> dict[str, Slot]:
        """Every `model.state_dict()` key whose tensor this rank holds -> its slot."""
        return {name: self._slots[key] for name, key in self._keys.items() if key in self._slots}

    def state_shapes(self) -> dict[str, torch.Size]:
        """Every `model.state_dict()` key (held here or not) -> its full shape."""
        return {name: self._held[key].shape for name, key in self._keys.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device `state_dict()` on every rank (tied aliases included)."""
        full: dict[int, torch.Tensor] = {}
        result = {}
        for name, key in self._keys.items():
            if key not in full:
                held = self._held[key]
                full[key] = self._full(held, self._local(held))
            result[name] = full[key]
        return result

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full gradients of the parameters, keyed like `full_state_dict` (None: no grad)."""
        params = [h for h in self._held.values() if h.is_parameter]
        grads = [self._local(h, grad=True) for h in params]
        present = [grad is not None for grad in grads]
        if self._pp is not None:  # only the first holder knows
            flags = torch.tensor([float(p) for p in present], device=self._device)
            dist.all_reduce(flags, group=self._pp.group)
            present = [bool(flag) for flag in flags.tolist()]
        full = {
            held.key: self._full(held, grad) if flag else None
            for held, grad, flag in zip(params, grads, present, strict=True)
        }
        return {name: full[key] for name, key in self._keys.items() if key in full}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a single-device state dict, keeping this rank's shards of what it holds."""
        _check_state_dict(state_dict, {name: self._held[key] for name, key in self._keys.items()})
        tp = self._tp
        for name, key in self._keys.items():
            slot = self._slots.get(key)
            if slot is not None:
                load_tp_local(
                    slot, shard_tensor(state_dict[name], slot.placement, tp.rank, tp.size)
                )

    def sum_partial_grads(self) -> None:
        """Sum over tp the gradients the graphs leave partial (parameters whose Megatron f
        waits for the step); call once after the backward passes of a step."""
        sum_grads(self._partial, self._tp.group)

    def sum_tied_grads(self) -> None:
        """Sum over the pp ranks holding it the gradient of each parameter held on several."""
        tied = [h for h in self._held.values() if h.is_parameter and len(h.holders) > 1]
        if not tied:
            return
        pieces = []
        for held in tied:
            slot = self._slots.get(held.key)
            grad = slot.local().grad if slot is not None else None
            if grad is None:
                shape = self._stored_shape(held)
                grad = torch.zeros(shape, dtype=held.dtype, device=self._device)
            pieces.append(grad)
        summed = all_reduce_coalesced(pieces, self._pp.group)
        for held, grad in zip(tied, summed, strict=True):
            if held.key in self._slots:
                self._slots[held.key].local().grad = grad

    def _local(self, held: HeldTensor, grad: bool = False) -> torch.Tensor | None:
        """The first holder's tp shard of `held` (or its gradient); None elsewhere."""
        slot = self._slots.get(held.key)
        if slot is None or self._pp_rank != held.holders[0]:
            return None
        return tp_local(slot, grad)

    def _full(self, held: HeldTensor, local: torch.Tensor | None) -> torch.Tensor:
        """The full tensor on every rank: gathered over tp by the holders, sent from the first."""
        if local is not None:
            placement = held.placement if self._tp.size > 1 else Replicate()
            value = gather_full(local, placement, self._tp.group, held.shape).contiguous()
        else:
            value = torch.empty(held.shape, dtype=held.dtype, device=self._device)
        if self._pp is not None:
            dist.broadcast(value, group=self._pp.group, group_src=held.holders[0])
        return value

    def _stored_shape(self, held: HeldTensor) -> tuple[int, ...]:
        """What a holder of `held` stores: its tp shard, or under ZeRO-3 a dp slice of it."""
        shape = held.local_shape(self._tp.rank, self._tp.size)
        if self._sliced is None or not held.is_parameter:
            return tuple(shape)
        return (padded(shape.numel(), self._sliced.size) // self._sliced.size,)


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], held: dict[str, HeldTensor]) -> None:
    missing = [key for key in held if key not in state_dict]
    unexpected = [key for key in state_dict if key not in held]
    wrong = [
        f"{key}: got {tuple(state_dict[key].shape)}, expected {tuple(h.shape)}"
        for key, h in held.items()
        if key in state_dict and state_dict[key].shape != h.shape
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
