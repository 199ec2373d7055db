"""Nodes whose sharded form is another computation.

Most strategies run the node's own op on local shards (with local sizes). Three do
not: an embedding whose table is sharded by rows (its vocabulary), and a cross-entropy
whose logits are sharded on the class dim, which call the op in `autopar.ops.vocab`
that computes them with the true vocabulary size (the shards may pad it); and a mean
over a sharded dim, whose partial result is the local sum divided by the global count
(the local mean would be tp times too large once summed). Which nodes these are
follows from their placements alone, so the plan needs no extra field for them.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from autopar.codegen.sizes import get_arg
from autopar.ops import vocab
from autopar.placement import NodePlacement, Partial, Shard
from autopar.strategies.norm import reduced_dims

aten = torch.ops.aten


def _embedding(node: fx.Node, entry: NodePlacement, axis: str, source: fx.Node) -> None:
    if entry.inputs[0] != Shard(0):
        return
    vocab_size = source.args[0].meta["val"].shape[0]
    padding_idx = get_arg(source, "padding_idx")
    node.target = vocab.vocab_parallel_embedding
    node.args = (node.args[0], node.args[1], vocab_size, axis, padding_idx)
    node.kwargs = {}


def _cross_entropy(node: fx.Node, entry: NodePlacement, axis: str, source: fx.Node) -> None:
    if not isinstance(entry.inputs[0], Shard):
        return
    vocab_size = source.args[0].meta["val"].shape[1]
    reduction, ignore_index = get_arg(source, "reduction"), get_arg(source, "ignore_index")
    node.target = vocab.vocab_parallel_cross_entropy
    node.args = (node.args[0], node.args[1], vocab_size, axis, reduction, ignore_index)
    node.kwargs = {}


def _mean(node: fx.Node, entry: NodePlacement, axis: str, source: fx.Node) -> fx.Node:
    """A mean contracting a sharded dim: this rank's sum over the global count."""
    seen, shape = entry.inputs[0], source.args[0].meta["val"].shape
    reduced = reduced_dims(source, len(shape))
    if entry.output != Partial() or not (isinstance(seen, Shard) and seen.dim in reduced):
        return node
    node.target = aten.sum.dim_IntList
    with node.graph.inserting_after(node):
        count = math.prod(shape[d] for d in reduced)
        mean = node.graph.call_function(aten.div.Tensor, (node, count))
    mean.meta = dict(node.meta)
    return mean


LOWERINGS = {
    aten.embedding.default: _embedding,
    aten.cross_entropy_loss.default: _cross_entropy,
    aten.mean.dim: _mean,
}
LOWERED = (vocab.vocab_parallel_embedding, vocab.vocab_parallel_cross_entropy)


def lower(node: fx.Node, entry: NodePlacement, axis: str, source: fx.Node) -> fx.Node:
    """Rewrite `node` (the copy of `source` in the rank graph) where its placements need
    another computation; the node that then holds `source`'s value (`node` unless the
    rewrite appended one)."""
    rule = LOWERINGS.get(source.target)
    found = rule(node, entry, axis, source) if rule is not None else None
    return node if found is None else found
