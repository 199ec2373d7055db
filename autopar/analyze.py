"""Static analysis of a captured graph: what each node costs and which layer it is in.

The cost model and the solver never look at fx nodes directly; they read one
frozen `NodeInfo` per placeholder and `call_function` node. Everything here is
computed from the FakeTensor in `node.meta["val"]` and the module path in
`node.meta["nn_module_stack"]`; no op is ever run, so a 175B model on the meta
device is analyzed as cheaply as a toy.

Conventions:

- FLOPs follow `torch.utils.flop_counter.FlopCounterMode`: matmul-class ops
  (mm, bmm, addmm, baddbmm, convolution, attention kernels) are counted from the
  registry's formulas, one multiply-add = 2 FLOPs; elementwise ops, norms and
  softmax count 0 (they are memory-bound and priced by their bytes). The
  composite ops the export graph keeps (`linear`, `matmul`,
  `scaled_dot_product_attention`) and the grouped expert matmuls of
  mixture-of-experts layers (found by name: transformers' exists only once its MoE
  integration is imported, perhaps after autopar) have formulas here; any other
  composite op (`conv2d`, `einsum`, ...) is counted on its decomposition, traced
  over the node's FakeTensors (no real computation). Causal attention is counted
  as full attention, as the registry does.
- Bytes: a node that returns a view of its input (the output shares the input's
  storage, as the FakeTensors record) reads and writes nothing; gathers
  (embedding, index) read their indices and the rows they produce; any other
  node reads each tensor input once and writes its outputs.
- Layers: a module path `<prefix>.<int>` whose prefix has several indexed
  children (`transformer.h.3`, `model.layers.3`, `encoder.layer.3`) marks a
  repeated block. The outermost such path on a node's stack wins, so ModuleLists
  nested inside a block (per-head modules, MoE experts) do not split it.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass, fields

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode, flop_registry, mm_flop, sdpa_flop_count

aten = torch.ops.aten

Shape = tuple[int, ...]
BlockKey = tuple[str, int]  # (container prefix, index): ("transformer.h", 3)


@dataclass(frozen=True)
class NodeInfo:
    """What the cost model needs to know about one graph node."""

    name: str
    op: str  # "placeholder" or "call_function"
    target: str  # "aten.mm.default", "_operator.getitem", or the placeholder name
    shape: Shape | None  # single tensor output; None for multi-output or non-tensor nodes
    shapes: tuple[Shape, ...] | None  # multi-output nodes (split, ...) only
    dtype: torch.dtype | None  # of the (first) tensor output
    flops: int  # forward FLOPs
    bytes_read: int
    bytes_written: int
    output_bytes: int  # size of the output tensors, whether or not this node writes them
    params: tuple[str, ...]  # parameter placeholders this node reads directly
    layer: int | None  # index into GraphAnalysis.layers
    position: tuple[int, int] | None  # (block class, index in block); equal across same blocks
    requires_grad: bool  # a floating-point value that a parameter's gradient flows through


@dataclass
class GraphAnalysis:
    """Per-node facts plus the repeated-block structure of one graph."""

    nodes: dict[str, NodeInfo]
    edges: list[tuple[str, str]]  # (producer, consumer) between analyzed nodes
    layers: list[list[str]]  # node names of each repeated block, in graph order
    block_classes: list[int]  # block_classes[layer] = id of its structural class
    layer_names: list[str]  # module path of each block: "transformer.h.3"

    @property
    def total_flops(self) -> int:
        return sum(info.flops for info in self.nodes.values())

    def to_networkx(self) -> nx.DiGraph:
        """Nodes carry NodeInfo's fields; edge u -> v carries `bytes` of u's output."""
        graph = nx.DiGraph()
        for name, info in self.nodes.items():
            graph.add_node(name, **{f.name: getattr(info, f.name) for f in fields(info)})
        for producer, consumer in self.edges:
            graph.add_edge(producer, consumer, bytes=self.nodes[producer].output_bytes)
        return graph


# ----------------------------------------------------------------------------- FLOPs


def _val(node: fx.Node):
    return node.meta.get("val")


def _linear_flops(x, weight, *_, out_val=None, **__) -> int:  # one (M, in) @ (in, out)
    return mm_flop((math.prod(x.shape[:-1]), x.shape[-1]), (weight.shape[1], weight.shape[0]))


def _matmul_flops(a, b, *_, out_val=None, **__) -> int:
    """Each output element a dot product of a's last dim (grouped: with its expert's)."""
    return 2 * math.prod(out_val.shape) * a.shape[-1]


def _sdpa_flops(query, key, value, *_, out_val=None, **__) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


# Ops the export graph keeps but flop_registry does not know, by qualified name.
_COMPOSITE_FLOPS: dict[str, Callable[..., int]] = {
    "aten::linear": _linear_flops,
    "aten::matmul": _matmul_flops,
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_grouped_mm": _matmul_flops,
    "transformers::grouped_mm_fallback": _matmul_flops,
}


def _is_composite(op: torch._ops.OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def _decomposed_flops(op: torch._ops.OpOverload, args, kwargs) -> int:
    """FLOPs of a composite op (conv2d, einsum, ...): its decomposition on the FakeTensors."""
    with detect_fake_mode((args, kwargs)), FlopCounterMode(display=False) as counter:
        op.decompose(*args, **kwargs)
    return counter.get_total_flops()


def node_flops(node: fx.Node) -> int:
    """Forward FLOPs of one call_function node, from its FakeTensor shapes."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return 0
    packet = node.target.overloadpacket
    formula = _COMPOSITE_FLOPS.get(packet._qualified_op_name) or flop_registry.get(packet)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _val)
    if formula is not None:
        return int(formula(*args, out_val=_val(node), **kwargs))
    if _is_composite(node.target):
        return _decomposed_flops(node.target, args, kwargs)
    return 0


