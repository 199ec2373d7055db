"""Each module's torch-native layout, read off a plan's placements, and a check that torch
would run the model with them.

A `Layout` is one module's entry of a `parallelize_module` plan as plain data. Sharded
weights give `colwise`, `rowwise`, `embedding-rows` (vocabulary-parallel) or
`embedding-cols`, found from each parameter's role (plan/roles.py). Under sequence
parallelism a module with replicated weights that the plan runs on sequence shards
(a norm) is `sequence`; a replicated linear that reads a sequence shard is `gather`
(its input made whole first) and a replicated embedding whose output the plan splits on
the sequence is `scatter`. `takes` says the module's input arrives as a sequence-sharded
DTensor (`Shard(takes)`), `gives` that its output stays a DTensor: `Shard(gives)` on the
sequence, or on the classes (-1) for an LM head whose loss the plan runs
vocabulary-parallel (torch's `loss_parallel`).

Between such modules torch passes DTensors through the model's own code (residual
adds), where a plain tensor meeting a DTensor fails. `torch_blocker` walks the plan's
graph as torch would run it and says where that happens, so `to_torch` falls back to
whole activations rather than hand out a plan torch cannot run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from autopar.normalize import path_name
from autopar.placement import TP, Shard
from autopar.plan.roles import PASS_THROUGH, Roles

LINEAR = "aten.linear.default"
EMBEDDING = "aten.embedding.default"
CROSS_ENTROPY = "aten.cross_entropy_loss.default"
# ops between an LM head and its loss that keep the class dim (views of the logits)
LOGIT_VIEWS = PASS_THROUGH + ("aten.slice.Tensor", "aten.alias.default")
# ops by which a norm reads its weight: torch's SequenceParallel runs such a module
NORMS = ("aten.mul.Tensor", "aten.layer_norm.default", "aten.rms_norm.default")


@dataclass(frozen=True)
class Layout:
    kind: str  # colwise rowwise embedding-rows embedding-cols sequence gather scatter
    paired: bool = False  # a linear of a Megatron pair: its shard stays local to the pair
    takes: int | None = None  # the input arrives as a DTensor sharded on this (sequence) dim
    gives: int | None = None  # the output stays a DTensor sharded on this dim (-1: classes)

    @property
    def shards_params(self) -> bool:
        """Does torch make this module's parameters DTensors?"""
        return self.kind not in ("gather", "scatter")


def module_of(fqn: str) -> tuple[str, str]:
    """'model.layers.0.mlp.up_proj.weight' -> ('model.layers.0.mlp.up_proj', 'weight')."""
    module, _, attr = fqn.rpartition(".")
    return module, attr


# --- sharded weights ----------------------------------------------------------------------


def _readers(plan, placeholder: str) -> set[str]:
    """The ops that read a parameter directly."""
    held = plan.tied_params.get(placeholder, placeholder)
    return {node.op for node in plan.strategies.values() if held in node.sources}


_KINDS = {
    (LINEAR, "column-parallel"): "colwise",
    (LINEAR, "row-parallel"): "rowwise",
    (EMBEDDING, "vocabulary-parallel embedding"): "embedding-rows",
    (EMBEDDING, "embedding, hidden dim sharded"): "embedding-cols",
}


def sharded_kinds(plan, roles: Roles, missing: list[str]) -> dict[str, str]:
    """Module path -> kind for each sharded weight torch can shard the same way (a
    module's bias follows its weight, as in torch's styles); the other sharded weights go
    to `missing`, with the reason."""
    found = {}
    for placeholder, fqn in plan.param_fqns.items():
        module, attr = module_of(fqn)
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


def megatron_parents(kinds: dict[str, str], plan) -> set[str]:
    """Parent modules whose sharded linears pair up: all column- or row-parallel, at least
    one of each, and no linear of theirs left replicated."""
    linears = defaultdict(set)  # parent -> its linear children (sharded or not)
    for placeholder, fqn in plan.param_fqns.items():
        module, attr = module_of(fqn)
        if attr == "weight" and _readers(plan, placeholder) == {LINEAR}:
            linears[module.rpartition(".")[0]].add(module)
    paired = set()
    for parent, children in linears.items():
        styles = {kinds.get(child) for child in children}
        if styles == {"colwise", "rowwise"}:
            paired.add(parent)
    return paired


# --- layouts ------------------------------------------------------------------------------


def module_layouts(plan, roles: Roles, kinds: dict[str, str], *, sequence: bool,
                   loss_head: str | None) -> dict[str, Layout]:  # fmt: skip
    """Every module's layout: its sharded kind, with the sequence-parallel edges when
    `sequence`, and the classes left sharded on `loss_head`."""
    paired = megatron_parents(kinds, plan)
    layouts = {}
    for placeholder, fqn in plan.param_fqns.items():
        module, attr = module_of(fqn)
        if attr != "weight":
            continue
        kind = kinds.get(module)
        layout = Layout(kind, paired=module.rpartition(".")[0] in paired) if kind else None
        if sequence:
            layout = _sequence_layout(plan, roles, placeholder, layout)
        if module == loss_head and layout is not None:
            layout = replace(layout, gives=-1)
        if layout is not None:
            layouts[module] = layout
    return layouts


