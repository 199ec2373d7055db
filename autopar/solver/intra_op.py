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

    minimize   sum_k m_k sum_s x[k,s] (compute[k,s] + own[k,s] + optimizer[k,s])  _weighted
             + sum_k m_k sum_iq r[k,i,q] reshard(output_i -> q)              _edge_terms
             + extra                                                        ShardingProblem.solve
    subject to
      one_strategy_k:   sum_s x[k,s] = 1                                     _add_variables
      src_a_i:          sum_j e[a,i,j] = x[k_u,i]                            ilp.pair_triggers
      dst_a_j:          sum_i e[a,i,j] = x[k_v,j]
                        (a pair with no valid reshard has no e: the sums forbid it)
      r_k_i_q_n:        r[k,i,q] >= e[a,i,j] for each class a from k and consumer
                        strategy j that sees q (x itself when one end is fixed) ilp.at_least_one
      memory_*:         rows over the per-node memory expressions     ShardingProblem.solve

compute, an op's own collectives (own: the vocabulary-parallel cross-entropy's per-token
reductions), optimizer and memory come from the cost API (cost/pricing.py `node_price`),
reshard(output_i -> q) from the reshard table (`edge_reshard`, Megatron's f included),
all in seconds of one training step on the traced batch. The caller adds the costs that
depend on the layout (`extra`: the data-parallel gradient sync, priced per parameter
byte) and the memory rows of its pipeline stages, and may solve one problem many times.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pulp
import torch.fx as fx

from autopar.cost.memory import tensor_bytes
from autopar.cost.pricing import consumer_strategy, edge_reshard, node_price
from autopar.solver import ilp
from autopar.strategies import GraphStrategies, Strategy


@dataclass
class IntraOpResult:
    strategies: dict[str, Strategy]  # every placeholder and call_function node
    status: str  # "optimal" or "feasible, not proven optimal (time limit)"
    objective_s: float
    solve_time_s: float
    num_variables: int
    num_constraints: int


@dataclass(frozen=True)
class UnitMemory:
    """One pipeline unit's memory: expressions in the ILP's choices, and lower bounds."""

    params: pulp.LpAffineExpression  # parameters, gradients and optimizer state
    activations: pulp.LpAffineExpression  # kept for backward, one traced batch
    least_params: float  # the smallest either can be, whatever is chosen
    least_activations: float


@dataclass
class _Context:
    traced: object
    strategies: GraphStrategies
    mesh: object
    tp: int
    training: bool
    dtype_bytes: int | None
    key_of: dict[str, str]
    multiplicity: Counter
    prob: pulp.LpProblem
    x: dict = field(default_factory=dict)  # key -> list of variables, or None (one candidate)
    folded: set = field(default_factory=set)  # keys that reuse their producer's variables


def _keys(traced, strategies) -> tuple[dict[str, str], Counter]:
    """Node -> its ILP key. Nodes at one position of identical blocks share a key (one
    choice, priced once) when they have the same candidates; a block whose dims lost a
    role (OPT flattens batch and sequence around its MLP) gets keys of its own."""
    key_of, variants = {}, defaultdict(list)
    for node in traced.graph_module.graph.nodes:
        info = traced.analysis.nodes.get(node.name)
        position = getattr(info, "position", None)
        if position is None:
            key_of[node.name] = node.name
            continue
        candidates, seen = strategies.candidates.get(node.name), variants[position]
        if candidates not in seen:
            seen.append(candidates)
        variant = seen.index(candidates)
        key_of[node.name] = f"block{position}" + (f"_v{variant}" if variant else "")
    return key_of, Counter(key_of.values())


def _representatives(traced, key_of: dict[str, str]) -> dict[str, fx.Node]:
    """The first node of each key, in graph order (its producers come first)."""
    representatives = {}
    for node in traced.graph_module.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            representatives.setdefault(key_of[node.name], node)
    return representatives


def _choice(c: _Context, key: str, index: int):
    """x[key, index] as a PuLP expression (a constant 1 for a single-candidate key)."""
    variables = c.x[key]
    return 1 if variables is None else variables[index]


def _producer_keys(c: _Context) -> dict[str, set[str]]:
    """Key -> the keys of its nodes' (first) producers: one for a node inside a block, two
    for a block's first node (the prologue feeds block 0, block i - 1 feeds block i)."""
    found = defaultdict(set)
    for node in c.traced.graph_module.graph.nodes:
        if node.op == "call_function" and node.all_input_nodes:
            found[c.key_of[node.name]].add(c.key_of[node.all_input_nodes[0].name])
    return found


def _follow_map(c: _Context, node: fx.Node, producers: dict) -> list[int] | None:
    """For a one-input node whose strategies match its producer's one to one (views and
    unary elementwise ops), strategy j -> the producer strategy it follows; else None.
    Every node of its key must read that producer's key, or the fold would skip edges."""
    if node.op != "call_function" or len(node.all_input_nodes) != 1:
        return None
    producer = node.all_input_nodes[0]
    if producer.op != "call_function" or c.x.get(c.key_of[producer.name]) is None:
        return None
    if len(producers[c.key_of[node.name]]) != 1:
        return None
    produced = [s.output for s in c.strategies.candidates[producer.name]]
    seen = [s.inputs[0] for s in c.strategies.candidates[node.name]]
    if len(set(produced)) != len(produced) or sorted(map(str, produced)) != sorted(map(str, seen)):
        return None
    return [produced.index(placement) for placement in seen]


def _add_variables(c: _Context, representatives: dict[str, fx.Node]) -> None:
    """One binary per (key, strategy), except that a follower reuses its producer's
    binaries: the fold of view and elementwise chains into their producers."""
    producers = _producer_keys(c)
    for key, node in representatives.items():
        candidates = c.strategies.candidates[node.name]
        if len(candidates) == 1:
            c.x[key] = None
            continue
        follows = _follow_map(c, node, producers)
        if follows is not None:
            producer_vars = c.x[c.key_of[node.all_input_nodes[0].name]]
            c.x[key] = [producer_vars[i] for i in follows]
            c.folded.add(key)
            continue
        name = ilp.safe(key)
        c.x[key] = [
            c.prob.add_variable(f"x_{name}_{i}", cat="Binary") for i in range(len(candidates))
        ]
        c.prob += pulp.lpSum(c.x[key]) == 1, f"one_strategy_{name}"


def _prices(c: _Context, representatives: dict[str, fx.Node]) -> dict:
    """(key, strategy index) -> NodePrice, for every candidate of every key."""
    return {
        (key, i): node_price(
            c.traced,
            node,
            strategy,
            c.mesh,
            c.tp,
            training=c.training,
            dtype_bytes=c.dtype_bytes,
        )  # fmt: skip
        for key, node in representatives.items()
        for i, strategy in enumerate(c.strategies.candidates[node.name])
    }


def _weighted(c: _Context, prices: dict, value) -> pulp.LpAffineExpression:
    """sum_k m_k sum_s value(price[k,s]) x[k,s] over every key."""
    terms = []
    for (key, i), price in prices.items():
        amount = value(price)
        if amount:
            terms.append(c.multiplicity[key] * amount * _choice(c, key, i))
    return pulp.lpSum(terms)


def _edge_classes(c: _Context) -> dict[tuple[str, str, int], list[tuple[fx.Node, fx.Node]]]:
    classes = defaultdict(list)
    for consumer in c.traced.graph_module.graph.nodes:
        if consumer.op not in ("call_function", "output"):
            continue
        for slot, producer in enumerate(consumer.all_input_nodes):
            key = (c.key_of[producer.name], c.key_of[consumer.name], slot)
            classes[key].append((producer, consumer))
    return classes


def _consumer_candidates(c: _Context, consumer: fx.Node) -> list[Strategy]:
    if consumer.op == "output":
        return [consumer_strategy(consumer, {})]
    return c.strategies.candidates[consumer.name]


def _edge_table(c: _Context, producer: fx.Node, consumer: fx.Node, slot: int) -> dict:
    """(i, j) -> (sharing key, seconds) for every valid producer strategy i and consumer
    strategy j."""
    nbytes = tensor_bytes(producer, c.dtype_bytes)
    price = functools.partial(c.mesh.tp_collective_time, group_size=c.tp)
    table = {}
    for i, src in enumerate(c.strategies.candidates[producer.name]):
        for j, dst in enumerate(_consumer_candidates(c, consumer)):
            edge = edge_reshard(c.traced, producer, src.output, dst, slot, c.training)
            if edge is not None:
                table[i, j] = (edge.key, edge.seconds(nbytes, price))
    return table


def _edge_triggers(c: _Context, edge_class, consumer: fx.Node, table) -> dict:
    """(i, j) -> an expression that is 1 when the edge's ends run strategies i and j;
    pairs with no valid reshard are forbidden."""
    src_key, dst_key, slot = edge_class
    name = ilp.safe(f"{src_key}__{dst_key}__{slot}")
    src_vars = c.x[src_key]
    dst_vars = c.x.get(dst_key) if consumer.op != "output" else None
    if src_key == dst_key:
        return ilp.diagonal_triggers(c.prob, src_vars or [1], table, name)
    if src_vars is None and dst_vars is None:
        assert (0, 0) in table, f"no reshard on the fixed edge {name}"
        return {(0, 0): 1}
    if src_vars is None or dst_vars is None:
        return ilp.one_sided_triggers(c.prob, src_vars, dst_vars, table, name)
    return ilp.pair_triggers(c.prob, src_vars, dst_vars, table, name)


def _edge_terms(c: _Context) -> pulp.LpAffineExpression:
    """Reshard costs, one per producer, strategy and sharing key: codegen inserts a single
    reshard for all the consumers that see the same placement and hand back the same
    gradient."""
    shared = defaultdict(list)  # (producer key, producer strategy, sharing key) -> triggers
    seconds = {}
    for (src_key, dst_key, slot), edges in _edge_classes(c).items():
        producer, consumer = edges[0]
        if dst_key in c.folded and c.key_of[consumer.all_input_nodes[0].name] == src_key:
            continue  # a follower sees exactly what its producer makes: no reshard
        table = _edge_table(c, producer, consumer, slot)
        for (i, j), trigger in _edge_triggers(c, (src_key, dst_key, slot), consumer, table).items():
            key, cost = table[i, j]
            if cost:
                shared[src_key, i, key].append(trigger)
                seconds[src_key, i, key] = cost
    terms = []
    for (src_key, i, key), triggers in shared.items():
        paid = ilp.at_least_one(c.prob, triggers, ilp.safe(f"r_{src_key}_{i}_{key}"))
        terms.append(c.multiplicity[src_key] * seconds[src_key, i, key] * paid)
    return pulp.lpSum(terms)


def _chosen(c: _Context, node: fx.Node) -> Strategy:
    candidates = c.strategies.candidates[node.name]
    variables = c.x[c.key_of[node.name]]
    if variables is None:
        return candidates[0]
    return candidates[max(range(len(variables)), key=lambda i: variables[i].value() or 0)]


class ShardingProblem:
    """The ILP of one traced graph at one tp degree, built once and solved as often as the
    layout search needs (with its own extra costs and memory rows each time)."""

    def __init__(self, traced, strategies, mesh, tp, *, training=True, dtype_bytes=None,
                 state_bytes_per_param=16.0):  # fmt: skip
        key_of, multiplicity = _keys(traced, strategies)
        prob = pulp.LpProblem("intra_op_sharding", pulp.LpMinimize)
        c = _Context(
            traced, strategies, mesh, tp, training, dtype_bytes, key_of, multiplicity, prob
        )
        representatives = _representatives(traced, key_of)
        _add_variables(c, representatives)
        prices = _prices(c, representatives)
        own = _weighted(c, prices, lambda p: p.compute_s + p.comm_s + p.optimizer_s)
        self.base_s = own + _edge_terms(c)
        self.param_bytes = _weighted(c, prices, lambda p: p.param_bytes)
        self.memory_bytes = _weighted(
            c, prices, lambda p: p.param_numel * state_bytes_per_param + p.activation_bytes
        )
        self._context, self._state_bytes = c, state_bytes_per_param
        self._options = defaultdict(list)  # key -> [(strategy index, NodePrice)]
        for (key, i), price in prices.items():
            self._options[key].append((i, price))

    def unit_memory(self, unit_of: dict[str, int], num_units: int) -> list[UnitMemory]:
        """Per pipeline unit: its parameter state and its activations kept for backward (one
        traced batch), each as an expression in x and as a lower bound over all choices."""
        c, counts = self._context, [Counter() for _ in range(num_units)]
        for node in c.traced.graph_module.graph.nodes:
            if node.name in unit_of and node.op in ("placeholder", "call_function"):
                counts[unit_of[node.name]][c.key_of[node.name]] += 1
        built = {}  # identical blocks count the same keys: one UnitMemory for them all
        for count in counts:
            key = frozenset(count.items())
            if key not in built:
                built[key] = self._unit(count)
        return [built[frozenset(count.items())] for count in counts]

    def _unit(self, count: Counter) -> UnitMemory:
        c, state = self._context, self._state_bytes
        params, kept, least_params, least_kept = [], [], 0.0, 0.0
        for key, n in count.items():
            options = self._options[key]
            params += [n * p.param_numel * state * _choice(c, key, i) for i, p in options]
            kept += [n * p.activation_bytes * _choice(c, key, i) for i, p in options]
            least_params += n * min(p.param_numel * state for _, p in options)
            least_kept += n * min(p.activation_bytes for _, p in options)
        return UnitMemory(pulp.lpSum(params), pulp.lpSum(kept), least_params, least_kept)

    def solve(self, *, extra=0, memory_rows=(), time_limit_s=None, what="") -> IntraOpResult:
        """Minimize base + `extra` subject to `memory_rows` ((name, expression, budget))."""
        c = self._context
        prob = c.prob.copy()  # the built problem stays as it is; this solve adds its own rows
        for name, expression, budget in memory_rows:
            prob += expression <= budget, f"memory_{ilp.safe(name)}"
        prob.setObjective(self.base_s + extra)
        status, elapsed = ilp.solve(prob, time_limit_s, f"at tp={c.tp}{what}")
        chosen = {
            node.name: _chosen(c, node)
            for node in c.traced.graph_module.graph.nodes
            if node.op in ("placeholder", "call_function")
        }
        return IntraOpResult(
            chosen, status, pulp.value(prob.objective) or 0.0, elapsed,
            prob.numVariables(), prob.numConstraints(),
        )  # fmt: skip


def solve_intra_op(traced, strategies, mesh, tp, *, training=True, dtype_bytes=None,
                   memory_budget_bytes=None, state_bytes_per_param=16.0,
                   time_limit_s=None) -> IntraOpResult:  # fmt: skip
    """One strategy per node minimizing predicted step time, the whole model's memory
    (one microbatch kept) under `memory_budget_bytes` (default: the device's)."""
    problem = ShardingProblem(
        traced, strategies, mesh, tp, training=training, dtype_bytes=dtype_bytes,
        state_bytes_per_param=state_bytes_per_param,
    )  # fmt: skip
    budget = mesh.device.memory_bytes if memory_budget_bytes is None else memory_budget_bytes
    rows = [("model", problem.memory_bytes, budget)]
    what = f" in {budget / 2**30:.1f} GiB per device"
    return problem.solve(memory_rows=rows, time_limit_s=time_limit_s, what=what)
