"""The pipeline schedules a plan may name, and the checks a plan's stages must pass.

torch.distributed.pipelining puts stage k on pp rank k % pp; GPipe and 1F1B run one
stage per rank, interleaved 1F1B several. Gradients are not rescaled by the
schedule (`scale_grads=False`): runtime/pipeline.py divides each microbatch's loss.
"""

from __future__ import annotations

from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from autopar.errors import PlanError

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved1f1b": ScheduleInterleaved1F1B,
}


def check_stage_ranks(plan) -> None:
    """Stages must sit where torch.distributed.pipelining puts them: stage k on pp rank k % pp."""
    num_stages = len(plan.stages)
    wrong = [
        f"stage {k} on pp rank {stage.pp_rank}"
        for k, stage in enumerate(plan.stages)
        if stage.index != k or stage.pp_rank != k % plan.pp
    ]
    if num_stages % plan.pp or wrong:
        raise PlanError(
            f"the plan has {num_stages} stages for pp={plan.pp} ({', '.join(wrong) or 'ok'}); "
            "the runtime needs a multiple of pp stages with stage k on pp rank k % pp; "
            "plan the model again"
        )
    if plan.schedule not in SCHEDULES:
        raise PlanError(f"schedule {plan.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if plan.schedule != "interleaved1f1b" and num_stages != plan.pp:
        raise PlanError(
            f"schedule {plan.schedule!r} runs one stage per pipeline rank, but the plan has "
            f"{num_stages} stages for pp={plan.pp}; use interleaved1f1b or plan again"
        )


def build_schedule(plan, stages: list[PipelineStage], loss_fn):
    """The plan's schedule over this rank's stages (gradients not rescaled: see module doc)."""
    schedule = SCHEDULES[plan.schedule]
    first = stages if plan.schedule == "interleaved1f1b" else stages[0]
    try:
        return schedule(first, plan.num_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as error:
        raise PlanError(
            f"schedule {plan.schedule} with {plan.num_microbatches} microbatches and "
            f"{len(plan.stages)} stages on pp={plan.pp}: {error}"
        ) from error
