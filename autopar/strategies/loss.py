"""Losses: cross-entropy over logits sharded on the class (vocabulary) dim.

`aten.cross_entropy_loss` of 2-d logits (tokens, classes) may run with the classes
sharded: codegen lowers it to `ops.vocab_parallel_cross_entropy`, which reduces three
values per token over tp (the max, the sum of exponentials, the target's logit) and
returns the whole loss on every rank, so the full logits never exist on any rank.
Class weights and label smoothing keep it replicated.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.ops.vocab import CROSS_ENTROPY_REDUCTIONS
from autopar.placement import Shard
from autopar.strategies.base import NodeShapes, OpSpec, R, Strategy

aten = torch.ops.aten


def _plain(node: fx.Node) -> bool:
    """No class weights, no label smoothing (the forms the vocabulary-parallel op runs)."""
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)
    return weight is None and smoothing == 0.0


def cross_entropy_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    logits = shapes.inputs[0]
    if len(shapes.inputs) != 2 or len(logits) != 2 or not _plain(node):
        return OpSpec()
    per_token = logits[0] * node.args[0].meta["val"].element_size()
    reductions = tuple((kind, per_token) for kind in CROSS_ENTROPY_REDUCTIONS)
    return OpSpec(extra=(Strategy(R, (Shard(1), R), reductions),))


RULES = {aten.cross_entropy_loss.default: cross_entropy_rule}
