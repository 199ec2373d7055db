"""Weak and strong scaling: one model on 1 to 16 DGX A100 nodes.

    python examples/experiments/cluster_size.py

GPT-3 6.7B, sequence 2048. Strong scaling keeps the global batch at 512 sequences;
weak scaling gives each GPU 4 sequences (global batch 32 per node).
"""

from __future__ import annotations

from common import figure, layout_changes, plan_point, sweep, table, timed, write_section

from autopar.mesh import Mesh

NAME, MODEL, SEQ, STRONG_BATCH, PER_NODE = "cluster_size", "gpt3-6.7b", 2048, 512, 32
NODES = (1, 2, 4, 8, 16)


def main() -> None:
    def run(batch_of):
        return sweep(NAME, (
            plan_point(8 * n, f"{8 * n} GPUs", MODEL, Mesh.preset("a100-80gb", nodes=n),
                       SEQ, batch_of(n))
            for n in NODES
        ))  # fmt: skip

    strong, weak = run(lambda n: STRONG_BATCH), run(lambda n: PER_NODE * n)
    first = strong[0]
    ideal = [(p.x, first.tokens_per_s * p.x / first.x) for p in strong]
    figure(NAME, {"strong (global batch 512)": strong, "weak (4 per GPU)": weak}, "GPUs",
           "predicted tokens/s", lambda p: p.tokens_per_s, ideal=ideal)  # fmt: skip

    def efficiency(points):
        return points[-1].tokens_per_s / points[-1].x / (points[0].tokens_per_s / points[0].x)

    paragraph = (
        f"GPT-3 6.7B, sequence {SEQ}, on 1 to {NODES[-1]} DGX A100 nodes. Strong scaling "
        f"(global batch {STRONG_BATCH}): {layout_changes(strong)}; at {strong[-1].label} "
        f"each GPU keeps {efficiency(strong):.0%} of its one-node throughput (the dotted "
        "line is linear speedup), as each replica's batch shrinks while the gradient sync "
        f"stays the same size. Weak scaling ({PER_NODE} sequences per node): "
        f"{layout_changes(weak)}; each GPU keeps {efficiency(weak):.0%} of its one-node "
        "throughput at the largest cluster, the gradient sync crossing nodes being what "
        "is lost."
    )
    tables = table(strong, "strong") + "\n\n" + table(weak, "weak")
    write_section(NAME, "(d) Cluster size: strong and weak scaling",
                  "python examples/experiments/cluster_size.py", paragraph, tables)  # fmt: skip


if __name__ == "__main__":
    timed(main)
