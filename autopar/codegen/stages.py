"""Split a rank's fx graph into pipeline stage graphs, one `GraphModule` per stage.

Input: the graph one rank runs (the traced graph, or `shard_graph`'s output with
its collectives) and a stage per node. Output: per stage a graph

    forward(*received, *inputs, *state) -> tuple(sent)

where `received` are the values the previous stage sends (stage 0: the user
inputs it reads), `inputs` the user inputs a later stage reads (given to it
directly by the caller, never sent down the pipeline), `state` the parameter /
buffer / constant placeholders the stage reads, and `sent` exactly the next
stage's `received` (last stage: the graph's outputs, in their original order).
User inputs come in user-input order; received values in the order of the source
graph, and state follows placeholder order. Node names are kept, so stage code
reads like the unsplit code.

Rules:

- *Contiguous.* A node never runs before a producer it reads: stage(input) <=
  stage(node), else `AutoparError`. A value produced in stage a and last read in
  stage b > a crosses every boundary in between: stages a+1 .. b-1 receive it and
  send it on unchanged (pass-through). Graph outputs computed before the last
  stage are passed through to it.
- *User inputs go where they are read.* Every stage that reads a user input (ids,
  masks, positions) gets it from the caller, as stage 0 does: an input is never an
  activation, whose buffer the pipeline's shape inference would make up.
- *State is local.* A parameter (buffer, constant) read by several stages (a tied
  embedding) is in the `state` of each of them; each stage's gradient for it is
  one summand of the full gradient.
- *Recompute what state and inputs alone determine.* A node whose inputs are only
  state placeholders and other such nodes (not random: `arange`, masks built from
  `arange`, rotary tables from a buffer, a collective on a parameter), or that
  makes an integer or boolean tensor from placeholders and such nodes (positions
  and masks built from the user's ids or attention mask) never crosses a
  boundary: every stage that reads it computes it. Its assigned stage is ignored.
  This keeps masks, ids and parameter-derived tensors off the wire.
- *Only tensors cross.* Any other value (an int, a shape, a tuple) produced in one
  stage and read in a later one raises `AutoparError` naming it.
- *Multi-output nodes stay whole.* A `getitem` of a multi-output node (`split`)
  runs in its producer's stage, wherever it was assigned (or if it was not).

`stage_of_nodes` extends a plan's assignment (traced-graph nodes only) to the nodes
codegen inserted: such a node runs in the earliest stage among its users, so a
collective on a stage boundary runs once, on the receiving side; a node with no
users but the output runs in its latest producer's stage.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from autopar.errors import AutoparError

_MAX_LISTED = 8  # offending nodes named in one error message
_COMPUTED_OPS = ("call_function", "call_method", "call_module")


@dataclass
class StageGraph:
    """One pipeline stage: `graph_module(*received, *state)` returns the `sent` values."""

    index: int
    graph_module: fx.GraphModule
    received: list[str]  # from the previous stage, in argument order (stage 0: user inputs)
    state: list[str]  # parameter / buffer / constant placeholders, after `inputs`
    sent: list[str]  # the next stage's `received`; last stage: the graph's outputs
    inputs: list[str] = field(default_factory=list)  # user inputs read directly (stage > 0)


# --- the plan's assignment, extended ----------------------------------------------------


def stage_of_nodes(
    graph_module: fx.GraphModule, plan_stage_nodes: Sequence[Sequence[str]]
) -> dict[str, int]:
    """Stage of every node of `graph_module`, from the plan's per-stage node names.

    Plan names of placeholders are ignored; a placeholder gets the earliest stage
    that reads it (for information: `split_stages` feeds user inputs to stage 0 and
    state to every stage that reads it). Names the graph lacks, or listed in two
    stages, raise `AutoparError`.
    """
    graph = graph_module.graph
    stage_of = _plan_assignment(graph, plan_stage_nodes)
    _colocate_getitems(graph, stage_of)
    for node in reversed(graph.nodes):  # inserted nodes: the earliest stage among users
        if node.op in _COMPUTED_OPS and node.name not in stage_of:
            users = [stage_of[u.name] for u in node.users if u.name in stage_of]
            if users:
                stage_of[node.name] = min(users)
    for node in graph.nodes:  # read by the output only: its latest producer's stage
        if node.op in _COMPUTED_OPS and node.name not in stage_of:
            inputs = [stage_of.get(u.name, 0) for u in node.all_input_nodes]
            stage_of[node.name] = max(inputs, default=0)
    _colocate_getitems(graph, stage_of)
    for node in graph.find_nodes(op="placeholder"):
        stage_of[node.name] = min(
            (stage_of[u.name] for u in node.users if u.op != "output"), default=0
        )
    return stage_of


def _plan_assignment(graph: fx.Graph, plan_stage_nodes) -> dict[str, int]:
    nodes = {node.name: node for node in graph.nodes}
    missing = [name for names in plan_stage_nodes for name in names if name not in nodes]
    if missing:
        raise AutoparError(
            f"the plan's stages name {len(missing)} nodes this graph lacks "
            f"({_listed(missing)}); the plan was made for another graph: plan this model again"
        )
    stage_of: dict[str, int] = {}
    for index, names in enumerate(plan_stage_nodes):
        for name in names:
            if nodes[name].op == "placeholder":
                continue
            if stage_of.setdefault(name, index) != index:
                raise AutoparError(
                    f"node {name} is listed in stages {stage_of[name]} and {index}; "
                    "a node belongs to one pipeline stage"
                )
    return stage_of


def _is_element_of_tuple(node: fx.Node) -> bool:
    """A getitem that picks one output of a multi-output node (split, ...)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    producer = node.args[0]
    return isinstance(producer, fx.Node) and isinstance(producer.meta.get("val"), list | tuple)


