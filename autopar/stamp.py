"""Capture a deep model from a few of its blocks: export three, stamp out the rest.

torch.export traces every op of every block, and its time grows faster than the
depth (GPT-3 175B: about 10 s for 96 blocks, 25 s for 192 on a 2-core machine). A
stack of identical blocks is one computation repeated, so `export_stamped` exports
the model with only the stack's first `EXPORTED` blocks, checks that the last two
of them are the same graph (same ops, shapes and arguments, reading the block
before them alike), and copies the last one for every block left out: new
parameter placeholders named as export names them, module paths renumbered, and
the FakeTensor values shared with the template (shapes are what later steps read)
except for views of a value that now lives elsewhere, which view the copy instead.
The result is the graph the whole model exports to, node for node (tests compare
them), in a fraction of the time.

A stack qualifies when it is an `nn.ModuleList` of at least `MIN_BLOCKS` children
of one class with the same parameter and buffer shapes and the same settings (the
plain attributes of every submodule, but for the layer's own index). Anything that
would make the copies differ from what export would trace (a block reading
lifted constants or an earlier block than its predecessor, outputs reading
blocks other than the last, code between the blocks) returns None, and capture
exports the whole model.
"""

from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from autopar.analyze import node_signature

MIN_BLOCKS = 6
EXPORTED = 3  # the first block may differ (it reads the embeddings); two more to compare
LAYER_INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number"})
_PLACEHOLDER_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}
_LIFTED_CONSTANTS = {InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ, InputKind.TOKEN}
_SETTING_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class BlockStack:
    """A model's stack of identical blocks: `path` ("transformer.h") holds `length`."""

    path: str
    length: int


@dataclass
class ExportedGraph:
    """What capture keeps of an ExportedProgram, whether exported whole or stamped."""

    graph_module: fx.GraphModule
    graph_signature: ExportGraphSignature
    constants: dict
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec

    @classmethod
    def of(cls, ep: ExportedProgram) -> ExportedGraph:
        spec = ep.call_spec
        return cls(ep.graph_module, ep.graph_signature, ep.constants, spec.in_spec, spec.out_spec)


def _settings(module: nn.Module) -> tuple:
    """Class, state shapes and plain attributes of `module` and its submodules."""
    found = []
    for name, sub in module.named_modules():
        plain = sorted(
            (key, value)
            for key, value in vars(sub).items()
            if not key.startswith("_")
            and key not in LAYER_INDEX_ATTRIBUTES
            and isinstance(value, _SETTING_TYPES)
        )
        found.append((name, type(sub), tuple(plain)))
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        found.append((name, tuple(tensor.shape), tensor.dtype, tensor.requires_grad))
    return tuple(found)


def find_stack(model: nn.Module) -> BlockStack | None:
    """The longest ModuleList of identical blocks, if it has at least MIN_BLOCKS."""
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < MIN_BLOCKS:
            continue
        if best is not None and len(module) <= best.length:
            continue
        first = _settings(module[0])
        if all(_settings(block) == first for block in list(module)[1:]):
            best = BlockStack(path, len(module))
    return best


@contextlib.contextmanager
def truncated(model: nn.Module, stack: BlockStack, keep: int):
    """`model` with only the stack's first `keep` blocks, restored on exit."""
    parent_path, _, attribute = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    whole = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList(list(whole)[:keep]))
    try:
        yield
    finally:
        setattr(parent, attribute, whole)


# ----------------------------------------------------------------------------- stamping


