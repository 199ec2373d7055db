"""Capture a model into an fx graph of ATen ops with `torch.export` (non-strict).

The graph keeps parameters and buffers lifted to placeholders (the
`ExportedProgram.graph_module` form), so that later steps can hand every rank its
own parameter shards as inputs. `autopar.normalize` then rewrites a copy of it to be
easier to shard and to read (biases split from matmuls, Conv1D's flatten-matmul-
unflatten run batched, nodes named after their module).

The graph is analyzed once here (`autopar.analyze`), so every later step reads the
same FLOPs, bytes and layer ids. A model `torch.export` cannot trace raises
`TraceError` naming the failing source line or op and what to try instead; the
raw torch error stays attached as `__cause__`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from autopar.analyze import GraphAnalysis, analyze, fingerprint
from autopar.errors import AutoparError, TraceError
from autopar.normalize import normalize
from autopar.stamp import EXPORTED, ExportedGraph, find_stack, stamp, truncated

aten = torch.ops.aten


@dataclass
class TracedModel:
    """A captured model: the normalized fx graph and how its placeholders map back."""

    exported: ExportedGraph  # signature, constants and call specs of the export
    graph_module: fx.GraphModule
    param_fqns: dict[str, str]  # placeholder name -> parameter FQN in the model
    buffer_fqns: dict[str, str]  # placeholder name -> buffer FQN in the model
    user_inputs: list[str]  # placeholder names of the user's (flattened) inputs
    tied_params: dict[str, str] = field(default_factory=dict)  # duplicate -> first placeholder
    analysis: GraphAnalysis | None = None  # filled by capture()
    traced_loss: bool = False  # the graph takes a target last and returns loss_fn's value

    @property
    def flops(self) -> int:
        """Forward FLOPs of one call on the example inputs."""
        return self.analysis.total_flops

    @property
    def num_layers(self) -> int:
        """Number of repeated blocks (transformer layers) found in the graph."""
        return len(self.analysis.layers)

    @property
    def param_bytes(self) -> int:
        """Bytes of all distinct parameters; a tied parameter is counted once."""
        nodes = self.analysis.nodes
        distinct = (p for p in self.param_fqns if p not in self.tied_params)
        return sum(nodes[p].output_bytes for p in distinct)

    def fingerprint(self) -> str:
        """sha256 of the graph structure (ops, shapes, dtypes, edges)."""
        return fingerprint(self.graph_module)

    def placeholder_values(self, state: torch.nn.Module | Mapping, args: Sequence, kwargs=None):
        """Values for `graph_module`'s placeholders, in order.

        `state` is the model (or a name -> tensor mapping of its parameters and
        buffers, tied names included); `args`/`kwargs` are the user inputs.
        """
        if isinstance(state, torch.nn.Module):
            state = _state_of(state)
        user = iter(_flat_user_inputs(args, kwargs, len(self.user_inputs)))
        constants = self.exported.constants
        values = []
        for node in self.graph_module.graph.find_nodes(op="placeholder"):
            fqn = self.param_fqns.get(node.name) or self.buffer_fqns.get(node.name)
            if fqn is not None:
                values.append(state[fqn])
            elif node.name in self.user_inputs:
                values.append(next(user))
            else:
                values.append(constants[self._constant_target(node.name)])
        return values

    def _constant_target(self, name: str) -> str:
        specs = self.exported.graph_signature.input_specs
        return next(spec.target for spec in specs if spec.arg.name == name)

    @property
    def out_spec(self) -> pytree.TreeSpec:
        return self.exported.out_spec

    @property
    def in_spec(self) -> pytree.TreeSpec:
        return self.exported.in_spec


def _placeholder_maps(exported: ExportedGraph) -> tuple[dict[str, str], dict[str, str], list[str]]:
    params, buffers, user_inputs = {}, {}, []
    for spec in exported.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            params[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
    return params, buffers, user_inputs


def _state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return state


def _flat_user_inputs(args, kwargs, expected: int) -> list:
    args = tuple(args) if isinstance(args, tuple | list) else (args,)
    flat = pytree.tree_leaves((args, dict(kwargs or {})))
    if len(flat) != expected:
        raise AutoparError(
            f"got {len(flat)} flattened user inputs, but the model was captured with "
            f"{expected}; pass inputs with the same structure as the example inputs"
        )
    return flat


def _tied_params(model: torch.nn.Module, param_fqns: dict[str, str]) -> dict[str, str]:
    """Placeholders whose parameter is the same tensor as an earlier one's."""
    by_fqn = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    tied = {}
    for name, fqn in param_fqns.items():
        owner = first.setdefault(id(by_fqn[fqn]), name)
        if owner != name:
            tied[name] = owner
    return tied


# ----------------------------------------------------------------------------- errors