def _colocate_getitems(graph: fx.Graph, stage_of: dict[str, int]) -> None:
    for node in graph.nodes:
        producer = node.args[0] if _is_element_of_tuple(node) else None
        if producer is not None and producer.name in stage_of:
            stage_of[node.name] = stage_of[producer.name]


# --- splitting ----------------------------------------------------------------------------


def split_stages(
    graph_module: fx.GraphModule,
    stage_of: Mapping[str, int],
    num_stages: int,
    user_inputs: Sequence[str],
) -> list[StageGraph]:
    """Split `graph_module` into `num_stages` stage graphs (rules in the module docstring).

    `stage_of` maps each call_function node name to its stage (`stage_of_nodes` makes
    one from a plan); entries for placeholders and recomputed nodes are not needed.
    """
    graph = graph_module.graph
    inputs = _user_input_nodes(graph, user_inputs)
    recomputed = derived_nodes(graph, set(inputs))
    stage = _checked_stages(graph, stage_of, num_stages, recomputed)
    outputs = _output_nodes(graph)
    latest = _latest_readers(stage, outputs, num_stages)
    crossing = _crossings(graph, stage, latest, num_stages)
    stages = []
    for index in range(num_stages):
        sent = crossing[index] if index < num_stages - 1 else outputs
        computed = _computed_nodes(graph, index, stage, recomputed, sent)
        direct = [node for node in inputs if node in _reads(computed, sent)]
        received, given = (direct, []) if index == 0 else (crossing[index - 1], direct)
        module, state = _build_stage(graph_module, index, [*received, *given], computed, sent)
        names = _names(received), state, _names(sent), _names(given)
        stages.append(StageGraph(index, module, *names))
    return stages


def _reads(computed: list[fx.Node], sent: list[fx.Node]) -> set[fx.Node]:
    return {u for node in computed for u in node.all_input_nodes} | set(sent)


def _names(nodes) -> list[str]:
    return [node.name for node in nodes]


