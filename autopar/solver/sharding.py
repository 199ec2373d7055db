"""The intra-op choice for each layout the search visits, solved as few times as it can.

Per tp degree the candidate strategies and the ILP are built once (`ShardingProblem`).
The data-parallel degree enters the ILP only through the gradient sync each parameter
pays on the dp axis: the reshard table's entry for a replicated parameter whose
gradient is partial over dp (an all-reduce), priced per byte of the parameter's local
gradient, so that sharding a parameter over tp also cuts its dp traffic. Layouts whose
dp groups price a byte the same share one solve.

Memory: the first solve of a (tp, dp) has no memory rows: the fastest sharding. When
its stages do not fit a pipeline configuration (pp, microbatches, schedule), `fitting`
solves again with that configuration's rows (`pipeline.memory_rows`: each pp rank's
state and in-flight activations on the equal split, under the device's memory), unless
even the least memory any choice could take does not fit. So a sharding the ILP
accepts fits by the memory model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.cost.comm import reshard_seconds
from autopar.cost.pricing import PriceMemo, ShardingPrice, price_sharding
from autopar.errors import PlanError, SolverTimeLimit
from autopar.placement import DP, TP, Partial, Replicate, Shard
from autopar.reshard import FORWARD, reshard
from autopar.solver.intra_op import IntraOpResult, ShardingProblem
from autopar.solver.pipeline import memory_rows
from autopar.strategies import GraphStrategies, default_input_roles, graph_strategies

# the dp axis' table entries for a parameter: replicated, its gradient a partial sum
# (an all-reduce); under ZeRO each rank's slice of it, gathered for the forward and its
# gradient reduce-scattered (the same traffic: Rajbhandari et al. 2020, sec. 7)
PARAMETER_SYNC = reshard(Replicate(), Replicate(), Partial())
ZERO_SYNC = reshard(Shard(0), Replicate(), Partial())
_PROBE_BYTES = 2**30


def group_of(layout, axis: str) -> range:
    """Global ranks of rank 0's group on `axis`: tp is the innermost mesh axis, then dp."""
    if axis == TP:
        return range(layout.tp)
    return range(0, layout.dp * layout.tp, layout.tp)


def grad_sync_seconds(mesh, layout, grad_bytes: float, axis: str = DP, zero: int = 0) -> float:
    """One sum of `grad_bytes` of partial gradients over `axis`, from the reshard table
    (none under ZeRO-3: each block's is reduce-scattered per microbatch, priced with the
    block as `zero3_gather_seconds`)."""
    group = group_of(layout, axis)
    if len(group) == 1 or grad_bytes == 0 or (axis == DP and zero == 3):
        return 0.0
    entry = ZERO_SYNC if zero >= 1 else PARAMETER_SYNC
    return reshard_seconds(entry, grad_bytes, lambda kind, n: mesh.collective_time(kind, n, group))


LOSS_BYTES = 8  # train_step's loss, a float64 scalar


def tied_grad_sync_seconds(mesh, layout, tied_bytes: float) -> float:
    """Once per step: the gradients of parameters read on several pp ranks (GPT-2's
    embedding and LM head) summed over the pp group (runtime/pipeline.py
    `sum_tied_grads`: one coalesced all-reduce, every pp rank taking part)."""
    if layout.pp == 1 or tied_bytes == 0:
        return 0.0
    group = range(0, mesh.world_size, layout.dp * layout.tp)
    return mesh.collective_time("all_reduce", tied_bytes, group)


def loss_mean_seconds(mesh, training: bool) -> float:
    """Once per step: train_step's loss, the mean over the replicas, all-reduced over the
    world (runtime/parallel.py `_mean_loss`); a scalar, so its latency."""
    if not training or mesh.world_size == 1:
        return 0.0
    return mesh.collective_time("all_reduce", LOSS_BYTES, range(mesh.world_size))


def zero3_gather_seconds(mesh, layout, param_bytes: float) -> float:
    """ZeRO-3, per microbatch: a block's parameters all-gathered over dp for its forward
    and again for its backward, and its gradients reduce-scattered (Rajbhandari et al.
    2020, sec. 7: 1.5x the traffic of plain data parallelism, per microbatch)."""
    group = group_of(layout, DP)
    if len(group) == 1 or param_bytes == 0:
        return 0.0
    price = lambda kind, n: mesh.collective_time(kind, n, group)  # noqa: E731
    regather = sum(price(step.kind, param_bytes) for phase, step in ZERO_SYNC.collectives()
                   if phase == FORWARD)  # fmt: skip
    return reshard_seconds(ZERO_SYNC, param_bytes, price) + regather


