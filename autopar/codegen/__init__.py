"""Per-rank code generation: sharded graph, local parameter shards, readable source."""

from autopar.codegen.params import gather_full, shard_tensor, unshard
from autopar.codegen.shard import NodePlacement, shard_graph
from autopar.codegen.source import annotated_code

__all__ = [
    "NodePlacement",
    "annotated_code",
    "gather_full",
    "shard_graph",
    "shard_tensor",
    "unshard",
]
