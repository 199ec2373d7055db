"""Nodes whose sharded form is another computation: the vocabulary-parallel ones.

Most strategies run the node's own op on local shards (with local sizes). Two do
not: an embedding whose table is sharded by rows (its vocabulary), and a cross-entropy
whose logits are sharded on the class dim. `lower` rewrites such a node of the rank
graph to call the op in `autopar.ops.vocab` that computes it, passing the true
vocabulary size (the shards may pad it). Which nodes these are follows from their
placements alone, so the plan needs no extra field for them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.codegen.sizes import get_arg
from autopar.ops import vocab
from autopar.placement import NodePlacement, Shard

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


LOWERINGS = {
    aten.embedding.default: _embedding,
    aten.cross_entropy_loss.default: _cross_entropy,
}
LOWERED = (vocab.vocab_parallel_embedding, vocab.vocab_parallel_cross_entropy)


def lower(node: fx.Node, entry: NodePlacement, axis: str, source: fx.Node) -> None:
    """Rewrite `node` (the copy of `source` in the rank graph) where its placements need
    a vocabulary-parallel op; leave it alone otherwise."""
    rule = LOWERINGS.get(source.target)
    if rule is not None:
        rule(node, entry, axis, source)
