r"""Intra-op sharding as an integer linear program (after Alpa and PyTorch's autoparallel).

Sets. Nodes of the traced graph are grouped into keys k: corresponding nodes of
structurally identical transformer blocks share a key, so one block is solved once
and its choice reused by every copy; m_k counts the nodes of key k. A view or unary
elementwise node whose strategies match its producer's one to one follows it: it
reuses the producer's x (no variables, no edge), which folds such chains away. S_k
are the candidate strategies of key k (strategies/). An edge class a = (k_u, k_v,
slot) gathers the graph edges from a key-k_u node into input `slot` of a key-k_v node.

Variables.  x[k,s] in {0,1}: key k runs strategy s.
            e[a,i,j] >= 0: edge class a joins producer strategy i to consumer strategy j.
            r[k,i,q] in [0,1]: producer key k, running i, pays one reshard to q = (placement
                               seen, placement its gradient comes back in); codegen
                               shares it among all consumers that see q.

    minimize   sum_k m_k sum_s x[k,s] (compute[k,s] + optimizer[k,s])        _add_node_costs
             + sum_k m_k sum_iq r[k,i,q] reshard(output_i -> q)              _add_edge_costs
    subject to
      one_strategy_k:   sum_s x[k,s] = 1                                     _add_variables
      src_a_i:          sum_j e[a,i,j] = x[k_u,i]                            _pair_triggers
      dst_a_j:          sum_i e[a,i,j] = x[k_v,j]
                        (a pair with no valid reshard has no e: the sums forbid it)
      r_k_i_q_n:        r[k,i,q] >= e[a,i,j] for each class a from k and consumer
                        strategy j that sees q (x itself when one end is fixed) _at_least_one
      memory:           sum_k m_k sum_s x[k,s] mem[k,s] <= budget           _add_memory

Costs are seconds of one training step (forward and backward) from solver/costs.py;
reshard(output_i -> q) is the reshard table's entry (autopar/reshard.py), Megatron's f
(a replicated input whose gradient comes back partial) included.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pulp
import torch
import torch.fx as fx

from autopar.cost import comm
from autopar.errors import PlanError, SolverTimeLimit
from autopar.placement import Replicate, Shard
from autopar.reshard import reshard
from autopar.solver import costs
from autopar.strategies import GraphStrategies, Strategy


@dataclass
class IntraOpResult:
    strategies: dict[str, Strategy]  # every placeholder and call_function node
    status: str  # "optimal" or "feasible, not proven optimal (time limit)"
    objective_s: float
    solve_time_s: float
    num_variables: int
    num_constraints: int


@dataclass
class _Problem:
    traced: object
    strategies: GraphStrategies
    mesh: object
    tp: int
    training: bool
    dtype_bytes: int | None
    state_bytes_per_param: float
    key_of: dict[str, str]
    multiplicity: Counter
    prob: pulp.LpProblem
    x: dict  # key -> list of variables or None (single candidate)
    folded: set = field(default_factory=set)  # keys that reuse their producer's variables


def _nbytes(node: fx.Node, dtype_bytes: int | None) -> int:
    val = node.meta.get("val")
    val = val[0] if isinstance(val, (list, tuple)) else val
    if not isinstance(val, torch.Tensor):
        return 0
    width = dtype_bytes if dtype_bytes and val.dtype.is_floating_point else val.element_size()
    return val.numel() * width


def traffic_bytes(info, dtype_bytes: int | None) -> float:
    """Bytes a node moves, at the training dtype when one is given."""
    nbytes = info.bytes_read + info.bytes_written
    if dtype_bytes and info.dtype is not None and info.dtype.is_floating_point:
        return nbytes * dtype_bytes / info.dtype.itemsize
    return nbytes


def _backward_bytes_factor(node: fx.Node) -> float:
    if node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor):
        return costs.BACKWARD_BYTES_FACTOR
    out_shape = node.meta["val"].shape
    broadcast = any(arg.meta["val"].shape != out_shape for arg in node.all_input_nodes)
    return costs.BROADCAST_SUM_BACKWARD_FACTOR if broadcast else costs.PASS_THROUGH_BACKWARD_FACTOR


def node_compute_seconds(traced, node, strategy, mesh, tp, training, dtype_bytes) -> float:
    """Roofline time of a call_function node under `strategy`, forward plus backward."""
    info = traced.analysis.nodes[node.name]
    return costs.compute_seconds(
        info.flops, traffic_bytes(info, dtype_bytes), strategy.splits_work, mesh, tp, training,
        _backward_bytes_factor(node),
    )  # fmt: skip


def _local_fraction(strategy_output, tp: int) -> float:
    return 1.0 / tp if isinstance(strategy_output, Shard) else 1.0


def _keys(traced) -> tuple[dict[str, str], Counter]:
    key_of = {}
    for node in traced.graph_module.graph.nodes:
        info = traced.analysis.nodes.get(node.name)
        position = getattr(info, "position", None)
        key_of[node.name] = f"block{position}" if position is not None else node.name
    return key_of, Counter(key_of.values())


def _choice(p: _Problem, key: str, index: int):
    """x[key, index] as a PuLP expression (a constant 1 for a single-candidate key)."""
    variables = p.x[key]
    return 1 if variables is None else variables[index]


def _follow_map(p: _Problem, node: fx.Node) -> list[int] | None:
    """For a one-input node whose strategies match its producer's one to one (views and
    unary elementwise ops), strategy j -> the producer strategy it follows; else None."""
    if node.op != "call_function" or len(node.all_input_nodes) != 1:
        return None
    producer = node.all_input_nodes[0]
    if producer.op != "call_function" or p.x.get(p.key_of[producer.name]) is None:
        return None
    produced = [s.output for s in p.strategies.candidates[producer.name]]
    seen = [s.inputs[0] for s in p.strategies.candidates[node.name]]
    if len(set(produced)) != len(produced) or sorted(map(str, produced)) != sorted(map(str, seen)):
        return None
    return [produced.index(placement) for placement in seen]


def _add_variables(p: _Problem, representatives: dict[str, fx.Node]) -> None:
    """One binary per (key, strategy), except that a follower reuses its producer's
    binaries: the fold of view and elementwise chains into their producers."""
    for key, node in representatives.items():
        candidates = p.strategies.candidates[node.name]
        if len(candidates) == 1:
            p.x[key] = None
            continue
        follows = _follow_map(p, node)
        if follows is not None:
            producer_vars = p.x[p.key_of[node.all_input_nodes[0].name]]
            p.x[key] = [producer_vars[i] for i in follows]
            p.folded.add(key)
            continue
        safe = _safe(key)
        p.x[key] = [
            p.prob.add_variable(f"x_{safe}_{i}", cat="Binary") for i in range(len(candidates))
        ]
        p.prob += pulp.lpSum(p.x[key]) == 1, f"one_strategy_{safe}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _node_cost(p: _Problem, node: fx.Node, strategy: Strategy) -> float:
    if node.op == "placeholder":
        if not (p.training and node.name in p.traced.param_fqns and node.users):
            return 0.0  # an unused placeholder is a tied duplicate: its twin pays
        numel = node.meta["val"].numel() * _local_fraction(strategy.output, p.tp)
        return costs.optimizer_seconds(int(numel), p.mesh)
    return node_compute_seconds(p.traced, node, strategy, p.mesh, p.tp, p.training, p.dtype_bytes)


def _add_node_costs(p: _Problem, representatives: dict[str, fx.Node]) -> list:
    terms = []
    for key, node in representatives.items():
        for i, strategy in enumerate(p.strategies.candidates[node.name]):
            cost = _node_cost(p, node, strategy)
            if cost:
                terms.append(p.multiplicity[key] * cost * _choice(p, key, i))
    return terms


def _edge_classes(p: _Problem) -> dict[tuple[str, str, int], list[tuple[fx.Node, fx.Node]]]:
    classes = defaultdict(list)
    for consumer in p.traced.graph_module.graph.nodes:
        if consumer.op not in ("call_function", "output"):
            continue
        for slot, producer in enumerate(consumer.all_input_nodes):
            key = (p.key_of[producer.name], p.key_of[consumer.name], slot)
            classes[key].append((producer, consumer))
    return classes


def _consumer_candidates(p: _Problem, consumer: fx.Node) -> list[Strategy]:
    if consumer.op == "output":  # every rank returns the full output
        return [Strategy(Replicate(), tuple(Replicate() for _ in consumer.all_input_nodes))]
    return p.strategies.candidates[consumer.name]


def _edge_cost_table(p: _Problem, producer: fx.Node, consumer: fx.Node, slot: int) -> dict:
    """(i, j) -> (reshard key, seconds) for every valid producer strategy i and consumer
    strategy j; the key (placement seen, gradient handed back) is what codegen shares."""
    nbytes = _nbytes(producer, p.dtype_bytes)
    carries_grad = p.training and p.traced.analysis.nodes[producer.name].requires_grad
    price = functools.partial(p.mesh.tp_collective_time, group_size=p.tp)
    table = {}
    for i, src in enumerate(p.strategies.candidates[producer.name]):
        for j, dst in enumerate(_consumer_candidates(p, consumer)):
            grad = dst.input_grad(slot) if carries_grad else None
            entry = reshard(src.output, dst.inputs[slot], grad)
            if entry is not None:
                seconds = comm.reshard_seconds(entry, nbytes, price)
                table[i, j] = (f"{dst.inputs[slot]}~{grad}", seconds)
    return table


def _add_edge_costs(p: _Problem) -> list:
    """Reshard costs, one per producer and target placement: codegen inserts a single
    collective for all the consumers that want the same placement of one value."""
    shared = defaultdict(list)  # (producer key, producer strategy, placement seen) -> triggers
    seconds = {}
    for (src_key, dst_key, slot), edges in _edge_classes(p).items():
        producer, consumer = edges[0]
        if dst_key in p.folded and p.key_of[consumer.all_input_nodes[0].name] == src_key:
            continue  # a follower sees exactly what its producer makes: no reshard
        table = _edge_cost_table(p, producer, consumer, slot)
        for (i, j), trigger in _edge_triggers(p, (src_key, dst_key, slot), consumer, table).items():
            seen, cost = table[i, j]
            if cost:
                shared[src_key, i, seen].append(trigger)
                seconds[src_key, i, seen] = cost
    terms = []
    for (src_key, i, placement), triggers in shared.items():
        paid = _at_least_one(p, triggers, _safe(f"r_{src_key}_{i}_{placement}"))
        terms.append(p.multiplicity[src_key] * seconds[src_key, i, placement] * paid)
    return terms


def _at_least_one(p: _Problem, triggers: list, name: str):
    """An expression that is 1 when any trigger is (a new [0, 1] variable if several)."""
    if len(triggers) == 1:
        return triggers[0]
    paid = p.prob.add_variable(name, lowBound=0, upBound=1)
    for n, trigger in enumerate(triggers):
        p.prob += paid >= trigger, f"{name}_{n}"
    return paid


def _edge_triggers(p, edge_class, consumer, table) -> dict:
    """(i, j) -> an expression that is 1 when the edge's ends run strategies i and j;
    pairs with no valid reshard are forbidden."""
    src_key, dst_key, slot = edge_class
    name = _safe(f"{src_key}__{dst_key}__{slot}")
    src_vars = p.x[src_key]
    dst_vars = p.x.get(dst_key) if consumer.op != "output" else None
    if src_key == dst_key:
        return _diagonal_triggers(p, src_vars or [1], table, name)
    if src_vars is None and dst_vars is None:
        if (0, 0) not in table:
            raise PlanError(f"internal: no reshard on fixed edge {name}")
        return {(0, 0): 1}
    if src_vars is None or dst_vars is None:
        return _one_sided_triggers(p, src_vars, dst_vars, table, name)
    return _pair_triggers(p, src_vars, dst_vars, table, name)


def _diagonal_triggers(p, variables, table, name) -> dict:
    """Both ends share a key (corresponding nodes of consecutive blocks): same choice."""
    triggers = {}
    for i, var in enumerate(variables):
        if (i, i) not in table:
            p.prob += var == 0, f"no_reshard_{name}_{i}"
        else:
            triggers[i, i] = var
    return triggers


def _one_sided_triggers(p, src_vars, dst_vars, table, name) -> dict:
    """One end has a single candidate: the edge is linear in the other end's choice."""
    free_vars, fixed_is_src = (dst_vars, True) if src_vars is None else (src_vars, False)
    triggers = {}
    for k, var in enumerate(free_vars):
        pair = (0, k) if fixed_is_src else (k, 0)
        if pair not in table:
            p.prob += var == 0, f"no_reshard_{name}_{k}"
        else:
            triggers[pair] = var
    return triggers


