"""`plan.to_torch()`: a plan in torch-native terms, for a torchtitan-style trainer.

    torch_plan = plan.to_torch()
    mesh = init_device_mesh("cuda", torch_plan.mesh_shape, mesh_dim_names=("pp", "dp", "tp"))
    parallelize_module(model, mesh["tp"], torch_plan.tp_plan)       # tensor parallel
    pipeline(model, mb_args=..., split_spec=torch_plan.split_points)  # pipeline stages
    with loss_parallel() if torch_plan.loss_parallel else nullcontext():
        loss_fn(model(x), y).backward()
    print(torch_plan.not_expressible)                                # what torch runs otherwise

`tp_plan` maps module paths to torch's styles, one per module layout read off the plan
(plan/torch_layouts.py). A linear whose weight the plan shards on its output features is
`ColwiseParallel`, on its input features `RowwiseParallel`, an embedding sharded on the
vocabulary `RowwiseParallel` (torch's vocabulary-parallel embedding). A column-parallel
linear keeps its output sharded only when its module's linears form a Megatron pair (all
column- or row-parallel, at least one of each: an attention's q, k, v and o projections,
an MLP's gate, up and down); otherwise it gathers its output and a row-parallel one cuts
its input, so the module's result is whole.

Under sequence parallelism the activations between blocks stay DTensors sharded on the
sequence, as in torchtitan's Llama plan: `SequenceParallel` on the norms,
`ColwiseParallel(input_layouts=Shard(1))` (an all-gather per linear, where autopar
gathers once per norm output), `RowwiseParallel(output_layouts=Shard(1))` (a
reduce-scatter), the embedding's output split with it, and a replicated LM head's input
gathered by `PrepareModuleInput`. The outputs are left as DTensors
(`use_local_output=False`) so that code between modules (a residual add, a Hugging Face
model's shapes read off its embeddings) sees the global shapes. A vocabulary-parallel
traced loss leaves the LM head's logits sharded on the classes for `loss_parallel()`.
When torch would not run those layouts (a plain tensor meeting a DTensor, as around
GPT-2's fused QKV that no style can shard), they fall back to whole activations, and
the reason is listed. Pipeline stages become `SplitPoint.BEGINNING` at the first block
of each stage after the first. Everything the plan does that these cannot say is listed
in `not_expressible`, with what torch runs instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from autopar.plan.roles import Roles
from autopar.plan.torch_layouts import (
    Layout,
    loss_head,
    module_layouts,
    sharded_kinds,
    torch_blocker,
)

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
    layouts, loss_parallel = _layouts(plan, missing) if plan.tp > 1 else ({}, False)
    unpaired = sorted(m for m, layout in layouts.items() if layout.kind in ("colwise", "rowwise")
                      and not layout.paired and layout.gives != -1)  # fmt: skip
    if unpaired:
        missing.append(
            f"linears outside a Megatron pair ({', '.join(unpaired[:4])}"
            f"{' ...' if len(unpaired) > 4 else ''}): torch gathers their output or cuts "
            "their input, where the plan keeps the shard across modules"
        )
    splits = {path: SplitPoint.BEGINNING for path in _split_paths(plan, missing)}
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
        mesh_shape=(plan.pp, plan.dp, plan.tp),
        tp_plan={module: torch_style(layout) for module, layout in layouts.items()},
        split_points=splits, schedule=TORCH_SCHEDULES[plan.schedule],
        num_microbatches=plan.num_microbatches, loss_parallel=loss_parallel,
        not_expressible=missing,
    )  # fmt: skip


# --- tensor parallel ----------------------------------------------------------------------


def _layouts(plan, missing: list[str]) -> tuple[dict[str, Layout], bool]:
    """The module layouts torch runs, and whether the loss stays vocabulary-parallel:
    the plan's sequence parallelism and loss where torch would run them, else without."""
    roles = Roles(plan)
    kinds = sharded_kinds(plan, roles, missing)
    sequence, head = plan.sequence_parallel, loss_head(plan)
    if sequence and plan.pp > 1:
        missing.append(
            "sequence parallelism across pipeline stages: the activations between blocks "
            "would be DTensors, which a PipelineStage does not send; runs without it"
        )
        sequence = False
    if head is not None and head not in kinds:
        missing.append(
            f"the vocabulary-parallel loss: its LM head {head} has no torch style (see "
            "above); torch computes the loss on whole logits"
        )
        head = None
    while True:
        layouts = module_layouts(plan, roles, kinds, sequence=sequence, loss_head=head)
        blocker = torch_blocker(plan, layouts, head is not None) if sequence or head else None
        if blocker is None:
            return layouts, head is not None
        if sequence:
            missing.append(
                "sequence parallelism (norms and residuals split on the sequence dim): "
                f"{blocker}; runs with whole activations between modules"
            )
            sequence = False
        else:
            missing.append(
                f"the vocabulary-parallel loss: {blocker}; torch computes it on whole logits"
            )
            head = None


def torch_style(layout: Layout):
    """The torch ParallelStyle that runs one module's layout."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    local = layout.gives is None  # a plain tensor out: whole, or the pair's local shard
    output = Replicate() if local else Shard(layout.gives)
    if layout.kind == "colwise":
        return ColwiseParallel(
            input_layouts=Replicate() if layout.takes is None else Shard(layout.takes),
            output_layouts=Shard(-1) if layout.paired else output, use_local_output=local,
        )  # fmt: skip
    if layout.kind == "rowwise":
        return RowwiseParallel(
            input_layouts=Shard(-1) if layout.paired else Replicate(),
            output_layouts=output, use_local_output=local,
        )  # fmt: skip
    if layout.kind == "embedding-rows":
        return RowwiseParallel(
            input_layouts=Replicate(), output_layouts=output, use_local_output=local
        )
    if layout.kind == "embedding-cols":
        return ColwiseParallel(output_layouts=output, use_local_output=local)
    if layout.kind == "sequence":
        return SequenceParallel(sequence_dim=layout.takes)
    if layout.kind == "gather":
        return PrepareModuleInput(
            input_layouts=(Shard(layout.takes),), desired_input_layouts=(Replicate(),),
            use_local_output=True,
        )  # fmt: skip
    return PrepareModuleOutput(  # scatter
        output_layouts=(Replicate(),), desired_output_layouts=(Shard(layout.gives),),
        use_local_output=False,
    )  # fmt: skip


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
