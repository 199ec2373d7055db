"""Elementwise ops with broadcasting: every output dim shards with the inputs that have it.

Linear ops also pass Partial through: a sum of Partials is Partial, and a Partial
scaled by a replicated factor is Partial. Nonlinear ops (gelu, tanh, rsqrt...) do not.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec, P, R

aten = torch.ops.aten


def broadcast_links(shapes: NodeShapes) -> tuple[DimLink, ...]:
    """Right-aligned broadcasting: input i has output dim d unless its size there is 1."""
    out_rank = len(shapes.out)
    links = []
    for d in range(out_rank):
        in_dims = []
        for shape in shapes.inputs:
            aligned = d - (out_rank - len(shape))
            has_dim = aligned >= 0 and shape[aligned] == shapes.out[d]
            in_dims.append(aligned if has_dim else None)
        links.append(DimLink(d, tuple(in_dims)))
    return tuple(links)


def _tensor_operands(node: fx.Node) -> int:
    """How many of the first two positional args are graph nodes (not Python scalars)."""
    return sum(isinstance(a, fx.Node) for a in node.args[:2])


def _sum_partials(node: fx.Node, num_inputs: int) -> tuple:
    # a + b is linear only when both operands are tensors: P + scalar would add it tp times
    return ((P,) * num_inputs,) if _tensor_operands(node) == 2 or num_inputs == 0 else ()


def _scale_partials(node: fx.Node, num_inputs: int) -> tuple:
    if num_inputs == 1:
        return ((P,),)
    return ((P, R), (R, P))


def _numerator_partials(node: fx.Node, num_inputs: int) -> tuple:
    return ((P,),) if num_inputs == 1 else ((P, R),)


def _unary_partials(node: fx.Node, num_inputs: int) -> tuple:
    return ((P,),) if num_inputs == 1 else ()


def _dropout_partials(node: fx.Node, num_inputs: int) -> tuple:
    probability = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
    return ((P,),) if probability == 0 else ()


def _no_partials(node: fx.Node, num_inputs: int) -> tuple:
    return ()


def _cast_partials(node: fx.Node, num_inputs: int) -> tuple:
    # type_as(x, other) reads only other's dtype: x may be partial, other anything
    return ((P,),) if num_inputs == 1 else ((P, R), (P, P))


LINEARITY = {
    aten.add.Tensor: _sum_partials,
    aten.add_.Tensor: _sum_partials,
    aten.sub.Tensor: _sum_partials,
    aten.sub_.Tensor: _sum_partials,
    aten.mul.Tensor: _scale_partials,
    aten.mul_.Tensor: _scale_partials,
    aten.div.Tensor: _numerator_partials,
    aten.div_.Tensor: _numerator_partials,
    aten.neg.default: _unary_partials,
    aten.alias.default: _unary_partials,
    aten.clone.default: _unary_partials,
    aten.contiguous.default: _unary_partials,
    aten.detach.default: _unary_partials,
    aten.to.dtype: _unary_partials,
    aten.to.dtype_layout: _unary_partials,
    aten.to.device: _unary_partials,
    aten._to_copy.default: _unary_partials,
    aten.type_as.default: _cast_partials,
    aten.to.other: _cast_partials,
    aten.zeros_like.default: _unary_partials,  # zeros sum to zeros
    aten.dropout.default: _dropout_partials,
    aten.native_dropout.default: _no_partials,
}

NONLINEAR = [
    "gelu.default", "tanh.default", "silu.default", "relu.default", "sigmoid.default",
    "rsqrt.default", "sqrt.default", "exp.default", "log.default", "pow.Tensor_Scalar",
    "pow.Tensor_Tensor", "sin.default", "cos.default", "abs.default", "erf.default",
    "where.self", "masked_fill.Scalar", "masked_fill.Tensor", "maximum.default",
    "minimum.default", "clamp.default", "reciprocal.default", "square.default",
    "where.ScalarOther", "where.ScalarSelf", "where.Scalar", "clamp_min.default",
    "clamp_max.default", "ones_like.default", "full_like.default", "empty_like.default",
    "rsub.Scalar", "softplus.default", "log1p.default", "expm1.default",
]  # fmt: skip


def _op(qualified: str):
    packet, overload = qualified.split(".")
    return getattr(getattr(aten, packet), overload)


def elementwise_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    partials = LINEARITY.get(node.target, _no_partials)(node, len(shapes.inputs))
    return OpSpec(links=broadcast_links(shapes), partial_inputs=partials)


RULES = {target: elementwise_rule for target in [*LINEARITY, *map(_op, NONLINEAR)]}