def _pair_triggers(p, src_vars, dst_vars, table, name) -> dict:
    e = {pair: p.prob.add_variable(f"e_{name}_{pair[0]}_{pair[1]}", lowBound=0) for pair in table}
    for i, var in enumerate(src_vars):
        p.prob += (
            pulp.lpSum(e[i, j] for j in range(len(dst_vars)) if (i, j) in e) == var,
            (f"src_{name}_{i}"),
        )
    for j, var in enumerate(dst_vars):
        p.prob += (
            pulp.lpSum(e[i, j] for i in range(len(src_vars)) if (i, j) in e) == var,
            (f"dst_{name}_{j}"),
        )
    return e


def allocates(traced, node: fx.Node) -> bool:
    """Does the node's output take new memory? Views and aliases write nothing
    (analyze.py knows them by their FakeTensors sharing the input's storage)."""
    return traced.analysis.nodes[node.name].bytes_written > 0


def _memory_bytes(p: _Problem, node: fx.Node, strategy: Strategy, activation_copies: float):
    fraction = _local_fraction(strategy.output, p.tp)
    if node.name in p.traced.param_fqns and node.users:
        return node.meta["val"].numel() * fraction * p.state_bytes_per_param
    is_activation = node.op == "call_function" and p.traced.analysis.nodes[node.name].requires_grad
    if p.training and is_activation and allocates(p.traced, node):
        return _nbytes(node, p.dtype_bytes) * fraction * activation_copies
    return 0.0