def _listed(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _user_input_nodes(graph: fx.Graph, user_inputs: Sequence[str]) -> list[fx.Node]:
    placeholders = {node.name: node for node in graph.find_nodes(op="placeholder")}
    unknown = [name for name in user_inputs if name not in placeholders]
    if unknown:
        raise AutoparError(
            f"user inputs {unknown} are not placeholders of the graph (placeholders: "
            f"{_listed(list(placeholders))}); pass TracedModel.user_inputs"
        )
    return [placeholders[name] for name in user_inputs]


def _is_random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _is_integral(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.is_floating_point()


def derived_nodes(graph: fx.Graph, user_inputs: set[fx.Node]) -> set[fx.Node]:
    """Nodes recomputed by every stage reading them, never sent between stages: made from
    state (and what is made from it) alone, or integer / boolean tensors made from
    placeholders and such nodes. The pipeline's pricing (solver/pipeline.py) reads it too."""
    placeholders = set(graph.find_nodes(op="placeholder"))
    known = placeholders - user_inputs  # state, then every derived node
    for node in graph.nodes:
        if node.op == "get_attr":
            known.add(node)
        elif node.op in _COMPUTED_OPS and not _is_random(node):
            allowed = known | placeholders if _is_integral(node) else known
            if all(u in allowed for u in node.all_input_nodes):
                known.add(node)
    return known - placeholders


def _checked_stages(graph, stage_of, num_stages, recomputed) -> dict[fx.Node, int]:
    """Stage per computed node: complete, in range, getitems with producers, contiguous."""
    if num_stages < 1:
        raise AutoparError(f"num_stages must be at least 1, got {num_stages}")
    nodes = [n for n in graph.nodes if n.op in _COMPUTED_OPS and n not in recomputed]
    stage: dict[fx.Node, int] = {}
    for node in nodes:
        if _is_element_of_tuple(node) and node.args[0] in stage:
            stage[node] = stage[node.args[0]]
        elif node.name in stage_of:
            stage[node] = stage_of[node.name]
    unassigned = [n.name for n in nodes if n not in stage]
    bad = [f"{n.name}={s!r}" for n, s in stage.items() if s not in range(num_stages)]
    if unassigned or bad:
        raise AutoparError(
            f"every computed node needs a stage in 0..{num_stages - 1}: unassigned "
            f"[{_listed(unassigned)}], out of range [{_listed(bad)}]; derive the stages "
            "of inserted nodes with stage_of_nodes"
        )
    _check_contiguous(stage)
    return stage


def _check_contiguous(stage: dict[fx.Node, int]) -> None:
    backwards = [
        f"{node.name} (stage {s}) reads {u.name} (stage {stage[u]})"
        for node, s in stage.items()
        for u in node.all_input_nodes
        if u in stage and stage[u] > s
    ]
    if backwards:
        raise AutoparError(
            f"stage assignment is not contiguous: {_listed(backwards)}; a node must be in "
            "the same stage as its inputs or a later one"
        )


def _output_nodes(graph: fx.Graph) -> list[fx.Node]:
    (output,) = graph.find_nodes(op="output")
    values = output.args[0]
    values = values if isinstance(values, list | tuple) else (values,)
    constants = [repr(v) for v in values if not isinstance(v, fx.Node)]
    if constants:
        raise AutoparError(
            f"the graph returns non-node values {constants}; stage splitting needs every "
            "output to be a node of the graph"
        )
    return list(values)


def _latest_readers(stage, outputs, num_stages) -> dict[fx.Node, int]:
    """Latest stage reading each value; the graph's outputs are read by the last stage."""
    latest: dict[fx.Node, int] = {}
    for node, s in stage.items():
        for u in node.all_input_nodes:
            latest[u] = max(latest.get(u, s), s)
    for u in outputs:
        latest[u] = num_stages - 1
    return latest


def _crossings(graph, home, latest, num_stages) -> list[list[fx.Node]]:
    """Per boundary k | k+1, in graph order, the values made at or before k and read after
    (user inputs have no home: each stage reading one gets it directly)."""
    crossing = [[] for _ in range(num_stages - 1)]
    for node in graph.nodes:
        if node in home and node in latest:
            for k in range(home[node], latest[node]):
                crossing[k].append(node)
    _check_tensors(crossing, home, latest)
    return crossing


def _check_tensors(crossing, home, latest) -> None:
    crossers = dict.fromkeys(node for boundary in crossing for node in boundary)
    offending = [
        f"{n.name} ({type(n.meta['val']).__name__}, made in stage {home[n]}, read in stage "
        f"{latest[n]})"
        for n in crossers
        if "val" in n.meta and not isinstance(n.meta["val"], torch.Tensor)
    ]
    if offending:
        raise AutoparError(
            f"only tensors can cross pipeline stage boundaries, but {_listed(offending)} "
            "would; put the readers in the producer's stage"
        )


def _computed_nodes(graph, index, stage, recomputed, sent) -> list[fx.Node]:
    """The stage's own nodes and the state-derived ones they or its outputs need, in order."""
    own = {node for node, s in stage.items() if s == index}
    needed: set[fx.Node] = set()
    pending = [u for node in own for u in node.all_input_nodes] + list(sent)
    while pending:
        node = pending.pop()
        if node in recomputed and node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes)
    return [node for node in graph.nodes if node in own or node in needed]


def _build_stage(source, index, received, computed, sent) -> tuple[fx.GraphModule, list[str]]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in received:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    reads = {u for node in computed for u in node.all_input_nodes} | set(sent)
    state = [n for n in source.graph.find_nodes(op="placeholder") if n in reads and n not in env]
    for node in state:
        env[node] = graph.node_copy(node)
    for node in computed:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[node] for node in sent))
    graph.lint()
    module = fx.GraphModule(source, graph, class_name=f"Stage{index}")
    return module, _names(state)
