"""How the plan and its throughput move with the model's size on a fixed cluster.

    python examples/experiments/model_size.py

GPT-3 1.3B to 175B (sequence 2048, global batch 512) on 32 DGX A100 nodes (256 GPUs).
"""

from __future__ import annotations

from common import figure, layout_changes, plan_point, sweep, table, timed, write_section

from autopar.mesh import Mesh

NAME, NODES, SEQ, BATCH = "model_size", 32, 2048, 512
MODELS = {
    "gpt3-1.3b": 1.3, "gpt3-2.7b": 2.7, "gpt3-6.7b": 6.7, "gpt3-13b": 13.0, "gpt3-175b": 175.0,
}  # fmt: skip


def main() -> None:
    mesh = Mesh.preset("a100-80gb", nodes=NODES)
    points = sweep(NAME, (
        plan_point(size, f"{size:g}B", name, mesh, SEQ, BATCH) for name, size in MODELS.items()
    ))  # fmt: skip
    figure(NAME, {"GPT-3 family on 256 A100": points}, "parameters (billions)",
           "predicted TFLOP/s per GPU", lambda p: p.tflops_per_device)  # fmt: skip
    paragraph = (
        f"GPT-3 models, sequence {SEQ}, global batch {BATCH}, on {NODES} DGX A100 nodes. "
        f"The plan is {layout_changes(points)}. Per-GPU throughput goes from "
        f"{points[0].tflops_per_device:.0f} TFLOP/s at {points[0].label} to "
        f"{points[-1].tflops_per_device:.0f} at {points[-1].label}, and memory per GPU "
        f"from {points[0].memory_gib:.0f} to {points[-1].memory_gib:.0f} GiB: the search "
        "spends memory (ZeRO stages, then model parallelism, if the model needs it) only "
        "where the whole model's states per GPU would not fit, since data parallelism "
        "with one gradient sync per step is the cheapest communication."
    )
    write_section(NAME, "(c) Model size on a fixed cluster",
                  "python examples/experiments/model_size.py", paragraph,
                  table(points, "model"))  # fmt: skip


if __name__ == "__main__":
    timed(main)
