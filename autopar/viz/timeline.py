"""The pipeline timeline of a Plan: which rank runs which microbatch when.

`simulate` replays the plan's schedule on its predicted stage times: each pipeline
rank runs its actions in the schedule's fixed order, an action starting once the
rank is free and its input is ready (a forward needs the previous stage's forward
of that microbatch; a backward needs the next stage's backward, or on the last
stage its own forward). Forward takes 1/3 of a stage's time and backward 2/3
(backward does twice the forward FLOPs); a stage's time includes its sends and
receives (the stage DP prices them into it), so they are inside the boxes.

Orders, with v model chunks per rank (v = 1 except interleaving) and stage s on
rank s mod pp:

- gpipe: every forward, then every backward.
- 1f1b: rank r runs pp - r - 1 warm-up forwards, then one forward and one
  backward in turn, then the remaining backwards.
- interleaved1f1b: Megatron-LM's order: microbatches in groups of pp per chunk,
  warm-up of 2(pp - r - 1) + (v - 1) pp forwards, then 1F1B.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cost.compute import BACKWARD_FLOP_FACTOR
from autopar.errors import AutoparError
from autopar.viz.graph import _new_figure

FORWARD_SHARE = 1 / (1 + BACKWARD_FLOP_FACTOR)
COLORS = {"F": "#4c72b0", "B": "#dd8452"}


@dataclass(frozen=True)
class Action:
    rank: int
    stage: int
    microbatch: int
    kind: str  # "F" or "B"
    start: float
    end: float


def _virtual_order(rank: int, pp: int, chunks: int, m: int, backward: bool) -> list:
    """(stage, microbatch) in Megatron's interleaved order for one rank."""
    order = []
    for k in range(m * chunks):
        group, within = divmod(k, pp * chunks)
        chunk = within // pp
        chunk = chunks - 1 - chunk if backward else chunk
        order.append((chunk * pp + rank, group * pp + within % pp))
    return order


def rank_orders(num_stages: int, pp: int, m: int, schedule: str) -> list[list[tuple]]:
    """Per rank, its actions (kind, stage, microbatch) in the order it runs them."""
    if num_stages % pp:
        raise AutoparError(f"{num_stages} stages do not wrap evenly around pp={pp} ranks")
    chunks = num_stages // pp
    orders = []
    for rank in range(pp):
        forwards = [("F", s, mb) for s, mb in _virtual_order(rank, pp, chunks, m, False)]
        backwards = [("B", s, mb) for s, mb in _virtual_order(rank, pp, chunks, m, True)]
        if schedule == "gpipe":
            orders.append(forwards + backwards)
            continue
        warmup = min((pp - rank - 1) * (2 if chunks > 1 else 1) + (chunks - 1) * pp, len(forwards))
        order = forwards[:warmup]
        for i, forward in enumerate(forwards[warmup:]):
            order += [forward, backwards[i]]
        orders.append(order + backwards[len(forwards) - warmup :])
    return orders


def simulate(stage_times: list[float], pp: int, m: int, schedule: str) -> list[Action]:
    """Start and end of every action; an AutoparError if the order cannot finish."""
    orders = rank_orders(len(stage_times), pp, m, schedule)
    last = len(stage_times) - 1
    done: dict[tuple, float] = {}
    free, position, actions = [0.0] * pp, [0] * pp, []
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            while position[rank] < len(orders[rank]):
                kind, stage, mb = orders[rank][position[rank]]
                need = _dependency(kind, stage, mb, last)
                if need is not None and need not in done:
                    break
                share = FORWARD_SHARE if kind == "F" else 1 - FORWARD_SHARE
                start = max(free[rank], done.get(need, 0.0))
                end = start + stage_times[stage] * share
                done[kind, stage, mb], free[rank] = end, end
                actions.append(Action(rank, stage, mb, kind, start, end))
                position[rank] += 1
                progressed = True
        if not progressed:
            raise AutoparError(f"the {schedule} order deadlocks for pp={pp}, {m} microbatches")
    return actions


def _dependency(kind: str, stage: int, mb: int, last: int) -> tuple | None:
    if kind == "F":
        return ("F", stage - 1, mb) if stage > 0 else None
    return ("B", stage + 1, mb) if stage < last else ("F", stage, mb)


def plan_timeline(plan) -> list[Action]:
    times = [s.time_s for s in sorted(plan.stages, key=lambda s: s.index)]
    return simulate(times, plan.pp, plan.num_microbatches, plan.schedule)


def rank_labels(plan) -> list[str]:
    """One label per pipeline rank, naming the stages it runs and the GPUs behind it
    (each pp rank is a dp x tp group): "stage 3 (pp rank 3, 64 GPUs)"."""
    gpus = plan.dp * plan.tp
    labels = []
    for rank in range(plan.pp):
        stages = [
            s.index for s in sorted(plan.stages, key=lambda s: s.index) if s.index % plan.pp == rank
        ]
        which = (
            f"stage {stages[0]}" if len(stages) == 1 else f"stages {', '.join(map(str, stages))}"
        )
        labels.append(f"{which} (pp rank {rank}, {gpus} GPU{'s' * (gpus > 1)})")
    return labels


def timeline_figure(plan):
    """Gantt chart of `plan_timeline`: one row per pipeline rank (its stages), F and B boxes."""
    actions = plan_timeline(plan)
    figure = _new_figure(10, 0.45 * plan.pp + 1.4)
    axes = figure.add_subplot()
    for rank in range(plan.pp):  # one collection per row and kind: thousands of boxes draw fast
        for kind, color in COLORS.items():
            boxes = [(a.start * 1e3, (a.end - a.start) * 1e3) for a in actions
                     if a.rank == rank and a.kind == kind]  # fmt: skip
            axes.broken_barh(boxes, (rank - 0.4, 0.8), facecolors=color, edgecolors="white",
                             linewidths=0.5)  # fmt: skip
    if plan.num_microbatches <= 32:
        for a in actions:
            axes.text((a.start + a.end) / 2 * 1e3, a.rank, str(a.microbatch), ha="center",
                      va="center", fontsize=6, color="white")  # fmt: skip
    makespan = max(a.end for a in actions) * 1e3
    axes.set_yticks(range(plan.pp), rank_labels(plan), fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("ms (each box includes its stage's sends and receives)")
    axes.set_title(
        f"{plan.schedule}: pp={plan.pp}, {plan.num_microbatches} microbatches, "
        f"{len(plan.stages)} stages; {makespan:.1f} ms (blue forward, orange backward)",
        fontsize=9,
    )
    return figure