def _add_memory(p, representatives, budget_bytes: float, activation_copies: float) -> None:
    terms = []
    for key, node in representatives.items():
        for i, strategy in enumerate(p.strategies.candidates[node.name]):
            mem = _memory_bytes(p, node, strategy, activation_copies)
            if mem:
                terms.append(p.multiplicity[key] * mem * _choice(p, key, i))
    p.prob += pulp.lpSum(terms) <= budget_bytes, "memory"


@functools.cache
def _highs_available() -> bool:
    """HiGHS prints a banner on its first instance; take it here, with stdout muted."""
    if not pulp.HiGHS().available():
        return False
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return True


def _solver(time_limit_s: float | None):
    """HiGHS when highspy is installed (faster), else PuLP's bundled CBC."""
    if _highs_available():
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC but still ships it
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def _chosen(p: _Problem, node: fx.Node) -> Strategy:
    candidates = p.strategies.candidates[node.name]
    variables = p.x[p.key_of[node.name]]
    if variables is None:
        return candidates[0]
    return candidates[max(range(len(variables)), key=lambda i: variables[i].value() or 0)]


def _check_status(p: _Problem, budget_bytes: float) -> str:
    solution = pulp.LpSolution[p.prob.sol_status]
    if solution == "Optimal Solution Found":
        return "optimal"
    if solution == "Solution Found":
        return "feasible, not proven optimal (time limit)"
    if solution == "No Solution Found" and pulp.LpStatus[p.prob.status] == "Not Solved":
        raise SolverTimeLimit(
            f"the sharding ILP at tp={p.tp} found no solution within its time limit; "
            "raise time_limit_s (or leave it unset)"
        )
    raise PlanError(
        f"no tensor-parallel sharding at tp={p.tp} fits in {budget_bytes / 2**30:.1f} GiB per "
        f"device (solver status: {pulp.LpStatus[p.prob.status]}); use more devices, a larger "
        "pipeline degree, more microbatches or a smaller batch"
    )


