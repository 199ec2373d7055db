"""A100 against H100: the same models and cluster size on both presets.

    python examples/experiments/hardware.py

GPT-3 1.3B to 13B (sequence 2048, global batch 512) on 4 DGX nodes (32 GPUs) of
A100-80GB and of H100-80GB.
"""

from __future__ import annotations

from common import figure, plan_point, sweep, table, timed, write_section

from autopar.mesh import Mesh

NAME, NODES, SEQ, BATCH = "hardware", 4, 2048, 512
MODELS = {"gpt3-1.3b": 1.3, "gpt3-2.7b": 2.7, "gpt3-6.7b": 6.7, "gpt3-13b": 13.0}


def main() -> None:
    series = {
        preset: sweep(
            NAME,
            (
                plan_point(size, f"{size:g}B", name, Mesh.preset(preset, nodes=NODES), SEQ, BATCH)
                for name, size in MODELS.items()
            ),
        )  # fmt: skip
        for preset in ("a100-80gb", "h100-80gb")
    }
    figure(NAME, series, "parameters (billions)", "predicted tokens/s",
           lambda p: p.tokens_per_s)  # fmt: skip
    a100, h100 = series["a100-80gb"], series["h100-80gb"]
    ratios = [h.tokens_per_s / a.tokens_per_s for a, h in zip(a100, h100, strict=True)]
    same = sum(a.layout == h.layout for a, h in zip(a100, h100, strict=True))
    a, h = Mesh.preset("a100-80gb"), Mesh.preset("h100-80gb")
    paragraph = (
        f"GPT-3 models on {NODES} nodes of each preset. H100 is predicted "
        f"{min(ratios):.2f}x to {max(ratios):.2f}x A100's throughput; the presets differ "
        f"by {h.device.peak_flops / a.device.peak_flops:.1f}x in peak bf16, "
        f"{h.device.memory_bandwidth / a.device.memory_bandwidth:.1f}x in memory bandwidth, "
        f"{h.intra_node_bw / a.intra_node_bw:.1f}x in NVLink and "
        f"{h.inter_node_bw / a.inter_node_bw:.1f}x in network bandwidth per GPU, so a "
        "speedup below the compute ratio is what the slower-growing parts cost. The two "
        f"presets get the same plan for {same} of {len(a100)} models."
    )
    tables = "A100-80GB:\n\n" + table(a100, "model") + "\n\nH100-80GB:\n\n" + table(h100, "model")
    write_section(NAME, "(e) A100 against H100", "python examples/experiments/hardware.py",
                  paragraph, tables)  # fmt: skip


if __name__ == "__main__":
    timed(main)