class _Layout:
    """Where each node of the truncated export sits: before, in or after the blocks."""

    def __init__(self, ep: ExportedProgram, stack: BlockStack):
        self.stack = stack
        specs = ep.graph_signature.input_specs
        self.spec = {spec.arg.name: spec for spec in specs}
        self.block_of: dict[fx.Node, int] = {}
        graph = ep.graph_module.graph
        for node in graph.nodes:
            index = self._index(node)
            if index is not None:
                self.block_of[node] = index
        self.blocks = [
            [n for n in graph.nodes if self.block_of.get(n) == i and n.op == "call_function"]
            for i in range(EXPORTED)
        ]
        self.position = {n: i for block in self.blocks for i, n in enumerate(block)}
        self.state = [
            [n for n in graph.find_nodes(op="placeholder") if self.block_of.get(n) == i]
            for i in range(EXPORTED)
        ]

    def _index(self, node: fx.Node) -> int | None:
        if node.op == "placeholder":
            spec = self.spec.get(node.name)
            target = spec.target if spec is not None and spec.kind in _PLACEHOLDER_PREFIX else ""
            return _block_index(target or "", self.stack.path)
        stack = node.meta.get("nn_module_stack") or {}
        paths = [path for path, _ in stack.values()]
        return next((i for p in paths if (i := _block_index(p, self.stack.path)) is not None), None)

    def relative(self, node: fx.Node, index: int):
        """How block `index` reads `node`: its own node, its predecessor's, its state, shared."""
        where = self.block_of.get(node)
        if where == index:
            if node.op == "placeholder":
                return ("state", _suffix(self.spec[node.name].target, self.stack.path))
            return ("in", self.position[node])
        if where == index - 1 and node.op == "call_function":
            return ("previous", self.position[node])
        if where is not None:
            return ("other block", node.name)
        return ("shared", node.name)


def _block_index(path: str, stack_path: str) -> int | None:
    prefix = stack_path + "."
    if not path.startswith(prefix):
        return None
    head = path[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _suffix(fqn: str, stack_path: str) -> str:
    return fqn[len(stack_path) + 1 :].split(".", 1)[1]


def _same_blocks(layout: _Layout, ep: ExportedProgram) -> bool:
    """Blocks 1 and 2 are one graph, read their predecessors alike, and stay in their lane."""
    signatures = []
    for index in (EXPORTED - 2, EXPORTED - 1):
        block = layout.blocks[index]
        refs = [layout.relative(n, index) for b in block for n in b.all_input_nodes]
        if any(kind == "other block" for kind, _ in refs):
            return False
        signatures.append(
            tuple(node_signature(n, lambda m, i=index: layout.relative(m, i)) for n in block)
        )
    lifted = {s.arg.name for s in ep.graph_signature.input_specs if s.kind in _LIFTED_CONSTANTS}
    reads_constant = any(
        m.name in lifted for b in layout.blocks for n in b for m in n.all_input_nodes
    )
    return signatures[0] == signatures[1] and not reads_constant and _contiguous(layout, ep)


def _contiguous(layout: _Layout, ep: ExportedProgram) -> bool:
    """Computed nodes run: outside, block 0, 1, 2, outside; what follows reads the last only."""
    order = [layout.block_of.get(n) for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    inside = [i for i, b in enumerate(order) if b is not None]
    if not inside or any(order[i] is None for i in range(inside[0], inside[-1] + 1)):
        return False
    if order[inside[0] : inside[-1] + 1] != sorted(order[inside[0] : inside[-1] + 1]):
        return False
    after = [n for n in ep.graph_module.graph.nodes if n.op in ("call_function", "output")]
    after = after[inside[-1] + 1 :]
    last = EXPORTED - 1
    return all(layout.block_of.get(m) in (None, last) for n in after for m in n.all_input_nodes)


def _renumber(meta: dict, stack_path: str, source: int, target: int) -> dict:
    """A copy of `meta` whose module paths name block `target` instead of `source`."""
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(f'{stack_path}.{source}')}(?=$|[.@])")
    new_path = f"{stack_path}.{target}"
    stack = meta.get("nn_module_stack")
    meta = dict(meta)
    if stack:
        meta["nn_module_stack"] = {
            pattern.sub(new_path, key): (pattern.sub(new_path, path), kind)
            for key, (path, kind) in stack.items()
        }
    return meta


def _storage(value):
    return StorageWeakRef(value.untyped_storage()) if isinstance(value, torch.Tensor) else None


def _copied_value(original: fx.Node, copy: fx.Node, fake_mode):
    """`copy`'s FakeTensor value: `original`'s, but where `original` views an input whose
    copy lives elsewhere, the same view of that copy (analysis tells views by storage)."""
    value = original.meta.get("val")
    if original.target is operator.getitem:
        return copy.args[0].meta["val"][copy.args[1]]
    schema = getattr(original.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return value  # a new tensor: the copies may share its value (shapes are all they read)
    for before, after in zip(original.all_input_nodes, copy.all_input_nodes, strict=True):
        seen, now = before.meta.get("val"), after.meta.get("val")
        if _storage(seen) is None or _storage(seen) == _storage(now):
            continue
        outputs = value if isinstance(value, list | tuple) else [value]
        with fake_mode:
            views = [
                now.as_strided(t.shape, t.stride(), t.storage_offset())
                if _storage(t) == _storage(seen) else t
                for t in outputs
            ]  # fmt: skip
        return type(value)(views) if isinstance(value, list | tuple) else views[0]
    return value


def stamp(ep: ExportedProgram, stack: BlockStack) -> ExportedGraph | None:
    """The whole stack's graph from `ep` (the model traced with EXPORTED blocks), or None."""
    layout = _Layout(ep, stack)
    if any(not block for block in layout.blocks) or not _same_blocks(layout, ep):
        return None
    last = EXPORTED - 1
    template, state = layout.blocks[last], layout.state[last]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in state])
    last_of_kind = {layout.spec[n.name].kind: n for n in state}  # state is in graph order
    graph, env, specs = fx.Graph(), {}, []
    copies: dict[int, dict[fx.Node, fx.Node]] = {i: {} for i in range(last, stack.length)}
    final, stamped = copies[stack.length - 1], False  # the last block's copy, once stamped
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
            specs.append(layout.spec[node.name])
            kind = layout.spec[node.name].kind
            if last_of_kind.get(kind) is node:
                for index in range(EXPORTED, stack.length):
                    for template_state in (n for n in state if layout.spec[n.name].kind == kind):
                        copy = _stamp_state(graph, template_state, layout, index)
                        if copy is None:
                            return None
                        copies[index][template_state] = copy
                        specs.append(
                            _spec_of(copy, layout.spec[template_state.name], layout, index)
                        )
        elif layout.block_of.get(node) == last:
            env[node] = copies[last][node] = graph.node_copy(node, env.__getitem__)
            if node is template[-1]:
                _stamp_blocks(graph, layout, copies, env, fake_mode)
                stamped = True
        else:  # before the blocks, blocks 0 and 1, or after: reading the last copy
            env[node] = graph.node_copy(node, lambda m: final[m] if m in final else env[m])
            if stamped and node.op == "call_function":  # after: it may view the copies
                env[node].meta["val"] = _copied_value(node, env[node], fake_mode)
    graph_module = fx.GraphModule(ep.graph_module, graph)
    signature = ExportGraphSignature(specs, list(ep.graph_signature.output_specs))
    spec = ep.call_spec
    return ExportedGraph(graph_module, signature, dict(ep.constants), spec.in_spec, spec.out_spec)


