"""How the plan and its throughput move with the sequence length.

    python examples/experiments/seq_len.py

Llama-2 7B on one DGX A100 node (8 GPUs), half a million tokens per step: the
sequence from 512 to 8,192 tokens, the global batch 2^19 / sequence.
"""

from __future__ import annotations

from common import figure, layout_changes, plan_point, sweep, table, timed, write_section

from autopar.mesh import Mesh

NAME, MODEL, NODES, TOKENS = "seq_len", "llama2-7b", 1, 2**19


def main() -> None:
    mesh = Mesh.preset("a100-80gb", nodes=NODES)
    points = sweep(NAME, (
        plan_point(seq, f"{seq:,}", MODEL, mesh, seq, TOKENS // seq,
                   max_position_embeddings=max(seq, 4096))
        for seq in (512, 1024, 2048, 4096, 8192)
    ))  # fmt: skip
    figure(NAME, {"Llama-2 7B on 8 A100": points}, "sequence length (tokens)",
           "predicted tokens/s", lambda p: p.tokens_per_s)  # fmt: skip
    short, long = points[0], points[-1]
    paragraph = (
        f"Llama-2 7B on {NODES} DGX A100 nodes, {TOKENS:,} tokens per step. The plan is "
        f"{layout_changes(points)}. Throughput goes from {short.tokens_per_s:,.0f} to "
        f"{long.tokens_per_s:,.0f} tokens/s ({long.tokens_per_s / short.tokens_per_s:.2f}x) "
        "as attention's share of the work grows with the sequence; memory per GPU goes "
        f"from {short.memory_gib:.0f} to {long.memory_gib:.0f} GiB, since a microbatch "
        "cannot hold less than one sequence's activations."
    )
    write_section(NAME, "(b) Sequence length", "python examples/experiments/seq_len.py",
                  paragraph, table(points, "sequence"))  # fmt: skip


if __name__ == "__main__":
    timed(main)
