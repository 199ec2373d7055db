"""The Plan: a typed value, saved as plain JSON, that says how to run a model on a mesh.

It holds the parallel degrees, the schedule, for every node its placement on each
mesh axis (`PlanNode`, keyed by the node's stable name: module path, op and ordinal,
see autopar/normalize.py), the pipeline stages, the predicted costs and the
collectives that make them up, and fingerprints of the model graph and the mesh so
that a plan is never applied to a model or cluster it was not made for.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autopar.cost.pricing import Collective
from autopar.errors import PlanError
from autopar.fileio import write_atomic
from autopar.placement import TP, NodePlacement
from autopar.plan.summary import plan_summary

SCHEMA_VERSION = 2


@dataclass
class PlanNode:
    """One graph node: its op, the nodes it reads, and its placement on each mesh axis
    (an axis the plan does not split, such as tp at tp=1, is absent)."""

    op: str
    sources: list[str]
    placements: dict[str, NodePlacement]

    def output(self, axis: str = TP) -> str:
        """The printed placement of the output on `axis` ("R" where the axis is absent)."""
        placement = self.placements.get(axis)
        if placement is None:
            return "R"
        output = placement.output
        return str(output[0] if isinstance(output, tuple) else output)

    def to_dict(self) -> dict:
        placements = {axis: p.to_text() for axis, p in self.placements.items()}
        return {"op": self.op, "sources": self.sources, "placements": placements}

    @classmethod
    def from_dict(cls, data: dict) -> PlanNode:
        placements = {a: NodePlacement.from_text(p) for a, p in data["placements"].items()}
        return cls(data["op"], list(data["sources"]), placements)


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
    zero: int = 0  # ZeRO stage over dp: 1 optimizer states sharded, 2 gradients too
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["strategies"] = {name: node.to_dict() for name, node in self.strategies.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported (this autopar reads "
                f"version {SCHEMA_VERSION}); plan the model again"
            )
        try:
            fields = dict(data)
            fields["strategies"] = {n: PlanNode.from_dict(e) for n, e in data["strategies"].items()}
            fields["stages"] = [Stage(**s) for s in data["stages"]]
            fields["cost"] = Cost(**data["cost"])
            fields["collectives"] = [Collective(**c) for c in data["collectives"]]
            plan = cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanError(f"malformed plan: {error}; plan the model again") from error
        return plan

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash never leaves half a plan file behind."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

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