def _spec_of(copy: fx.Node, template: InputSpec, layout: _Layout, index: int) -> InputSpec:
    fqn = f"{layout.stack.path}.{index}.{_suffix(template.target, layout.stack.path)}"
    return InputSpec(template.kind, TensorArgument(copy.name), fqn, template.persistent)


def _stamp_state(graph, template_state, layout, index) -> fx.Node | None:
    """Block `index`'s copy of one of the last block's parameters or buffers, named as
    export names placeholders: its prefix, then the FQN with dots as underscores (and
    lower-cased), so only the block number changes; None where the name is not so."""
    name = template_state.name
    head = len(_PLACEHOLDER_PREFIX[layout.spec[name].kind]) + len(layout.stack.path)
    number = f"_{EXPORTED - 1}_"
    if name[head : head + len(number)] != number:
        return None
    wanted = f"{name[:head]}_{index}_{name[head + len(number) :]}"
    copy = graph.placeholder(wanted)
    if copy.name != wanted:
        return None
    copy.meta = _renumber(template_state.meta, layout.stack.path, EXPORTED - 1, index)
    return copy


def _stamp_blocks(graph, layout, copies, env, fake_mode) -> None:
    """Blocks EXPORTED.. from the last exported one, each reading the copy before it."""
    last = EXPORTED - 1
    template = layout.blocks[last]
    for index in range(EXPORTED, layout.stack.length):
        made, before = copies[index], copies[index - 1]

        def source(node: fx.Node, made=made, before=before) -> fx.Node:
            where = layout.block_of.get(node)
            if where == last:
                return made[node]
            if where == last - 1:  # the predecessor's node: the copy before this one's
                return before[template[layout.position[node]]]
            return env[node]

        for node in template:
            copy = graph.node_copy(node, source)
            copy.meta = _renumber(node.meta, layout.stack.path, last, index)
            copy.meta["val"] = _copied_value(node, copy, fake_mode)
            made[node] = copy
