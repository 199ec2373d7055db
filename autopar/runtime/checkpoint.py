"""Sharded checkpoints with torch.distributed.checkpoint (DCP), loadable into any plan.

    autopar.save_checkpoint(path, pm, optimizer, extra={"step": step})  # every rank calls it
    extra = autopar.load_checkpoint(path, pm, optimizer)  # any plan of the same model

A checkpoint is a DCP directory keyed by the single-device model, not by the plan:

    model.<state_dict key>            the tensor at its full shape (tied aliases too)
    optim.state.<parameter>.<name>    each optimizer state tensor (exp_avg, step, ...)
    optim.param_groups                the optimizer's hyperparameters per group (JSON)
    extra                             the caller's JSON-serializable values

Every rank writes its own chunks in parallel: a tensor sharded on tp (`Shard(dim)`,
padding dropped) is a DTensor on the tp axis of the device mesh, so each tp rank
writes its chunk; replicated tensors are plain tensors, and DCP lets one of the ranks
that hold a chunk (a dp replica, a pipeline stage holding a tied weight) write it.
Two layouts are stored in the single-device layout instead: a block-interleaved
shard `Shard(dim, groups)` (a fused QKV projection; its chunks are not one
rectangle of the full tensor), all-gathered over tp before saving and cut locally
after loading; and under ZeRO the optimizer states (under ZeRO-3 the parameters
too), whose dp slices are flat ranges of the tp shard, all-gathered over dp into the
tp shard's shape. Loading reads the
chunks each rank's new layout needs, so another dp, tp, pp or world size gets the
same numbers.

`pm.state_dict()` / `pm.load_state_dict(sd)` are the model half alone, for callers
who drive `dcp.save` / `dcp.load` themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard as TorchShard

from autopar.codegen.params import gather_full, shard_tensor
from autopar.errors import AutoparError
from autopar.ops.zero import dp_slice
from autopar.placement import Replicate
from autopar.runtime.state import DpSlices, Slot, gather_slices, load_tp_local, tp_local

Stored = torch.Tensor  # a DTensor on the tp axis, or a plain full tensor


def _placement(pm, slot: Slot):
    return slot.placement if pm.plan.tp > 1 else Replicate()


# --- one tensor: local shard <-> what DCP stores ------------------------------------------


def _stored(pm, slot: Slot, local: torch.Tensor, gather: bool = True) -> Stored:
    """`local` (laid out as `slot`'s tensor) as DCP stores it; `gather=False` for a buffer to
    load into (a grouped shard's full tensor left uninitialised, no collective)."""
    placement, shape = _placement(pm, slot), slot.shape
    local = local.detach()
    if isinstance(placement, Replicate):
        return local
    if placement.groups > 1:
        if not gather:
            return torch.empty(shape, dtype=local.dtype, device=local.device)
        return gather_full(local, placement, pm.groups.tp_group, shape)
    dim = placement.dim % len(shape)
    chunk = local.shape[dim]
    start = min(pm.groups.tp_rank * chunk, shape[dim])
    mine = local.narrow(dim, 0, min(chunk, shape[dim] - start))  # padding dropped
    return DTensor.from_local(
        mine, pm.groups.device_mesh["tp"], [TorchShard(dim)], run_check=False,
        shape=shape, stride=torch.empty(shape, device="meta").stride(),
    )  # fmt: skip


def _restore(pm, slot: Slot, stored: Stored, local: torch.Tensor) -> None:
    """Copy what DCP loaded into `stored` into this rank's `local` shard."""
    placement = _placement(pm, slot)
    with torch.no_grad():
        if isinstance(stored, DTensor):
            mine = stored.to_local()
            dim = placement.dim % local.dim()
            local.narrow(dim, 0, mine.shape[dim]).copy_(mine)
        else:
            local.copy_(shard_tensor(stored, placement, pm.groups.tp_rank, pm.plan.tp))


# --- the model --------------------------------------------------------------------------


def model_state_dict(pm) -> dict[str, Stored]:
    """This rank's part of the single-device state dict, for `dcp.save` (tp collectives for
    block-interleaved shards: every rank of a stage calls it)."""
    pm.gather_stepped_params()  # under ZeRO 1 and 2, the optimizer's last step
    return {
        name: _stored(pm, slot, tp_local(slot)) for name, slot in pm.part.state.held_slots().items()
    }


def _model_buffers(pm) -> dict[str, Stored]:
    return {
        name: _stored(pm, slot, _empty_tp_shard(slot), gather=False)
        for name, slot in pm.part.state.held_slots().items()
    }


def _empty_tp_shard(slot: Slot, dtype: torch.dtype | None = None) -> torch.Tensor:
    local = slot.local()
    return torch.zeros(_tp_shape(slot), dtype=dtype or local.dtype, device=local.device)


def load_model_state_dict(pm, state_dict: Mapping[str, Stored]) -> None:
    """Load what `dcp.load` read into a `pm.state_dict()` (of this plan or another's layout
    of the same keys: full tensors are cut here)."""
    slots = pm.part.state.held_slots()
    missing = sorted(set(slots) - set(state_dict))
    if missing:
        raise AutoparError(
            f"load_state_dict: missing keys {missing}; pass pm.state_dict() after dcp.load "
            "filled it (or use autopar.load_checkpoint)"
        )
    for name, slot in slots.items():
        local = _empty_tp_shard(slot)
        _restore(pm, slot, state_dict[name], local)
        load_tp_local(slot, local)
    if pm.shards is not None:
        pm.shards.reset_from_params()


# --- the optimizer ----------------------------------------------------------------------


def _optimized(pm) -> dict[int, tuple[Slot, DpSlices | None]]:
    """id(parameter the optimizer steps) -> (its slot, how it is sliced over dp or None):
    under ZeRO-3 the slots hold the slices; under ZeRO 1 and 2, `pm.shards` does."""
    by_param = {id(slot.local()): slot for slot in pm.part.state.held_slots().values()}
    if pm.shards is None:
        return {key: (slot, slot.sliced) for key, slot in by_param.items()}
    return {
        id(shard): (by_param[id(param)], pm.shards.slicing)
        for shard, param in zip(pm.shards.shards, pm.shards.params, strict=True)
    }


def _tp_shape(slot: Slot) -> torch.Size:
    """The shape of this rank's tp shard of `slot`'s tensor."""
    return slot.tp_shape if slot.tp_shape is not None else slot.local().shape


def _tp_local(slot: Slot, sliced: DpSlices | None, value: torch.Tensor) -> torch.Tensor:
    """A state tensor of a dp slice, all-gathered over dp into the tp shard's shape."""
    return value if sliced is None else gather_slices(value, sliced, _tp_shape(slot))


def _is_per_element(value, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0


def optimizer_state_dict(pm, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by the single-device parameter names (collectives under
    ZeRO and for block-interleaved shards: every rank calls it)."""
    optimized = _optimized(pm)
    state: dict[str, dict] = {}
    for param in _params(optimizer):
        slot, sliced = _slot_of(optimized, param)
        entry = {}
        for key, value in optimizer.state.get(param, {}).items():
            if _is_per_element(value, param):
                local = _tp_local(slot, sliced, value)
                entry[key] = _stored(pm, slot, local)
            else:
                entry[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        if entry:
            state[slot.name] = entry
    return {"state": state, "param_groups": _hyperparameters(optimizer)}


def _params(optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def _slot_of(optimized, param) -> tuple[Slot, DpSlices | None]:
    if id(param) not in optimized:
        raise AutoparError(
            "the optimizer steps a tensor that is not one of pm.parameters(); build it "
            "as torch.optim.AdamW(pm.parameters(), ...) after autopar.parallelize"
        )
    return optimized[id(param)]


def _hyperparameters(optimizer) -> str:
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        return json.dumps(groups, default=lambda v: v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError) as error:
        raise AutoparError(
            f"the optimizer's hyperparameters do not convert to JSON ({error}); "
            "keep them numbers, strings, booleans and lists"
        ) from error


def _optimizer_buffers(pm, optimizer, metadata) -> dict:
    """What `dcp.load` fills: the state tensors the checkpoint has for this rank's parameters."""
    stored, optimized = metadata.state_dict_metadata, _optimized(pm)
    state: dict[str, dict] = {}
    for param in _params(optimizer):
        slot, _ = _slot_of(optimized, param)
        prefix = f"optim.state.{slot.name}."
        entry = {}
        for fqn, md in stored.items():
            key = fqn[len(prefix) :]
            if not fqn.startswith(prefix) or "." in key:
                continue
            if isinstance(md, BytesStorageMetadata):
                entry[key] = None
            elif md.size == slot.shape and len(md.size) > 0:
                local = _empty_tp_shard(slot, md.properties.dtype)
                entry[key] = _stored(pm, slot, local, gather=False)
            else:
                entry[key] = torch.empty(md.size, dtype=md.properties.dtype)
        if entry:
            state[slot.name] = entry
    return {"state": state, "param_groups": ""}


def load_optimizer_state_dict(pm, optimizer, state_dict: Mapping) -> None:
    """Put loaded state into `optimizer` (built on this pm's parameters)."""
    optimized = _optimized(pm)
    for param in _params(optimizer):
        slot, sliced = _slot_of(optimized, param)
        entry = state_dict["state"].get(slot.name)
        if entry is not None:
            optimizer.state[param] = {
                key: _local_state(pm, slot, sliced, value) for key, value in entry.items()
            }
    _load_hyperparameters(optimizer, state_dict["param_groups"])


def _local_state(pm, slot: Slot, sliced: DpSlices | None, value):
    """A loaded state value as this rank's optimizer keeps it: a per-element state cut to
    the tp shard (and to the dp slice under ZeRO); anything else as it was saved."""
    per_element = isinstance(value, DTensor) or (
        isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == slot.shape
    )
    if not per_element:
        return value
    local = _empty_tp_shard(slot, value.dtype)
    _restore(pm, slot, value, local)
    return local if sliced is None else dp_slice(local, sliced.rank, sliced.size)


def _load_hyperparameters(optimizer, text: str) -> None:
    groups = json.loads(text)
    if len(groups) != len(optimizer.param_groups):
        raise AutoparError(
            f"the checkpoint's optimizer has {len(groups)} parameter groups, this one "
            f"{len(optimizer.param_groups)}; build the optimizer with the same groups"
        )
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        for key, value in saved.items():
            current = group.get(key)
            group[key] = tuple(value) if isinstance(current, tuple) else value


# --- files ------------------------------------------------------------------------------


def save_checkpoint(path, pm, optimizer=None, *, extra: Mapping | None = None) -> None:
    """Write `pm`'s model (and `optimizer`'s) state to the DCP directory `path`; every rank
    calls it, each writes its own chunks. `extra`: JSON-serializable values (a step count)."""
    state: dict = {"model": model_state_dict(pm)}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pm, optimizer)
    state["extra"] = _extra_text(extra)
    dcp.save(state, checkpoint_id=os.fspath(path))


def _extra_text(extra: Mapping | None) -> str:
    try:
        return json.dumps(dict(extra or {}))
    except (TypeError, ValueError) as error:
        raise AutoparError(
            f"save_checkpoint: extra= must be JSON-serializable ({error})"
        ) from error


def load_checkpoint(path, pm, optimizer=None) -> dict:
    """Load a checkpoint of the same model saved under any plan; returns its `extra`."""
    metadata = _read_metadata(path)
    _check_model(path, metadata, pm.part.state.state_shapes())
    state: dict = {"model": _model_buffers(pm), "extra": ""}
    if optimizer is not None:
        if "optim.param_groups" not in metadata.state_dict_metadata:
            raise AutoparError(
                f"the checkpoint at {path} holds no optimizer state; load it without optimizer="
            )
        state["optim"] = _optimizer_buffers(pm, optimizer, metadata)
    dcp.load(state, checkpoint_id=os.fspath(path))
    load_model_state_dict(pm, state["model"])
    if optimizer is not None:
        load_optimizer_state_dict(pm, optimizer, state["optim"])
    return json.loads(state["extra"])


def _read_metadata(path):
    if not os.path.isfile(os.path.join(os.fspath(path), ".metadata")):
        raise AutoparError(
            f"no checkpoint at {path} (a DCP directory with a .metadata file); "
            "write one with autopar.save_checkpoint(path, pm, optimizer)"
        )
    return dcp.FileSystemReader(os.fspath(path)).read_metadata()


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _check_model(path, metadata, shapes: dict[str, torch.Size]) -> None:
    stored = {
        fqn[len("model.") :]: md.size
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    problems = []
    if missing := sorted(set(shapes) - set(stored)):
        problems.append(f"{len(missing)} keys of the model missing ({_some(missing)})")
    if unexpected := sorted(set(stored) - set(shapes)):
        problems.append(f"{len(unexpected)} keys it does not have ({_some(unexpected)})")
    wrong = [
        f"{name}: stored {tuple(stored[name])}, model {tuple(shape)}"
        for name, shape in shapes.items()
        if name in stored and tuple(stored[name]) != tuple(shape)
    ]
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}")
    if problems:
        raise AutoparError(
            f"the checkpoint at {path} is not of this model: "
            + "; ".join(problems)
            + " (load a checkpoint saved from the same model, under any plan)"
        )


__all__ = [
    "load_checkpoint",
    "load_model_state_dict",
    "load_optimizer_state_dict",
    "model_state_dict",
    "optimizer_state_dict",
    "save_checkpoint",
]
