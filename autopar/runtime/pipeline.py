"""Pipeline parallelism: this rank's stages of a plan, run by torch.distributed.pipelining.

Every rank builds the same tensor-parallel rank graph (`shard_graph`), splits it
into the plan's stages (`split_stages`) and keeps the stages whose `pp_rank` is
its own (several under interleaving, stage k on pp rank k % pp). Each kept stage
becomes a `StageModule` (the stage graph fed with this rank's parameter shards)
wrapped in a `PipelineStage` over the pp group, and the plan's schedule (GPipe,
1F1B or interleaved 1F1B) runs them.

State: a pp rank holds the parameters and buffers its stages read; a tensor no
stage reads stays with pp rank 0. A parameter read by stages on several pp ranks
(GPT-2's tied embedding and LM head) has a copy on each. `pm.state` (a
`HeldState`, runtime/held.py, as for pp = 1) rebuilds the single-device state dict
and gradients and sums the tied copies' gradients over the pp group.

Gradient scaling: the schedule runs with `scale_grads=False` and the loss of each
microbatch is divided by the number of microbatches times dp instead, so gradients
summed over the dp replicas are those of the mean loss, even when one parameter is
shared by two stages of a rank.

Across a stage boundary a value travels contiguous; the receiving stage puts it
back in the memory layout it was traced with (its view nodes depend on it). User
inputs never travel: the schedule hands each stage the ones it reads (stage 0 as
its arguments, later stages as keyword arguments, split into microbatches like
them), so no stage reads a buffer the pipeline's shape inference made up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.export.graph_signature import OutputKind
from torch.utils import _pytree as pytree

from autopar.capture import TracedModel
from autopar.codegen import annotated_code, recompute, shard_graph
from autopar.codegen.stages import StageGraph, split_stages, stage_of_nodes
from autopar.codegen.zero import gather_per_block
from autopar.errors import AutoparError
from autopar.ops import Axis
from autopar.runtime.feeds import GIVEN, FedGraph, placeholder_feeds
from autopar.runtime.groups import MeshGroups
from autopar.runtime.held import HeldState, held_tensors
from autopar.runtime.schedule import build_schedule, check_stage_ranks
from autopar.runtime.stage import StageModule, input_key, local_shape
from autopar.runtime.state import (
    DpSlices,
    build_slots,
    dp_axes,
    partial_grad_slots,
    sliced_placeholders,
)


def split_plan_stages(graph_module: fx.GraphModule, plan, traced: TracedModel) -> list[StageGraph]:
    """The rank graph cut into the plan's stages."""
    stage_of = stage_of_nodes(graph_module, [stage.nodes for stage in plan.stages])
    return split_stages(graph_module, stage_of, len(plan.stages), traced.user_inputs)