# ----------------------------------------------------------------------------- bytes

_GATHER_OPS = {aten.embedding, aten.index, aten.index_select, aten.gather}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _is_view(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return False
    outputs, inputs = _tensors(_val(node)), [_val(n) for n in node.all_input_nodes]
    storages = {StorageWeakRef(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)}
    return bool(outputs) and all(StorageWeakRef(t.untyped_storage()) in storages for t in outputs)


def node_bytes(node: fx.Node) -> tuple[int, int]:
    """(bytes read, bytes written) of one call_function node."""
    if _is_view(node):
        return 0, 0
    written = _nbytes(_val(node))
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _GATHER_OPS:
        indices = [n for n in node.all_input_nodes if not _val(n).is_floating_point()]
        return written + sum(_nbytes(_val(n)) for n in indices), written
    return sum(_nbytes(_val(n)) for n in node.all_input_nodes), written


# ----------------------------------------------------------------------------- layers


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _module_type = list(stack.values())[-1]
    return path


def _indexed_prefixes(path: str) -> list[BlockKey]:
    """'model.layers.3.mlp' -> [('model.layers', 3)], outermost first."""
    parts = path.split(".")
    return [(".".join(parts[:i]), int(p)) for i, p in enumerate(parts) if i and p.isdigit()]


def _block_keys(nodes: Iterable[fx.Node]) -> dict[fx.Node, BlockKey]:
    """Each call_function node in a repeated block -> its (container, index)."""
    paths = {n: _indexed_prefixes(p) for n in nodes if (p := _module_path(n))}
    indices: dict[str, set[int]] = defaultdict(set)
    for keys in paths.values():
        for prefix, index in keys:
            indices[prefix].add(index)
    containers = {prefix for prefix, seen in indices.items() if len(seen) > 1}
    blocks = {}
    for node, keys in paths.items():
        key = next((k for k in keys if k[0] in containers), None)
        if key is not None:
            blocks[node] = key
    return blocks


def _assign_state(graph: fx.Graph, blocks: dict[fx.Node, BlockKey], state: Collection[str]):
    """A parameter or buffer read only inside one block (its weights) belongs to that block."""
    for node in graph.find_nodes(op="placeholder"):
        owners = {blocks.get(user) for user in node.users}
        if node.name in state and len(owners) == 1 and None not in owners:
            blocks[node] = owners.pop()


def _layers(graph: fx.Graph, state: Collection[str]) -> dict[BlockKey, list[fx.Node]]:
    """Nodes of each repeated block, blocks ordered by their first computation."""
    blocks = _block_keys(n for n in graph.nodes if n.op == "call_function")
    first = {}
    for node in graph.nodes:
        if node in blocks:
            first.setdefault(blocks[node], len(first))
    _assign_state(graph, blocks, state)
    members: dict[BlockKey, list[fx.Node]] = {key: [] for key in sorted(first, key=first.get)}
    for node in graph.nodes:
        if node in blocks:
            members[blocks[node]].append(node)
    return members


# ----------------------------------------------------------------------------- structure


def _normalize_constant(value):
    if isinstance(value, torch.device):
        return "device"  # a plan made on meta must match the same model on cuda
    if isinstance(value, list | tuple):
        return tuple(_normalize_constant(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _normalize_constant(v)) for k, v in value.items()))
    return value


