"""The Plan: a typed value, saved as plain JSON, that says how to run a model on a mesh.

It holds the parallel degrees, the schedule, for every node its placement on each
mesh axis (`PlanNode`, keyed by the node's stable name: module path, op and ordinal,
see autopar/normalize.py), the pipeline stages, the predicted costs and the
collectives that make them up, and fingerprints of the model graph and the mesh so
that a plan is never applied to a model or cluster it was not made for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autopar.cost.pricing import Collective
from autopar.errors import PlanError
from autopar.fileio import write_atomic
from autopar.placement import TP, NodePlacement
from autopar.plan.schema import check_fields, check_plan
from autopar.plan.summary import plan_summary

SCHEMA_VERSION = 3  # 3: node shapes; model, dtype, sequence length, global batch; p2p time

Shape = list[int] | list[list[int]] | None  # a tensor's, one per output of split, or none


@dataclass
class PlanNode:
    """One graph node: its op, the nodes it reads, its output shape (as traced: one
    replica's batch) and its placement on each mesh axis (an axis the plan does not
    split, such as tp at tp=1, is absent)."""

    op: str
    sources: list[str]
    placements: dict[str, NodePlacement]
    shape: Shape = None

    def output(self, axis: str = TP) -> str:
        """The printed placement of the output on `axis` ("R" where the axis is absent)."""
        placement = self.placements.get(axis)
        if placement is None:
            return "R"
        output = placement.output
        return str(output[0] if isinstance(output, tuple) else output)

    def to_dict(self) -> dict:
        placements = {axis: p.to_text() for axis, p in self.placements.items()}
        return {"op": self.op, "shape": self.shape, "sources": self.sources,
                "placements": placements}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> PlanNode:
        placements = {a: NodePlacement.from_text(p) for a, p in data["placements"].items()}
        return cls(data["op"], list(data["sources"]), placements, data["shape"])


@dataclass
class Cost:
    step_time_s: float
    compute_s: float
    comm_s: float
    bubble_s: float
    memory_per_device_bytes: float
    tflops_per_device: float
    optimizer_s: float = 0.0  # part of compute_s
    dp_sync_s: float = 0.0  # the data-parallel gradient all-reduce, part of comm_s
    tp_sync_s: float = 0.0  # parameter gradients summed over tp once per step, part of comm_s
    p2p_s: float = 0.0  # pipeline sends and receives of the slowest pp rank, part of comm_s
    # once per step, part of comm_s: tied parameters' gradients summed over pp, the loss's mean
    step_sync_s: float = 0.0


@dataclass
class Stage:
    index: int
    layers: list[int]  # transformer block indices in this stage
    nodes: list[str]  # graph nodes in this stage
    time_s: float  # predicted forward+backward time of one microbatch
    memory_bytes: float
    pp_rank: int = 0  # the pipeline rank running it (stages wrap around under interleaving)
    recompute: str = "none"  # "none", "selective" (the attention core) or "full" (each block)


@dataclass
class Plan:
    dp: int
    tp: int
    pp: int
    num_microbatches: int
    microbatch_size: int
    schedule: str
    strategies: dict[str, PlanNode]  # stable node name -> its placements per axis
    stages: list[Stage]
    cost: Cost
    collectives: list[Collective]
    unsupported_ops: list[str]
    model_fingerprint: str
    mesh: dict
    mesh_fingerprint: str
    solver: dict = field(default_factory=dict)  # status, solve time, ILP size
    layer_of: dict[str, int] = field(default_factory=dict)  # node -> block index
    param_fqns: dict[str, str] = field(default_factory=dict)  # placeholder -> parameter FQN
    tied_params: dict[str, str] = field(default_factory=dict)  # unused twin -> placeholder used
    unit_times_s: dict[str, float] = field(default_factory=dict)  # per microbatch, fwd + bwd
    sequence_parallel: bool = False  # normalizations split on the sequence dim over tp
    recompute: str = "none"  # the stages' recomputation, "mixed" when they differ
    zero: int = 0  # ZeRO over dp: 1 optimizer states sharded, 2 gradients too, 3 weights too
    model: str = ""  # what was planned: a built-in name, package.module:factory or a class
    dtype: str = ""  # the training dtype ("bfloat16"), or the mesh's default
    seq_len: int | None = None  # dim 1 of the first user input, when it has one
    global_batch_size: int = 0  # dp * microbatches * microbatch size
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        data = asdict(dataclasses.replace(self, strategies={}))  # nodes print their own way
        data["strategies"] = {name: node.to_dict() for name, node in self.strategies.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """The plan `data` holds, checked against the schema (`plan/schema.py`)."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported (this autopar reads "
                f"version {SCHEMA_VERSION}); plan the model again"
            )
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}  # fmt: skip
        check_fields(data, required)
        plan = cls(**{**data, **_parsed(data)})
        from autopar.solver.pipeline import SCHEDULES

        check_plan(plan, SCHEDULES)
        return plan

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash never leaves half a plan file behind."""
        write_atomic(path, readable_json(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as error:
            raise PlanError(f"no plan file at {path}") from error
        except json.JSONDecodeError as error:
            raise PlanError(f"{path} is not a plan file (invalid JSON: {error})") from error
        if not isinstance(data, dict):
            raise PlanError(f"{path} is not a plan file (expected a JSON object)")
        return cls.from_dict(data)

    def node_placements(self, axis: str = TP) -> dict[str, NodePlacement]:
        """Each node's placement on `axis`, for codegen (empty where the axis is absent)."""
        return {
            name: node.placements[axis]
            for name, node in self.strategies.items()
            if axis in node.placements
        }

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilization: model FLOP/s per device over the device's peak."""
        peak = self.mesh.get("device", {}).get("peak_flops")
        return self.cost.tflops_per_device * 1e12 / peak if peak else None

    @property
    def tp_splits_nothing(self) -> bool:
        """tp > 1, yet every node is replicated on it: each tp rank computes everything."""
        return self.tp > 1 and all(p.is_replicated for p in self.node_placements(TP).values())

    def check_applies_to(self, model_fingerprint: str, mesh_fingerprint: str | None = None):
        if model_fingerprint != self.model_fingerprint:
            raise PlanError(
                "this plan was made for a different model graph (fingerprint "
                f"{self.model_fingerprint[:12]} vs {model_fingerprint[:12]}); plan this model "
                "with autopar.plan(...) or pass the model the plan was made for"
            )
        if mesh_fingerprint is not None and mesh_fingerprint != self.mesh_fingerprint:
            raise PlanError(
                "this plan was made for a different mesh; plan again for this mesh "
                f"(plan: {self.mesh.get('description', self.mesh_fingerprint[:12])})"
            )

    def summary(self) -> str:
        return plan_summary(self)

    def to_torch(self):
        """This plan as torch's `parallelize_module` plan and pipeline split points, with
        what they cannot express listed (`TorchPlan`, plan/torch_export.py)."""
        from autopar.plan.torch_export import to_torch

        return to_torch(self)