def grad_sync_per_byte(mesh, layout) -> float:
    """The bandwidth part of the dp sync: seconds per byte of gradient (latency is paid
    once per step, not per parameter)."""
    double, single = (grad_sync_seconds(mesh, layout, n) for n in (2 * _PROBE_BYTES, _PROBE_BYTES))
    return (double - single) / _PROBE_BYTES


@dataclass
class Sharding:
    """One intra-op solution: the strategies, the ILP's result and its pricing."""

    tp: int
    strategies: GraphStrategies
    result: IntraOpResult
    pricing: ShardingPrice


@dataclass
class ShardingSolver:
    """Builds one ILP per tp degree and solves it per dp sync price; remembers failures."""

    traced: object
    mesh: object
    training: bool
    dtype_bytes: int
    state_bytes: float
    time_limit_s: float | None
    sequence_parallel: bool | None = None
    input_roles: object = None  # strategies.InputRoles, or None for the default policy
    problems: dict = field(default_factory=dict)  # tp -> (GraphStrategies, ShardingProblem)
    solutions: dict = field(default_factory=dict)  # (tp, sync price, rows) -> Sharding | None
    unit_memory: dict = field(default_factory=dict)  # tp -> [UnitMemory]
    memos: dict = field(default_factory=dict)  # tp -> PriceMemo
    prices: dict = field(default_factory=dict)  # (tp, the strategies chosen) -> ShardingPrice
    failures: list = field(default_factory=list)

    def _problem(self, tp: int):
        if tp not in self.problems:
            strategies = graph_strategies(
                self.traced, tp, sequence_parallel=self.sequence_parallel,
                input_roles=self.input_roles or default_input_roles,
            )  # fmt: skip
            problem = ShardingProblem(
                self.traced, strategies, self.mesh, tp, training=self.training,
                dtype_bytes=self.dtype_bytes, state_bytes_per_param=self.state_bytes,
            )  # fmt: skip
            self.problems[tp] = (strategies, problem)
        return self.problems[tp]

    def __call__(self, layout) -> Sharding | None:
        """The fastest sharding for `layout`, memory aside."""
        return self._cached(layout, (), [], "")

    def fitting(self, layout, microbatches, scale, schedule, unit_of) -> Sharding | None:
        """The fastest sharding whose stages fit this pipeline configuration (`scale`: the
        microbatch size over the traced batch), or None if none can."""
        _, problem = self._problem(layout.tp)
        if layout.tp not in self.unit_memory:
            num_units = len(self.traced.analysis.layers) + 2
            self.unit_memory[layout.tp] = problem.unit_memory(unit_of, num_units)
        budget = self.mesh.device.memory_bytes
        rows, possible = memory_rows(
            self.unit_memory[layout.tp], layout.pp, microbatches, schedule, scale, budget
        )
        if not possible:
            return None
        key = (layout.pp, microbatches, round(scale, 12), schedule)
        what = (
            f" in {budget / 2**30:.1f} GiB per device with pp={layout.pp}, {microbatches} "
            f"microbatches, {schedule}"
        )
        return self._cached(layout, key, rows, what)

    def _cached(self, layout, rows_key, rows, what) -> Sharding | None:
        per_byte = grad_sync_per_byte(self.mesh, layout) if self.training else 0.0
        key = (layout.tp, round(per_byte, 24), rows_key)
        if key not in self.solutions:
            self.solutions[key] = self._solve(layout.tp, per_byte, rows, what)
        return self.solutions[key]

    def _solve(self, tp: int, per_byte: float, rows, what) -> Sharding | None:
        strategies, problem = self._problem(tp)
        try:
            result = problem.solve(
                extra=per_byte * problem.param_bytes, memory_rows=rows,
                time_limit_s=self.time_limit_s, what=what,
            )  # fmt: skip
        except SolverTimeLimit:
            raise
        except PlanError as error:
            self.failures.append(f"tp={tp}: {error}")
            return None
        chosen = (tp, tuple(map(id, result.strategies.values())))  # candidates: one object each
        if chosen not in self.prices:  # solves at other sync prices often choose the same
            self.prices[chosen] = price_sharding(
                self.traced, result.strategies, self.mesh, tp, training=self.training,
                dtype_bytes=self.dtype_bytes, memo=self.memos.setdefault(tp, PriceMemo()),
            )  # fmt: skip
        return Sharding(tp, strategies, result, self.prices[chosen])

    @property
    def ilp_time_s(self) -> float:
        return sum(s.result.solve_time_s for s in self.solutions.values() if s is not None)