def node_signature(node: fx.Node, ref: Callable[[fx.Node], Hashable]) -> tuple:
    """Structure of one node: op, target, output shapes and dtype, arguments.

    `ref` names an input node (its index in a block, or in the whole graph).
    """
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", ref(n)))
    outputs = _tensors(_val(node))
    return (
        node.op,
        "" if node.op == "placeholder" else _target_name(node),
        tuple((tuple(t.shape), str(t.dtype)) for t in outputs),
        repr(_normalize_constant(args)),
    )


def _block_signature(block: list[fx.Node]) -> tuple:
    local = {node: i for i, node in enumerate(block)}
    return tuple(node_signature(n, lambda m: local.get(m, "outside")) for n in block)


def _block_classes(layers: list[list[fx.Node]]) -> list[int]:
    class_of: dict[tuple, int] = {}
    return [class_of.setdefault(_block_signature(b), len(class_of)) for b in layers]


# Ops that only change memory layout. Whether export keeps them depends on the
# device's kernels (a meta sdpa output needs `.contiguous()`, a CPU one does not),
# so the fingerprint looks through them.
_LAYOUT_ONLY = {aten.contiguous, aten.alias, aten.clone}


def _layout_only(node: fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) in _LAYOUT_ONLY


def fingerprint(graph_module: fx.GraphModule) -> str:
    """sha256 over every node's structure and edges; stable across devices and runs.

    Placeholder names (derived from parameter FQNs) count too: a plan's parameter
    shards must load into the same names.
    """
    index: dict[fx.Node, int] = {}
    source: dict[fx.Node, fx.Node] = {}
    digest = hashlib.sha256()
    for node in graph_module.graph.nodes:
        if _layout_only(node):
            source[node] = source.get(node.args[0], node.args[0])
            continue
        index[node] = len(index)
        name = node.name if node.op == "placeholder" else ""
        signature = node_signature(node, lambda n: index[source.get(n, n)])
        digest.update(repr((name, signature)).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- analyze


def _target_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return node.name
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    if callable(node.target):
        return fx.node._get_qualified_name(node.target)
    return str(node.target)


def _output_shapes(value) -> tuple[Shape | None, tuple[Shape, ...] | None]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), None
    tensors = _tensors(value)
    return None, (tuple(tuple(t.shape) for t in tensors) if tensors else None)


def _requires_grad(nodes: list[fx.Node], params: Collection[str]) -> set[fx.Node]:
    """Floating-point parameters and every floating-point value computed from one."""
    found: set[fx.Node] = set()
    for node in nodes:
        tensors = _tensors(_val(node))
        floating = bool(tensors) and tensors[0].dtype.is_floating_point
        if node.op == "placeholder":
            grad = node.name in params
        else:
            grad = any(u in found for u in node.all_input_nodes)
        if floating and grad:
            found.add(node)
    return found


def _node_info(node: fx.Node, params: Collection[str], grads, layer, position) -> NodeInfo:
    value = _val(node)
    shape, shapes = _output_shapes(value)
    tensors = _tensors(value)
    computes = node.op == "call_function"
    read, written = node_bytes(node) if computes else (0, 0)
    return NodeInfo(
        name=node.name,
        op=node.op,
        target=_target_name(node),
        shape=shape,
        shapes=shapes,
        dtype=tensors[0].dtype if tensors else None,
        flops=node_flops(node) if computes else 0,
        bytes_read=read,
        bytes_written=written,
        output_bytes=_nbytes(value),
        params=tuple(n.name for n in node.all_input_nodes if n.name in params),
        layer=layer,
        position=position,
        requires_grad=node in grads,
    )


def analyze(
    graph_module: fx.GraphModule,
    param_names: Collection[str] = (),
    buffer_names: Collection[str] = (),
) -> GraphAnalysis:
    """Analyze every placeholder and call_function node of a captured graph.

    `param_names` and `buffer_names` are the placeholders that hold parameters and
    buffers (`TracedModel.param_fqns` / `buffer_fqns` keys): parameters fill
    `NodeInfo.params`, and both join the layer of the one block that reads them.
    """
    graph = graph_module.graph
    blocks = _layers(graph, {*param_names, *buffer_names})
    layers = list(blocks.values())
    classes = _block_classes(layers)
    where = {n: (i, (classes[i], j)) for i, block in enumerate(layers) for j, n in enumerate(block)}
    params = frozenset(param_names)
    analyzed = [n for n in graph.nodes if n.op in ("placeholder", "call_function")]
    grads = _requires_grad(analyzed, params)
    nodes = {n.name: _node_info(n, params, grads, *where.get(n, (None, None))) for n in analyzed}
    edges = [(n.name, u.name) for n in analyzed for u in n.users if u.name in nodes]
    names = [f"{prefix}.{index}" for prefix, index in blocks]
    return GraphAnalysis(nodes, edges, [[n.name for n in b] for b in layers], classes, names)
