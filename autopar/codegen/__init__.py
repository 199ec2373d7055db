"""Per-rank code generation: sharded graph, local parameter shards, readable source."""

from autopar.codegen.params import gather_full, shard_tensor, unshard
from autopar.codegen.recompute import recompute
from autopar.codegen.shard import NodePlacement, reshard_node, shard_graph
from autopar.codegen.source import annotated_code
from autopar.codegen.stages import StageGraph, split_stages, stage_of_nodes

__all__ = [
    "NodePlacement",
    "StageGraph",
    "annotated_code",
    "gather_full",
    "recompute",
    "reshard_node",
    "shard_graph",
    "shard_tensor",
    "split_stages",
    "stage_of_nodes",
    "unshard",
]
