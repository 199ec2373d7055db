"""Embedding lookup: shard the embedding (hidden) dim of the table, or its vocabulary.

With the table's rows (the vocabulary) sharded, each rank looks up only the ids it
holds and the output is a partial sum (codegen lowers the node to
`ops.vocab_parallel_embedding`, Megatron-LM's VocabParallelEmbedding); a vocabulary
that does not divide by tp is padded.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.placement import Shard
from autopar.strategies.base import DimLink, NodeShapes, OpSpec, P, R, Strategy

aten = torch.ops.aten


def embedding_rule(node: fx.Node, shapes: NodeShapes) -> OpSpec:
    # weight (V, H), ids (...) -> (..., H)
    if len(shapes.inputs) != 2:
        return OpSpec()
    rank = len(shapes.out)
    id_links = tuple(DimLink(d, (None, d)) for d in range(rank - 1))
    vocabulary_parallel = Strategy(P, (Shard(0), R))
    return OpSpec(links=(*id_links, DimLink(rank - 1, (1, None))), extra=(vocabulary_parallel,))


RULES = {aten.embedding.default: embedding_rule}