def _sequence_dim(node, placement) -> int | None:
    """The dim `placement` shards on `node`'s value when that is a sequence dim: any dim
    but the last (the features; batch dims never shard on tp)."""
    shape = node.shape
    if not isinstance(placement, Shard) or placement.groups > 1 or not shape:
        return None
    if isinstance(shape[0], list):  # several outputs
        return None
    dim = placement.dim % len(shape)
    return dim if dim != len(shape) - 1 else None


def _seen_sequence_dim(plan, roles: Roles, name: str) -> int | None:
    """The sequence dim every reader of `name` sees it sharded on, if they agree."""
    node, seen = plan.strategies[name], set()
    for reader, slot in roles.consumers[name]:
        placement = plan.strategies[reader].placements.get(TP)
        seen.add(_sequence_dim(node, placement.inputs[slot]) if placement else None)
    return seen.pop() if len(seen) == 1 else None


def _sequence_layout(plan, roles: Roles, placeholder: str, layout: Layout | None):
    """`layout` with the sequence-sharded DTensors at its edges (or a new layout for a
    replicated module the plan runs on, or feeds, sequence shards)."""
    uses = roles.uses(placeholder)
    if len(uses) != 1:
        return layout
    name, slot = uses[0]
    reader = plan.strategies[name]
    placement = reader.placements.get(TP)
    gives = _sequence_dim(reader, placement.output) if placement else None
    if gives is None:
        gives = _seen_sequence_dim(plan, roles, name)
    if reader.op == LINEAR:
        source = plan.strategies[reader.sources[0 if slot else 1]]  # the activation
        made = source.placements.get(TP)
        takes = _sequence_dim(source, made.output) if made else None
        if layout is None:
            return Layout("gather", takes=takes) if takes is not None else None
        if layout.kind == "colwise":
            return replace(layout, takes=takes)
        return replace(layout, gives=gives)  # rowwise: reduce-scattered onto the sequence
    if reader.op == EMBEDDING:
        if layout is None:
            return Layout("scatter", gives=gives) if gives is not None else None
        return replace(layout, gives=gives)
    if layout is None and gives is not None and reader.op in NORMS:  # on sequence shards
        return Layout("sequence", takes=gives, gives=gives)
    return layout


def loss_head(plan) -> str | None:
    """The module of the linear whose logits a traced cross-entropy reads sharded on the
    classes (a vocabulary-parallel loss), if there is one."""
    for node in plan.strategies.values():
        placement = node.placements.get(TP)
        if node.op != CROSS_ENTROPY or not placement or not isinstance(placement.inputs[0], Shard):
            continue
        logits = plan.strategies[node.sources[0]]
        while logits.op in LOGIT_VIEWS:
            logits = plan.strategies[logits.sources[0]]
        weights = [plan.tied_params.get(s, s) for s in logits.sources[1:]]
        fqns = [plan.param_fqns[w] for w in weights if w in plan.param_fqns]
        if logits.op == LINEAR and fqns:
            return module_of(fqns[0])[0]
    return None


# --- would torch run it? ------------------------------------------------------------------


def torch_blocker(plan, layouts: dict[str, Layout], loss_parallel: bool) -> str | None:
    """Why torch, running the model with these layouts, would fail or compute other
    numbers; None when it would not. Values are followed in graph order: a module's
    output is a DTensor when its layout `gives` one, a parameter when torch shards it,
    anything else when one of its inputs is. Under `loss_parallel` the cross-entropy takes
    DTensor logits with plain targets and gives a DTensor loss."""
    prefixes = sorted(((path_name(m) + "_", m) for m in layouts), key=lambda p: -len(p[0]))

    def owner(name: str) -> str | None:
        return next((m for prefix, m in prefixes if name.startswith(prefix)), None)

    dtensor: dict[str, bool] = {}
    read = {source for node in plan.strategies.values() for source in node.sources}
    for name, node in plan.strategies.items():
        if node.op == "placeholder":
            fqn = plan.param_fqns.get(name)
            layout = layouts.get(module_of(fqn)[0]) if fqn else None
            dtensor[name] = bool(layout and layout.shards_params)
            continue
        module, sources = owner(name), [s for s in node.sources if s in dtensor]
        if module is not None:
            layout = layouts[module]
            outside = [s for s in sources if owner(s) != module and s not in plan.param_fqns]
            whole = [s for s in outside if not dtensor[s]]
            if layout.takes is not None and whole:
                return f"{module} would take {whole[0]} whole as its sequence shard"
            dtensor[name] = layout.gives is not None
            continue
        kinds = {dtensor[s] for s in sources}
        if kinds == {True, False} and not (loss_parallel and node.op == CROSS_ENTROPY):
            plain = next(s for s in sources if not dtensor[s])
            return f"{name} ({node.op}) would meet a DTensor with the plain tensor {plain}"
        dtensor[name] = True in kinds
    for name, is_dtensor in dtensor.items():
        loss = loss_parallel and plan.strategies[name].op == CROSS_ENTROPY
        if is_dtensor and name not in read and not loss:
            return f"{name} would leave the model as a DTensor"
    return None
