"""Device topology: the devices a plan runs on and what moving bytes between them costs.

A Mesh is a two-level hierarchy: `nodes` machines of `devices_per_node`
devices each. Devices in a node share a fast link (NVLink), nodes a slower one
(InfiniBand). Every constant is a field, so a user overrides any of them with
`dataclasses.replace`, and the whole value serializes into plan files.

Link model. Bandwidths are per-device *bus bandwidths* as nccl-tests reports
them, and collectives are priced by `cost.comm`'s alpha-beta model on the
slowest link a group spans:

- all ranks in one node: `intra_node_bw`, `intra_node_latency`;
- ranks on several nodes: `inter_node_latency`, and the bandwidth one NIC gives
  (`inter_node_bw`) times the NICs the group drives in parallel. DGX A100 and
  DGX H100 nodes have one InfiniBand NIC per GPU on a rail-optimized fabric, and
  NCCL runs one ring per NIC, so a group with k ranks on each of its nodes moves
  data over k NICs at once: bus bandwidth min(k * inter_node_bw, intra_node_bw),
  with k the fewest group ranks any of its nodes holds. A data-parallel group
  of one rank per node (tp = 8) thus sees one NIC, 23 GB/s on A100 HDR, while a
  16-rank group over two whole nodes sees eight, about 185 GB/s, which is what
  nccl-tests measures for such a group. Disjoint groups use disjoint NICs, so
  the dp groups of different tp ranks do not slow each other down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from autopar.cost import comm
from autopar.cost.comm import CollectiveFit
from autopar.cost.sharing import core_share
from autopar.errors import AutoparError
from autopar.profile import (
    LOSS_KEY,
    LocalConstants,
    default_calibration_path,
    load_calibration,
    local_constants,
    physical_memory_bytes,
)

# Share of datasheet peak a large bf16 matmul sustains. Megatron-LM sustains 52%
# of A100 peak end to end on a 1T-parameter GPT, communication and pipeline
# bubble included (Narayanan et al., SC'21, sec. 5.1); isolated large GEMMs run
# at 70-80% (NVIDIA, "Matrix Multiplication Background User's Guide"). Per-op
# compute excludes communication and bubbles, so it sits between the two.
DEFAULT_MATMUL_EFFICIENCY = 0.65
# The same for a large, aligned product once its shape is priced (cost/gemm.py): fit to
# the published runs (docs/cost-model.md, "Fit to published runs").
GPU_MATMUL_EFFICIENCY = 0.70

GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: peak rates at the training dtype and memory size."""

    name: str
    peak_flops: float  # FLOP/s, dense, at the training dtype
    memory_bandwidth: float  # bytes/s
    memory_bytes: int
    matmul_efficiency: float = DEFAULT_MATMUL_EFFICIENCY
    # A matmul's shape against the GPU's output tiles and inner-loop fill (cost/gemm.py);
    # 1 and 0: every shape at `matmul_efficiency` (CPU ranks, test devices).
    matmul_tile: int = 1
    matmul_fill: int = 0
    dtype_bytes: int = 2
    # Fixed cost of running one graph node, forward and its backward, whatever its size:
    # eager PyTorch's dispatch on a CPU rank (measured by `autopar calibrate`); 0 for the
    # GPU presets, whose launches overlap the kernels before them.
    op_overhead_s: float = 0.0
    backward_op_overhead_s: float = 0.0
    # (logits bytes, seconds per byte) of a cross-entropy forward and backward, measured
    # by `autopar calibrate` on CPU ranks (cost/loss.py); () prices the loss's passes on
    # the roofline (the GPU presets).
    loss_seconds_per_byte: tuple[tuple[float, float], ...] = ()
    # bytes/s of the optimizer step's traffic (cost/compute.py's `optimizer_seconds`),
    # measured by `autopar calibrate` on CPU ranks, where torch.optim's in-place updates
    # streamed three times as fast as the out-of-place ops `memory_bandwidth` is
    # measured on (34 against 11 GB/s on a 2-core VM);
    # None: `memory_bandwidth` (the GPU presets' fused optimizers run at it).
    optimizer_bandwidth: float | None = None

    def __post_init__(self) -> None:
        curve = tuple((float(n), float(s)) for n, s in self.loss_seconds_per_byte)
        object.__setattr__(self, "loss_seconds_per_byte", tuple(sorted(curve)))
        _check_positive(
            f"DeviceSpec {self.name!r}",
            peak_flops=self.peak_flops,
            memory_bandwidth=self.memory_bandwidth,
            memory_bytes=self.memory_bytes,
            dtype_bytes=self.dtype_bytes,
        )
        if self.optimizer_bandwidth is not None:
            _check_positive(
                f"DeviceSpec {self.name!r}", optimizer_bandwidth=self.optimizer_bandwidth
            )
        if self.op_overhead_s < 0 or self.backward_op_overhead_s < 0:
            raise AutoparError(
                f"DeviceSpec {self.name!r}: op_overhead_s={self.op_overhead_s}, "
                f"backward_op_overhead_s={self.backward_op_overhead_s} cannot be negative"
            )
        if not 0 < self.matmul_efficiency <= 1:
            raise AutoparError(
                f"DeviceSpec {self.name!r}: matmul_efficiency={self.matmul_efficiency} "
                "must be a fraction of peak in (0, 1]"
            )


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """`nodes` x `devices_per_node` devices and the links between them (see module doc)."""

    nodes: int = 1
    devices_per_node: int = 8
    device: DeviceSpec
    intra_node_bw: float  # bus bandwidth in bytes/s inside a node
    inter_node_bw: float  # bus bandwidth in bytes/s of one device's NIC across nodes
    intra_node_latency: float  # seconds per ring step inside a node
    inter_node_latency: float  # seconds per ring step across nodes
    # A node's ranks that share its cores (more ranks than cores) compute faster while
    # some of them wait, up to this factor over `device`'s rates, which are those of all
    # ranks busy at once (cost/sharing.py); 1 for devices with compute of their own.
    idle_speedup: float = 1.0
    # The attention core runs as torch's CPU kernel on the ranks' own cores (a calibrated
    # CPU mesh): its flash backward and per-score softmax work are priced
    # (cost/attention.py). False on the presets: their fit prices its two matmuls.
    eager_attention: bool = False
    # Measured alpha-beta per collective kind and group size inside a node (`autopar
    # calibrate`); they replace the intra-node link's constants for that kind and size.
    collective_fits: tuple[CollectiveFit, ...] = ()

    def __post_init__(self) -> None:
        _check_positive(
            "Mesh",
            nodes=self.nodes,
            devices_per_node=self.devices_per_node,
            intra_node_bw=self.intra_node_bw,
            inter_node_bw=self.inter_node_bw,
        )
        if not self.idle_speedup >= 1:
            raise AutoparError(
                f"Mesh: idle_speedup={self.idle_speedup} must be at least 1 (a rank never "
                "computes slower because its peers wait)"
            )
        fits = tuple(f if isinstance(f, CollectiveFit) else CollectiveFit(**f)
                     for f in self.collective_fits)  # fmt: skip
        object.__setattr__(self, "collective_fits", fits)
        if self.intra_node_latency < 0 or self.inter_node_latency < 0:
            raise AutoparError(
                f"Mesh: intra_node_latency={self.intra_node_latency}, inter_node_latency="
                f"{self.inter_node_latency}: latencies cannot be negative"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """The node holding global `rank` (ranks fill nodes in order)."""
        if not 0 <= rank < self.world_size:
            raise AutoparError(
                f"rank {rank} is outside this mesh of world_size={self.world_size} "
                f"(ranks 0..{self.world_size - 1})"
            )
        return rank // self.devices_per_node

    # -- communication -------------------------------------------------------

    def collective_time(self, kind: str, nbytes: float, ranks: Iterable[int]) -> float:
        """Seconds for a `kind` collective of `nbytes` (full size) among global `ranks`."""
        group = tuple(ranks)
        self._check_group(group)
        per_node = Counter(rank // self.devices_per_node for rank in group)
        bandwidth, latency = self._link(kind, len(group), len(per_node), min(per_node.values()))
        return comm.collective_time(kind, nbytes, len(group), bandwidth, latency)

    def tp_collective_time(self, kind: str, nbytes: float, group_size: int) -> float:
        """`collective_time` for ranks 0..group_size-1, in O(1): the solver's hot path."""
        if not 1 <= group_size <= self.world_size:
            raise AutoparError(
                f"group_size={group_size} must be between 1 and world_size={self.world_size}"
            )
        full_nodes, rest = divmod(group_size, self.devices_per_node)
        num_nodes, fewest = full_nodes + (rest > 0), rest or self.devices_per_node
        bandwidth, latency = self._link(kind, group_size, num_nodes, fewest)
        return comm.collective_time(kind, nbytes, group_size, bandwidth, latency)

    def _link(self, kind: str, num_ranks: int, num_nodes: int, min_ranks_per_node: int):
        """(bus bandwidth, latency) of a `kind` collective among `num_ranks` ranks spanning
        `num_nodes` nodes: a measured fit for that kind and size inside a node, if any."""
        if num_nodes == 1:
            for fit in self.collective_fits:
                if (fit.kind, fit.num_ranks) == (kind, num_ranks):
                    return fit.bus_bw, fit.latency
            return self.intra_node_bw, self.intra_node_latency
        bandwidth = min(self.inter_node_bw * min_ranks_per_node, self.intra_node_bw)
        return bandwidth, self.inter_node_latency

    def _check_group(self, group: tuple[int, ...]) -> None:
        if not group:
            raise AutoparError("a collective needs at least one rank; got an empty rank list")
        outside = [r for r in group if not 0 <= r < self.world_size]
        if outside:
            raise AutoparError(
                f"ranks {outside} are outside this mesh of world_size={self.world_size} "
                f"(ranks 0..{self.world_size - 1})"
            )
        if len(set(group)) != len(group):
            repeated = sorted(r for r, c in Counter(group).items() if c > 1)
            raise AutoparError(f"ranks {repeated} appear more than once in the group {group}")

    # -- construction ----------------------------------------------------------

    @classmethod
    def preset(cls, name: str, nodes: int = 1) -> Mesh:
        """`nodes` standard 8-GPU nodes: "a100-40gb", "a100-80gb" or "h100-80gb"."""
        if name not in _PRESETS:
            raise AutoparError(
                f"unknown mesh preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}"
            )
        return dataclasses.replace(_PRESETS[name], nodes=nodes)

    @classmethod
    def from_string(cls, text: str) -> Mesh:
        """Parse the CLI's PRESET[:NODES] (e.g. "a100-80gb:2"), or local:WORLD_SIZE."""
        name, colon, count = text.partition(":")
        valid = f"valid: {', '.join(PRESET_NAMES)} (each optionally :NODES), local:WORLD_SIZE"
        if name == "local" and count.isdecimal():
            return cls.local(int(count))
        if name not in _PRESETS or (colon and not count.isdecimal()):  # "a100-80gb:" too
            raise AutoparError(f"cannot read mesh {text!r}; {valid}")
        return cls.preset(name, nodes=int(count or 1))

    @classmethod
    def local(cls, world_size: int, calibration: str | os.PathLike | None = None) -> Mesh:
        """The `world_size` gloo ranks of this machine, one node.

        Constants come from `calibration` (a profile `autopar calibrate` wrote), else
        from the default calibration path if that file exists, else from
        conservative CPU defaults (`cpu_defaults`).
        """
        if world_size < 1:
            raise AutoparError(f"Mesh.local(world_size={world_size}): need at least one rank")
        if calibration is None and default_calibration_path().exists():
            calibration = default_calibration_path()
        if calibration is None:
            return _local_mesh(cpu_defaults(world_size), "cpu (uncalibrated defaults)")
        return cls.from_profile(calibration, world_size)

    @classmethod
    def from_profile(cls, path: str | os.PathLike, world_size: int | None = None) -> Mesh:
        """This machine's `world_size` ranks (default: as many as the profile measured)
        priced with the constants `autopar calibrate --out path` measured."""
        data = load_calibration(path)
        world_size = int(data["world_size"]) if world_size is None else world_size
        return _local_mesh(local_constants(data, world_size, str(path)), "cpu (calibrated)")

    # -- serialization -------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe description; `Mesh.from_dict` reads it back."""
        data = dataclasses.asdict(self)
        data["collective_fits"] = list(data["collective_fits"])
        data["device"]["loss_seconds_per_byte"] = [
            list(p) for p in self.device.loss_seconds_per_byte
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Mesh:
        try:
            fields = {k: v for k, v in data.items() if k != "device"}
            return cls(device=DeviceSpec(**data["device"]), **fields)
        except (KeyError, TypeError, AttributeError) as exc:
            names = [f.name for f in dataclasses.fields(cls)]
            raise AutoparError(
                f"malformed mesh description ({exc}); expected keys {names} with `device` "
                f"holding {[f.name for f in dataclasses.fields(DeviceSpec)]}"
            ) from None

    def fingerprint(self) -> str:
        """sha256 of the description: plan files use it to notice a different mesh."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        """One line for people."""
        d = self.device
        text = (
            f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.devices_per_node} "
            f"{d.name} ({_si(d.peak_flops, 'FLOP/s')}, {d.memory_bytes / GiB:.0f} GiB each); "
            f"intra-node {_si(self.intra_node_bw, 'B/s')}, {self.intra_node_latency * 1e6:.3g} us"
        )
        if self.nodes > 1:
            text += (
                f"; inter-node {_si(self.inter_node_bw, 'B/s')} per device, "
                f"{self.inter_node_latency * 1e6:.3g} us"
            )
        return text


def _local_mesh(constants: LocalConstants, name: str) -> Mesh:
    """One node of ranks sharing this machine's cores and memory; each rank's rates are
    what it measured with all of them busy. The measured matmul rate is what the machine
    sustains, so efficiency is 1. CPU training runs in fp32."""
    world_size, compute = constants.world_size, constants.compute
    device = DeviceSpec(
        name=name,
        peak_flops=compute["matmul_flops"],
        memory_bandwidth=compute["memory_bandwidth"],
        memory_bytes=constants.memory_bytes // world_size,
        matmul_efficiency=1.0,
        dtype_bytes=4,
        op_overhead_s=compute["op_overhead_s"],
        backward_op_overhead_s=compute["backward_op_overhead_s"],
        loss_seconds_per_byte=compute.get(LOSS_KEY, ()),  # none in `cpu_defaults`
        optimizer_bandwidth=compute.get("optimizer_bandwidth"),  # none in `cpu_defaults`
    )
    fits = tuple(
        CollectiveFit(kind, ranks, bus_bw, latency)
        for (kind, ranks), (bus_bw, latency) in sorted(constants.collectives.items())
    )
    whole = constants.collectives.get(("all_reduce", world_size), _CPU_LINK)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device,
        intra_node_bw=whole[0], inter_node_bw=whole[0],
        intra_node_latency=whole[1], inter_node_latency=whole[1],
        idle_speedup=constants.idle_speedup, collective_fits=fits,
        eager_attention=constants.cpu_ranks,
    )  # fmt: skip


# gloo over loopback TCP, uncalibrated: all-reduce bus bandwidth and latency per step,
# below the 0.9-1.2 GB/s and 70-200 us `autopar calibrate` measured on a 2-core cloud VM
_CPU_LINK = (0.5e9, 200e-6)


def cpu_defaults(world_size: int) -> LocalConstants:
    """Conservative constants for an uncalibrated CPU machine, each below what `autopar
    calibrate` measured on a 2-core cloud VM (docs/cost-model.md): a quarter of one AVX2
    core's fp32 peak (2 FMA units x 8 lanes x 2 FLOP x 3 GHz = 96 GFLOP/s) per core,
    40% of one DDR4-3200 channel (25.6 GB/s), 20 us per node and as much for its
    backward; ranks beyond the cores share them."""
    share = core_share(world_size, os.cpu_count() or 1)
    compute = {
        "matmul_flops": 25e9 * share, "memory_bandwidth": 10e9 / world_size,
        "op_overhead_s": 20e-6, "backward_op_overhead_s": 20e-6,
    }  # fmt: skip
    return LocalConstants(
        world_size, compute, idle_speedup=1 / share, collectives={},
        memory_bytes=physical_memory_bytes(), source="defaults",
    )  # fmt: skip


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def _check_positive(what: str, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise AutoparError(f"{what}: {listed}; each must be positive")


def _dgx(device: DeviceSpec, nvlink_bw: float, nic_bw: float) -> Mesh:
    """One 8-GPU node. Latencies are NCCL's per-ring-step figures (src/graph/tuning.cc,
    hwLat, LL128 protocol): about 1.9 us over NVLink and 4 us over the network."""
    return Mesh(
        nodes=1,
        devices_per_node=8,
        device=device,
        intra_node_bw=nvlink_bw,
        inter_node_bw=nic_bw,
        intra_node_latency=2e-6,
        inter_node_latency=4e-6,
    )


# A100 SXM4 (NVIDIA A100 datasheet): 312 TFLOP/s dense bf16; HBM2 1,555 GB/s
# (40GB) or HBM2e 2,039 GB/s (80GB). NVLink 3 gives 300 GB/s per direction;
# nccl-tests all-reduce in a DGX A100 reaches about 230 GB/s bus bandwidth.
# Across nodes one 200 Gb/s HDR NIC per GPU (DGX A100 user guide): 25 GB/s line
# rate, about 23 GB/s through NCCL, so 8 NICs give ~185 GB/s bus bandwidth
# (~95 GB/s all-reduce algorithm bandwidth, the "85-100 GB/s per node" often quoted).
_A100_NVLINK_BW = 230e9
_HDR_NIC_BW = 23e9
# H100 SXM5 (NVIDIA H100 datasheet): 989 TFLOP/s dense bf16 (1,979 with
# sparsity), HBM3 3.35 TB/s. NVLink 4 gives 450 GB/s per direction; nccl-tests
# all-reduce reaches about 370 GB/s bus bandwidth without NVLink SHARP (~480
# with it, for all-reduce only). Across nodes one 400 Gb/s NDR NIC per GPU
# (DGX H100 user guide): 50 GB/s line rate, about 46 GB/s through NCCL.
_H100_NVLINK_BW = 370e9
_NDR_NIC_BW = 46e9

# cuBLAS's and CUTLASS's large bf16 tensor-core kernels on A100 and H100 tile the output
# 128 x 128 per thread block and step through k in 32- to 64-wide slices over a 3- to
# 4-stage software pipeline (NVIDIA, "Matrix Multiplication Background User's Guide";
# CUTLASS's default Sm80 GEMM configurations): `GPU_MATMUL_FILL` is the k a block loads
# before its first multiply and drains after its last (cost/gemm.py).
GPU_MATMUL_TILE = 128
GPU_MATMUL_FILL = 128


def _gpu(name: str, peak_flops: float, memory_bandwidth: float, memory_bytes: int) -> DeviceSpec:
    return DeviceSpec(
        name, peak_flops, memory_bandwidth, memory_bytes,
        matmul_efficiency=GPU_MATMUL_EFFICIENCY, matmul_tile=GPU_MATMUL_TILE,
        matmul_fill=GPU_MATMUL_FILL,
    )  # fmt: skip


_PRESETS = {
    "a100-40gb": _dgx(
        _gpu("A100-SXM4-40GB", 312e12, 1.555e12, 40 * GiB), _A100_NVLINK_BW, _HDR_NIC_BW
    ),
    "a100-80gb": _dgx(
        _gpu("A100-SXM4-80GB", 312e12, 2.039e12, 80 * GiB), _A100_NVLINK_BW, _HDR_NIC_BW
    ),
    "h100-80gb": _dgx(
        _gpu("H100-SXM5-80GB", 989e12, 3.35e12, 80 * GiB), _H100_NVLINK_BW, _NDR_NIC_BW
    ),
}
PRESET_NAMES = tuple(_PRESETS)
