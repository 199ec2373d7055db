"""Which dims of a value are its batch and its sequence, traced forward from the user inputs.

Each output dim takes the role of the input dims its rule links it to (batch wins). A
reshape that merges dims gives the merged dim a role per part: batch rows outermost and
role-less dims inside (Bloom's batch x heads) make `BatchMajor(rows)`, which tp may
split within each row (`Shard(dim, groups=rows)`); batch merged with sequence (OPT's
flattened MLP input) stays batch, whole on tp. A reshape that splits a `BatchMajor`
dim at its rows gives them the batch role back and the inner dims none.
"""

from __future__ import annotations

import math

import torch.fx as fx

from autopar.strategies.base import BATCH, SEQUENCE, BatchMajor, OpSpec
from autopar.strategies.view import RULES, reshape_groups, reshape_rule, squeeze_rule

__all__ = ["BATCH", "SEQUENCE", "BatchMajor", "is_batch", "out_roles"]
RESHAPES = {op for op, rule in RULES.items() if rule in (reshape_rule, squeeze_rule)}


def is_batch(role) -> bool:
    """A dim that holds batch rows (the dp axis shards it)."""
    return role == BATCH or isinstance(role, BatchMajor)


def _rank(role) -> int:
    return 2 if role == BATCH else 1 if isinstance(role, BatchMajor) else 0


def out_roles(spec: OpSpec, node: fx.Node, roles: dict, out: tuple, inputs: tuple) -> tuple:
    """The role of each output dim of `node` (module docstring)."""
    found: list = [None] * len(out)
    for link in spec.links:
        for arg, dim in zip(node.all_input_nodes, link.in_dims, strict=True):
            known = roles.get(arg.name, ())
            role = known[dim] if dim is not None and dim < len(known) else None
            if role is not None and _rank(role) >= _rank(found[link.out_dim]):
                found[link.out_dim] = role
    if node.target in RESHAPES:
        _reshaped(found, roles.get(node.all_input_nodes[0].name, ()), inputs[0], out)
    return tuple(found)


def _reshaped(found: list, in_roles: tuple, in_shape: tuple, out_shape: tuple) -> None:
    """Roles per part of the dims a reshape merges or splits (module docstring)."""
    if len(in_roles) != len(in_shape):
        return
    for ins, outs in reshape_groups(in_shape, out_shape):
        first, inner = in_roles[ins[0]], [in_roles[d] for d in ins[1:]]
        if len(outs) == 1 and inner and all(r is None for r in inner):
            if first == BATCH:
                found[outs[0]] = BatchMajor(in_shape[ins[0]])
            elif isinstance(first, BatchMajor):
                found[outs[0]] = first
        elif len(ins) == 1 and len(outs) > 1 and isinstance(first, BatchMajor):
            sizes = [out_shape[d] for d in outs]
            rows = next((k for k in range(1, len(outs)) if math.prod(sizes[:k]) == first.groups), 0)
            for k, d in enumerate(outs):
                found[d] = BATCH if k < rows or not rows else None