def _representatives(traced, key_of: dict[str, str]) -> dict[str, fx.Node]:
    """The first node of each key, in graph order (its producers come first)."""
    representatives = {}
    for node in traced.graph_module.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            representatives.setdefault(key_of[node.name], node)
    return representatives


def solve_intra_op(
    traced,
    strategies: GraphStrategies,
    mesh,
    tp: int,
    *,
    training: bool = True,
    dtype_bytes: int | None = None,
    memory_budget_bytes: float | None = None,
    activation_copies: float = 1.0,
    state_bytes_per_param: float = 16.0,
    time_limit_s: float | None = None,
) -> IntraOpResult:
    """Choose one strategy per node minimizing predicted step time under the memory bound."""
    key_of, multiplicity = _keys(traced)
    representatives = _representatives(traced, key_of)
    prob = pulp.LpProblem("intra_op_sharding", pulp.LpMinimize)
    p = _Problem(
        traced, strategies, mesh, tp, training, dtype_bytes, state_bytes_per_param, key_of,
        multiplicity, prob, {},
    )  # fmt: skip
    _add_variables(p, representatives)
    objective = _add_node_costs(p, representatives) + _add_edge_costs(p)
    prob += pulp.lpSum(objective)
    budget = memory_budget_bytes if memory_budget_bytes is not None else mesh.device.memory_bytes
    _add_memory(p, representatives, budget, activation_copies)
    start = time.perf_counter()
    prob.solve(_solver(time_limit_s))
    elapsed = time.perf_counter() - start
    status = _check_status(p, budget)
    chosen = {
        node.name: _chosen(p, node)
        for node in traced.graph_module.graph.nodes
        if node.op in ("placeholder", "call_function")
    }
    return IntraOpResult(
        chosen, status, pulp.value(prob.objective) or 0.0, elapsed,
        prob.numVariables(), prob.numConstraints(),
    )  # fmt: skip
