"""Tensor factories (zeros, ones, full, arange...): made whole on every rank, sliced by readers.

A factory reads no tensor, so there is nothing to split: codegen computes it whole
(the same on every rank) and a consumer that wants a shard takes its chunk locally,
which the reshard table prices as free. The rule says exactly that: replicated only.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import NodeShapes, OpSpec

aten = torch.ops.aten


def factory_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    return OpSpec()


FACTORIES = (
    aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default,
    aten.linspace.default, aten.eye.default,
)  # fmt: skip

RULES = dict.fromkeys(FACTORIES, factory_rule)