_TORCH_DIR = os.path.dirname(torch.__file__)
_HINTS = (
    (
        ("data-dependent", "GuardOnDataDependent"),
        "the model branches on, or converts to Python, a tensor's value (e.g. `if x.sum() > 0:`,"
        " `int(t)`, `.item()`); avoid data-dependent control flow on tensor values"
        " (use torch.where or torch.cond) or compute that value outside the model",
    ),
    (
        ("DynamicCache", "Cache", "pytree"),
        "the model returns an object export cannot flatten; for Hugging Face causal LMs"
        " pass use_cache=False (in the config or as a keyword input)",
    ),
)
_GENERIC_HINT = (
    "check that forward runs eagerly on these inputs, and see the torch.export docs"
    " (https://pytorch.org/docs/stable/export.html); torch.export.draft_export lists every issue"
)


def _user_frame(exc: BaseException) -> str | None:
    """The last traceback frame outside torch: the user's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_file(f.filename)]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _is_user_file(filename: str) -> bool:
    here = os.path.dirname(__file__)
    return not filename.startswith((_TORCH_DIR, here)) and not filename.startswith("<")


def _last_op(exc: BaseException) -> str | None:
    """The last op export recorded before failing, from its partial graph."""
    ops = re.findall(r"torch\.ops\.([\w.]+)\(", str(getattr(exc, "partial_fx_graph", "")))
    return ops[-1] if ops else None


def _trace_error(model: torch.nn.Module, exc: Exception) -> TraceError:
    text = f"{type(exc).__name__}: {exc}"
    hint = next((h for keys, h in _HINTS if any(k in text for k in keys)), _GENERIC_HINT)
    frame, op = _user_frame(exc), _last_op(exc)
    where = (f" at {frame}" if frame else "") + (f" (last op traced: {op})" if op else "")
    first_line = text.strip().splitlines()[0]
    return TraceError(
        f"torch.export could not trace {type(model).__name__}{where}: {first_line}. Hint: {hint}."
    )


@contextlib.contextmanager
def _quiet_partial_graph():
    """Hold back stderr (export prints its partial graph there on failure); replay on success."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    try:
        with _quiet_partial_graph():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        raise _trace_error(model, exc) from exc


def _export_blocks(model: torch.nn.Module, args: tuple, kwargs: dict) -> ExportedGraph:
    """The model's export graph; a deep stack of identical blocks is exported three blocks
    deep and stamped out (autopar.stamp), the whole model where that cannot be done."""
    stack = find_stack(model)
    if stack is not None:
        try:
            with truncated(model, stack, EXPORTED), _quiet_partial_graph():
                stamped = stamp(torch.export.export(model, args, kwargs, strict=False), stack)
        except Exception:  # the shortened model does not trace: export it whole
            stamped = None
        if stamped is not None:
            return stamped
    return ExportedGraph.of(_export(model, args, kwargs))


def with_loss(model: torch.nn.Module, loss_fn, num_inputs: int) -> torch.nn.Module:
    """`model` whose forward takes a target after its `num_inputs` inputs and returns
    `loss_fn(model(*inputs), target)`. It shares the model's parameters, buffers and
    submodules (a shallow copy of a subclass), so names and FQNs are the model's own, and
    its signature names the inputs as the model's forward does (`input_ids, target`)."""

    def forward(self, *args, **kwargs):
        *inputs, target = args
        return loss_fn(type(model).forward(self, *inputs, **kwargs), target)

    names = list(inspect.signature(model.forward).parameters)[:num_inputs]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, positional) for name in ("self", *names, "target")]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    )
    wrapped = copy.copy(model)
    wrapped.__class__ = type(
        f"{type(model).__name__}WithLoss", (type(model),), {"forward": forward}
    )
    return wrapped


def capture(
    model: torch.nn.Module, example_inputs, example_kwargs=None, *, loss_fn=None,
    example_target=None,
) -> TracedModel:  # fmt: skip
    """Trace `model` on `example_inputs` into a TracedModel (analysis included); with
    `loss_fn`, trace `loss_fn(model(*example_inputs), example_target)` instead."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"capture expects a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module whose forward calls it"
        )
    if (loss_fn is None) != (example_target is None):
        raise AutoparError(
            "loss_fn and example_target go together: pass both to trace the loss with the "
            "model (then train_step(inputs, target) needs no loss_fn), or neither"
        )
    args = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    if loss_fn is not None:
        model, args = with_loss(model, loss_fn, len(args)), (*args, example_target)
    exported = _export_blocks(model, args, dict(example_kwargs or {}))
    params, buffers, user_inputs = _placeholder_maps(exported)
    graph_module = normalize(exported.graph_module)
    traced = TracedModel(exported, graph_module, params, buffers, user_inputs)
    traced.traced_loss = loss_fn is not None
    traced.tied_params = _tied_params(model, params)
    traced.analysis = analyze(graph_module, param_names=params, buffer_names=buffers)
    _mark_blocks(graph_module, traced.analysis)
    return traced


def _mark_blocks(graph_module: fx.GraphModule, analysis: GraphAnalysis) -> None:
    """meta["autopar_block"] = the block's module path, for generated code's block comments
    (fx copies meta with every node, so sharded and stage graphs keep it)."""
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for names, block in zip(analysis.layers, analysis.layer_names, strict=True):
        for name in names:
            if nodes[name].op == "call_function":
                nodes[name].meta["autopar_block"] = block
