"""How the plan and its throughput move with the bandwidth between nodes.

    python examples/experiments/bandwidth.py

GPT-3 175B (sequence 2048, global batch 1536) on 64 DGX A100 nodes (512 GPUs), the NIC
bandwidth per GPU swept from an eighth of the preset's 25 GB/s to 8x it.
"""

from __future__ import annotations

import dataclasses

from common import figure, layout_changes, plan_point, sweep, table, timed, write_section

from autopar.mesh import Mesh

NAME, MODEL, NODES, SEQ, BATCH = "bandwidth", "gpt3-175b", 64, 2048, 1536
GB = 1e9


def main() -> None:
    base = Mesh.preset("a100-80gb", nodes=NODES)
    values = [base.inter_node_bw * f for f in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)]
    points = sweep(NAME, (
        plan_point(bw / GB, f"{bw / GB:g} GB/s", MODEL, dataclasses.replace(base, inter_node_bw=bw),
                   SEQ, BATCH)
        for bw in values
    ))  # fmt: skip
    figure(NAME, {"GPT-3 175B on 512 A100": points}, "inter-node bandwidth per GPU (GB/s)",
           "predicted TFLOP/s per GPU", lambda p: p.tflops_per_device)  # fmt: skip
    slow, fast = points[0], points[-1]
    paragraph = (
        f"GPT-3 175B, sequence {SEQ}, global batch {BATCH}, on {NODES} DGX A100 nodes, the "
        f"preset's {base.inter_node_bw / GB:g} GB/s NIC bandwidth per GPU scaled from 1/8 "
        f"to 8x. The plan is {layout_changes(points)}. The predicted throughput goes from "
        f"{slow.tflops_per_device:.0f} to {fast.tflops_per_device:.0f} TFLOP/s per GPU "
        f"({fast.tokens_per_s / slow.tokens_per_s:.2f}x over the sweep): what crosses nodes "
        "(the data-parallel gradient sync, and pipeline sends) is all that the network's "
        "speed changes, since tensor parallelism stays inside a node."
    )
    write_section(NAME, "(a) Inter-node bandwidth", "python examples/experiments/bandwidth.py",
                  paragraph, table(points, "bandwidth per GPU"))  # fmt: skip


if __name__ == "__main__":
    timed(main)
