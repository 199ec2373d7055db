"""Embedding lookup: shard the embedding (hidden) dim of the table.

Vocabulary-parallel lookup (table sharded by rows, masked, summed) is not
generated yet; a vocabulary that does not divide by tp simply stays replicated.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.strategies.base import DimLink, NodeShapes, OpSpec

aten = torch.ops.aten


def embedding_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # weight (V, H), ids (...) -> (..., H)
    if len(shapes.inputs) != 2:
        return OpSpec()
    rank = len(shapes.out)
    id_links = tuple(DimLink(d, (None, d)) for d in range(rank - 1))
    return OpSpec(links=(*id_links, DimLink(rank - 1, (1, None))))


RULES = {aten.embedding.default: embedding_rule}