def stage_readers(traced, model, stages, rank_of_stage) -> dict[int, set[int]]:
    """id(model tensor) -> the pp ranks whose stages read it."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    fqns = {**traced.param_fqns, **traced.buffer_fqns}
    readers: dict[int, set[int]] = {}
    for stage in stages:
        for name in stage.state:
            if name in fqns:
                readers.setdefault(id(named[fqns[name]]), set()).add(rank_of_stage[stage.index])
    return readers


class PipelineModule(nn.Module):
    """This rank's stages of a pipelined plan, their parameter shards and schedule."""

    def __init__(
        self, traced: TracedModel, plan, model: nn.Module, groups: MeshGroups,
        sliced: DpSlices | None = None,
    ):  # fmt: skip
        super().__init__()
        check_stage_ranks(plan)
        _check_outputs(traced)
        self.groups = groups
        self.tp_rank, self.tp_size = groups.tp_rank, groups.tp
        self.num_stages = len(plan.stages)
        self.num_microbatches = plan.num_microbatches
        self._loss_divisor = plan.num_microbatches * plan.dp  # each microbatch's share
        self._rank_of_stage = [stage.pp_rank for stage in plan.stages]
        graph_module = shard_graph(traced, plan.node_placements(), plan.tp)
        if sliced is not None:  # ZeRO-3: a stage gathers the blocks it reads
            gather_per_block(graph_module, sliced_placeholders(traced, model), sliced.size)
        self._sliced = sliced
        stages = split_plan_stages(graph_module, plan, traced)
        for stage in stages:
            recompute(stage.graph_module, plan.stages[stage.index].recompute)
        readers = stage_readers(traced, model, stages, self._rank_of_stage)
        held = held_tensors(traced, graph_module, model, readers)
        mine = {key for key, tensor in held.items() if groups.pp_rank in tensor.holders}
        self.shards = nn.Module()
        self._slots = build_slots(
            traced, graph_module, model, self.shards, self.tp_rank, self.tp_size,
            groups.device, keep=mine, sliced=sliced,
        )  # fmt: skip
        partial = partial_grad_slots(traced, graph_module, model, self._slots)
        tp = Axis("tp", groups.tp_group, groups.tp, groups.tp_rank)
        pp = Axis("pp", groups.pp_group, groups.pp, groups.pp_rank)
        self.state = HeldState(model, held, self._slots, partial, tp, pp, groups.device, sliced)
        axes = {"tp": tp, **dp_axes(sliced)}
        local = [stage for stage in stages if self._rank_of_stage[stage.index] == groups.pp_rank]
        self.stage_modules = [self._stage_module(traced, model, s, axes) for s in local]
        self.graph_reads = [p for module in self.stage_modules for p in module.graph_reads]
        self._stage0_inputs = [traced.user_inputs.index(name) for name in stages[0].received]
        later = dict.fromkeys(name for module in self.stage_modules for name in module.stage.inputs)
        self._later_inputs = {name: traced.user_inputs.index(name) for name in later}
        self._out_spec = traced.out_spec
        self._output_nodes = _output_nodes(stages[-1])
        self._loss_fn: Callable | None = None
        pipeline_stages = [
            PipelineStage(module, module.index, self.num_stages, groups.device,
                          group=groups.pp_group)
            for module in self.stage_modules
        ]  # fmt: skip
        self._schedule = build_schedule(plan, pipeline_stages, self._microbatch_loss)

    def _stage_module(self, traced, model, stage: StageGraph, axes: dict) -> StageModule:
        placeholders = stage.graph_module.graph.find_nodes(op="placeholder")
        given = len(stage.received) + len(stage.inputs)
        state = placeholder_feeds(
            traced, placeholders[given:], model, self._slots, self, self.groups.device
        )
        unknown = [node.name for node, feed in zip(placeholders[given:], state, strict=True)
                   if feed is GIVEN]  # fmt: skip
        if unknown:
            raise AutoparError(f"stage {stage.index}: state placeholders {unknown} have no value")
        fed = FedGraph(stage.graph_module, [GIVEN] * given + state, axes, self._sliced is not None)
        return StageModule(stage, fed, is_last=stage.index == self.num_stages - 1)

    # --- where things are ----------------------------------------------------------------

    def holds_stage(self, index: int) -> bool:
        return self._rank_of_stage[index] == self.groups.pp_rank

    @property
    def holds_last_stage(self) -> bool:
        return self.holds_stage(self.num_stages - 1)

    @property
    def code(self) -> str:
        """This rank's generated source, one block per stage it runs."""
        g = self.groups
        parts = []
        for module in self.stage_modules:
            stage = module.stage
            header = (
                f"stage {stage.index} of {self.num_stages} on pp rank {g.pp_rank}, "
                f"tp rank {g.tp_rank} of {g.tp}\n"
                f"receives {', '.join(stage.received) or 'nothing'}; "
                f"sends {', '.join(stage.sent) or 'nothing'}"
            )
            parts.append(annotated_code(module.graph_module, header))
        return "\n\n".join(parts)

    # --- training ------------------------------------------------------------------------

    def _microbatch_loss(self, output, target) -> torch.Tensor:
        """The schedule's loss: the user's loss on the model's output structure, over m dp."""
        flat = list(output) if isinstance(output, tuple | list) else [output]
        structured = pytree.tree_unflatten(flat, self._out_spec)
        return self._loss_fn(structured, target) / self._loss_divisor

    def run_schedule(
        self, flat_inputs: Sequence, target: torch.Tensor, loss_fn
    ) -> torch.Tensor | None:
        """Run the schedule on one replica's batch; on the last stage, its mean loss / dp.

        Gradients accumulate into the shards' `.grad` (set them to None first); call
        `state.sum_tied_grads` once the dp sync of the step is done.
        """
        self._loss_fn = loss_fn
        args = [flat_inputs[i] for i in self._stage0_inputs] if self.holds_stage(0) else []
        losses: list[torch.Tensor] = []
        self._schedule.step(
            *args, target=target if self.holds_last_stage else None, losses=losses,
            return_outputs=False, **self._given(flat_inputs),
        )  # fmt: skip
        return torch.stack(losses).sum().detach() if losses else None

    def _given(self, flat_inputs: Sequence) -> dict[str, torch.Tensor]:
        """The user inputs this rank's later stages read, keyed by `input_key`."""
        return {input_key(name): flat_inputs[i] for name, i in self._later_inputs.items()}

    # --- inference -----------------------------------------------------------------------

    @torch.no_grad()
    def run_flat(self, flat_inputs: Sequence) -> list[torch.Tensor]:
        """One microbatch through every stage; the model's flat outputs on every rank."""
        outputs: tuple[torch.Tensor, ...] = ()
        for module in self.stage_modules:
            if module.index == 0:
                received = [flat_inputs[i] for i in self._stage0_inputs]
            else:
                received = self._receive(module)
            outputs = module(*received, **self._given(flat_inputs))
            if module.index < self.num_stages - 1:
                self._send(module.index, outputs)
        return self._broadcast_outputs(outputs)

    def _receive(self, module: StageModule) -> list[torch.Tensor]:
        source = self._rank_of_stage[module.index - 1]
        buffers = module.received_buffers(self.groups.device)
        for buffer in buffers:
            dist.recv(buffer, group=self.groups.pp_group, group_src=source)
        return buffers

    def _send(self, index: int, values: Sequence[torch.Tensor]) -> None:
        target = self._rank_of_stage[index + 1]
        for value in values:
            dist.send(value.contiguous(), group=self.groups.pp_group, group_dst=target)

    def _broadcast_outputs(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        source = self._rank_of_stage[-1]
        if self.holds_last_stage:
            values = [value.contiguous() for value in outputs]
        else:
            values = [
                torch.empty(local_shape(node), dtype=node.meta["val"].dtype,
                            device=self.groups.device)
                for node in self._output_nodes
            ]  # fmt: skip
        for value in values:
            dist.broadcast(value, group=self.groups.pp_group, group_src=source)
        return values


def _output_nodes(last: StageGraph) -> list[fx.Node]:
    (output,) = last.graph_module.graph.find_nodes(op="output")
    values = output.args[0]
    return list(values) if isinstance(values, tuple | list) else [values]


def _check_outputs(traced: TracedModel) -> None:
    kinds = [spec.kind for spec in traced.exported.graph_signature.output_specs]
    other = [kind.name for kind in kinds if kind not in (OutputKind.USER_OUTPUT,)]
    if other:
        raise AutoparError(
            f"the model's graph has outputs of kind {sorted(set(other))} (buffer mutations or "
            "gradients); pipeline parallelism supports models whose forward only returns "
            "values; plan with pp=1"
        )
