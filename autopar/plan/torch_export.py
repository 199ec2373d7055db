"""`plan.to_torch()`: a plan in torch-native terms, for a torchtitan-style trainer.

    torch_plan = plan.to_torch()
    mesh = init_device_mesh("cuda", torch_plan.mesh_shape, mesh_dim_names=("pp", "dp", "tp"))
    parallelize_module(model, mesh["tp"], torch_plan.tp_plan)       # tensor parallel
    pipeline(model, mb_args=..., split_spec=torch_plan.split_points)  # pipeline stages
    print(torch_plan.not_expressible)                                # what torch runs otherwise

`tp_plan` maps module paths to `ColwiseParallel` / `RowwiseParallel` (and
`PrepareModuleInput`-free Megatron pairs), read off each parameter's role in the plan
(plan/roles.py): a linear whose weight the plan shards on its output features is
column-parallel, on its input features row-parallel, an embedding sharded on the
vocabulary is `RowwiseParallel` (torch's vocabulary-parallel embedding). A
column-parallel linear keeps its output sharded only when its module's linears form a
Megatron pair (all column- or row-parallel, at least one of each: an attention's q, k, v
and o projections, an MLP's gate, up and down); otherwise it gathers its output and a
row-parallel one cuts its input (`output_layouts` / `input_layouts` Replicate), so
every module's result is whole and any mix computes the model's numbers. Pipeline
stages become `SplitPoint.BEGINNING` at the first block of each stage after the
first. Everything the plan does that these cannot say is listed in
`not_expressible`, with what torch runs instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from autopar.placement import TP, Shard
from autopar.plan.roles import Roles

LINEAR = "aten.linear.default"
EMBEDDING = "aten.embedding.default"
CROSS_ENTROPY = "aten.cross_entropy_loss.default"
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved1f1b": "ScheduleInterleaved1F1B",
}


@dataclass
class TorchPlan:
    """What `plan.to_torch()` returns; every field is torch-native or plain data."""

    mesh_shape: tuple[int, int, int]  # (pp, dp, tp), for init_device_mesh
    tp_plan: dict  # module path -> torch ParallelStyle, for parallelize_module
    split_points: dict  # module path -> SplitPoint.BEGINNING, for pipelining.pipeline
    schedule: str  # torch.distributed.pipelining schedule class name
    num_microbatches: int
    loss_parallel: bool  # the plan's traced loss is vocabulary-parallel (torch: loss_parallel())
    not_expressible: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"mesh (pp, dp, tp) = {self.mesh_shape}; {self.schedule}, "
                 f"{self.num_microbatches} microbatches"]  # fmt: skip
        lines += [f"  {path}: {style}" for path, style in self.tp_plan.items()]
        lines += [f"  split before {path}" for path in self.split_points]
        lines += [f"  not expressible: {item}" for item in self.not_expressible]
        return "\n".join(lines)


def to_torch(plan) -> TorchPlan:
    """The plan's tensor-parallel layout and pipeline split in torch's own vocabulary."""
    from torch.distributed.pipelining import SplitPoint

    missing: list[str] = []
    tp_plan = _tp_plan(plan, missing) if plan.tp > 1 else {}
    splits = {path: SplitPoint.BEGINNING for path in _split_paths(plan, missing)}
    loss_parallel = _vocab_parallel_loss(plan)
    if loss_parallel:
        missing.append(
            "the traced loss runs vocabulary-parallel: give the LM head "
            "ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) and compute "
            "the loss under loss_parallel() to keep it so; tp_plan gathers the logits"
        )
    if plan.sequence_parallel:
        missing.append(
            "sequence parallelism (norms and residuals split on the sequence dim): torch "
            "needs SequenceParallel plus PrepareModuleInput on each block; runs without it"
        )
    if plan.zero:
        missing.append(
            f"ZeRO-{plan.zero} over dp: use FSDP2 fully_shard on the dp mesh "
            "(reshard_after_forward=False) or keep plain data parallelism"
        )
    if plan.recompute != "none":
        missing.append(
            f"activation recomputation {plan.recompute!r}: wrap the blocks with "
            "torch.utils.checkpoint yourself"
        )
    return TorchPlan(
        mesh_shape=(plan.pp, plan.dp, plan.tp), tp_plan=tp_plan, split_points=splits,
        schedule=TORCH_SCHEDULES[plan.schedule], num_microbatches=plan.num_microbatches,
        loss_parallel=loss_parallel, not_expressible=missing,
    )  # fmt: skip


def _vocab_parallel_loss(plan) -> bool:
    """Does a traced cross-entropy see its logits sharded over the classes on tp?"""
    for node in plan.strategies.values():
        placement = node.placements.get(TP)
        if node.op == CROSS_ENTROPY and placement and isinstance(placement.inputs[0], Shard):
            return True
    return False


# --- tensor parallel ----------------------------------------------------------------------


def _module_of(fqn: str) -> tuple[str, str]:
    """'model.layers.0.mlp.up_proj.weight' -> ('model.layers.0.mlp.up_proj', 'weight')."""
    module, _, attr = fqn.rpartition(".")
    return module, attr


def _readers(plan, placeholder: str) -> set[str]:
    """The ops that read a parameter directly."""
    held = plan.tied_params.get(placeholder, placeholder)
    return {node.op for node in plan.strategies.values() if held in node.sources}


def _roles(plan, missing: list[str]) -> dict[str, str]:
    """Module path -> 'colwise' | 'rowwise' | 'embedding-rows' | 'embedding-cols' for each
    sharded weight torch can shard the same way (a module's bias follows its weight, as in
    torch's styles); the other sharded weights go to `missing`, with the reason."""
    roles, found = Roles(plan), {}
    for placeholder, fqn in plan.param_fqns.items():
        module, attr = _module_of(fqn)
        role = roles.role(placeholder)
        if role == "replicated" or attr != "weight":
            continue
        kind, why = _style_kind(plan, placeholder, role)
        if kind is None:
            missing.append(
                f"{fqn}: {roles.placement(placeholder)}, {role}: {why}; replicated in torch"
            )
        else:
            found[module] = kind
    return found


_KINDS = {
    (LINEAR, "column-parallel"): "colwise",
    (LINEAR, "row-parallel"): "rowwise",
    (EMBEDDING, "vocabulary-parallel embedding"): "embedding-rows",
    (EMBEDDING, "embedding, hidden dim sharded"): "embedding-cols",
}


def _style_kind(plan, placeholder: str, role: str) -> tuple[str | None, str]:
    """The torch style for a sharded weight, or None and why there is none."""
    node = plan.strategies.get(plan.tied_params.get(placeholder, placeholder))
    placement = node.placements.get(TP) if node else None
    output = placement.output if placement else None
    if isinstance(output, Shard) and output.groups > 1:
        return None, "a block-interleaved shard (a fused projection) has no torch style"
    readers = _readers(plan, placeholder)
    if len(readers) != 1:
        return (
            None,
            f"read by {', '.join(sorted(readers))} (tied?), one module's style cannot say it",
        )
    (reader,) = readers
    if reader not in (LINEAR, EMBEDDING):
        return None, f"read by {reader}, not by an nn.Linear or nn.Embedding"
    kind = _KINDS.get((reader, role))
    return kind, "" if kind else f"no torch style shards a {reader} this way"


def _megatron_parents(kinds: dict[str, str], plan) -> set[str]:
    """Parent modules whose sharded linears pair up: all column- or row-parallel, at least
    one of each, and no linear of theirs left replicated."""
    linears = defaultdict(set)  # parent -> its linear children (sharded or not)
    for placeholder, fqn in plan.param_fqns.items():
        module, attr = _module_of(fqn)
        if attr == "weight" and _readers(plan, placeholder) == {LINEAR}:
            linears[module.rpartition(".")[0]].add(module)
    paired = set()
    for parent, children in linears.items():
        styles = {kinds.get(child) for child in children}
        if styles == {"colwise", "rowwise"}:
            paired.add(parent)
    return paired


def _tp_plan(plan, missing: list[str]) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    kinds = _roles(plan, missing)
    paired = _megatron_parents(kinds, plan)
    tp_plan = {}
    for module, kind in kinds.items():
        inside_pair = module.rpartition(".")[0] in paired
        if kind == "colwise":
            tp_plan[module] = (
                ColwiseParallel() if inside_pair else ColwiseParallel(output_layouts=Replicate())
            )
        elif kind == "rowwise":
            tp_plan[module] = (
                RowwiseParallel() if inside_pair else RowwiseParallel(input_layouts=Replicate())
            )
        elif kind == "embedding-rows":
            tp_plan[module] = RowwiseParallel(input_layouts=Replicate())
        else:
            tp_plan[module] = ColwiseParallel(output_layouts=Replicate())
    unpaired = sorted(m for m, k in kinds.items() if k in ("colwise", "rowwise")
                      and m.rpartition(".")[0] not in paired)  # fmt: skip
    if unpaired:
        missing.append(
            f"linears outside a Megatron pair ({', '.join(unpaired[:4])}"
            f"{' ...' if len(unpaired) > 4 else ''}): torch gathers their output or cuts "
            "their input, where the plan keeps the shard across modules"
        )
    return tp_plan


# --- pipeline -----------------------------------------------------------------------------


def _block_paths(plan) -> dict[int, str]:
    """Block index -> its module path: the common prefix of its parameters' names."""
    names = defaultdict(list)
    for placeholder, fqn in plan.param_fqns.items():
        if placeholder in plan.layer_of:
            names[plan.layer_of[placeholder]].append(fqn.split("."))
    paths = {}
    for layer, parts in names.items():
        common = []
        for pieces in zip(*parts, strict=False):
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        paths[layer] = ".".join(common)
    return paths


def _split_paths(plan, missing: list[str]) -> list[str]:
    paths, blocks = [], _block_paths(plan)
    for stage in plan.stages[1:]:
        first = min(stage.layers) if stage.layers else None
        if first is None or first not in blocks:
            missing.append(
                f"stage {stage.index} starts with no transformer block (its nodes: "
                f"{', '.join(stage.nodes[:3])} ...): no module to split before"
            )
            continue
        paths.append(blocks[first])
    return paths
