"""Process groups of the (pp, dp, tp) device mesh, and where this rank sits in it.

The layout matches the one the cost model assumes (solver/search.py): pp is the
outermost mesh axis, tp the innermost, so

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

and the tp ranks of one stage replica are neighbours (one node, fast links).
The groups come from `torch.distributed.device_mesh.init_device_mesh` and
inherit the default group's timeout, so a dead or stuck peer ends every
collective with an error instead of a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autopar.errors import AutoparError

AXES = ("pp", "dp", "tp")


@dataclass
class MeshGroups:
    """This rank's process group and coordinate on each mesh axis."""

    device_mesh: DeviceMesh
    device: torch.device
    pp: int
    dp: int
    tp: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    timeout: timedelta | None

    def describe(self) -> str:
        return (
            f"rank {dist.get_rank()} (pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}, "
            f"tp {self.tp_rank}/{self.tp})"
        )


def check_process_group(world_size: int) -> None:
    """AutoparError unless torch.distributed runs with exactly `world_size` ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        raise AutoparError(
            "autopar.parallelize needs an initialized torch.distributed process group: "
            "launch with torchrun (e.g. `torchrun --nproc-per-node 8 train.py`) and call "
            "torch.distributed.init_process_group() before parallelize"
        )
    actual = dist.get_world_size()
    if actual != world_size:
        raise AutoparError(
            f"the process group has world size {actual} but the mesh has world_size="
            f"{world_size}; launch {world_size} processes, or plan for a mesh of {actual} devices"
        )


def _device() -> torch.device:
    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _default_timeout(device: torch.device) -> timedelta | None:
    """The default group's timeout (torch has no public getter)."""
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        return backend.options._timeout
    except (AttributeError, RuntimeError):
        return None


def _backend_override(device: torch.device, timeout: timedelta | None) -> dict | None:
    """Options that give every mesh group the default group's timeout.

    Without them torch gives new groups its own default (30 minutes for gloo).
    """
    if timeout is None:
        return None
    if device.type == "cuda":
        backend, options = "nccl", dist.ProcessGroupNCCL.Options()
    else:
        backend, options = "gloo", dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return {axis: (backend, options) for axis in AXES}


def mesh_groups(pp: int, dp: int, tp: int) -> MeshGroups:
    """Build the (pp, dp, tp) device mesh over the initialized default group."""
    check_process_group(pp * dp * tp)
    device = _device()
    timeout = _default_timeout(device)
    device_mesh = init_device_mesh(
        device.type,
        (pp, dp, tp),
        mesh_dim_names=AXES,
        backend_override=_backend_override(device, timeout),
    )
    pp_rank, dp_rank, tp_rank = (device_mesh.get_local_rank(axis) for axis in AXES)
    pp_group, dp_group, tp_group = (device_mesh.get_group(axis) for axis in AXES)
    return MeshGroups(
        device_mesh, device, pp, dp, tp, pp_rank, dp_rank, tp_rank,
        pp_group, dp_group, tp_group, timeout,
    )  # fmt: skip


def all_reduce_coalesced(
    tensors: list[torch.Tensor], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Sum each tensor over `group` with one all-reduce per dtype; new tensors, same order."""
    results: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in indices:
            numel = tensors[i].numel()
            results[i] = flat[offset : offset + numel].view(tensors[i].shape).clone()
            offset += numel
    return results