def _parsed(data: dict) -> dict:
    """The nested values of a plan file as their types; PlanError naming what is wrong."""
    parsed = {"strategies": {}}
    for name, entry in data["strategies"].items():
        try:
            parsed["strategies"][name] = PlanNode.from_dict(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanError(
                f"plan field strategies[{name!r}] is malformed: {_why(error)}"
            ) from None
    for key, build in (("stages", Stage), ("collectives", Collective)):
        try:
            parsed[key] = [build(**entry) for entry in data[key]]
        except TypeError as error:
            raise PlanError(f"plan field {key} is malformed: {error}") from None
    try:
        parsed["cost"] = Cost(**data["cost"])
    except TypeError as error:
        raise PlanError(f"plan field cost is malformed: {error}") from None
    return parsed


def _why(error: Exception) -> str:
    return f"missing {error}" if isinstance(error, KeyError) else str(error)


def readable_json(value, indent: str = "", width: int = 100) -> str:
    """JSON that reads: a value that fits in `width` on one line, else one key (or list
    entry) per line, and long lists of plain values packed into lines of `width`."""
    inner = indent + " "
    container = isinstance(value, dict | list)
    if not container or 3 * len(value) <= width:  # n entries take >= 3n characters
        text = json.dumps(value)
        if len(indent) + len(text) <= width or not container or not value:
            return text
    if isinstance(value, dict):
        items = (f"{inner}{json.dumps(k)}: {readable_json(v, inner)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if any(isinstance(v, dict | list) for v in value):
        items = (inner + readable_json(v, inner) for v in value)
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    lines = [""]
    for item in map(json.dumps, value):
        if lines[-1] and len(inner) + len(lines[-1]) + len(item) > width:
            lines.append("")
        lines[-1] += item + ", "
    return "[\n" + "\n".join(inner + line.rstrip() for line in lines).rstrip(",") + f"\n{indent}]"
