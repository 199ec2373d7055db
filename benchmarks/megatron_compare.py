"""autopar's predicted per-block communication against Megatron-LM's hand layout, at tp=8.

    .venv/bin/python benchmarks/megatron_compare.py

Megatron's tensor parallelism (Shoeybi et al. 2019, sec. 3) runs, per
transformer block and training step, two all-reduces in the forward pass (after
the attention output projection and after the MLP's second matmul) and two in
the backward pass (the gradients entering the column-parallel q/k/v and first
MLP matmuls), each of batch x seq x hidden activations at 2 bytes (bf16).

Both layouts are priced with the same cost model (`Mesh.tp_collective_time` on
one 8 x A100-80GB node), so the ratio compares the layouts, not two cost models.
Bytes are what each rank sends on a ring (nccl-tests' bus bytes: 2(n-1)/n of the
tensor for an all-reduce, (n-1)/n for an all-gather or reduce-scatter), so a
reduce-scatter plus an all-gather counts the same as one all-reduce. A ratio of
1.0 means autopar found Megatron's communication; below 1, less; above 1, more.
Writes benchmarks/results/megatron_compare.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from autopar.api import plan as make_plan
from autopar.cost.comm import bus_factor
from autopar.mesh import Mesh
from autopar.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
TP = 8
DTYPE_BYTES = 2  # bf16
MEGATRON_ALL_REDUCES_PER_BLOCK = 4  # 2 forward (g after row-parallel) + 2 backward (f)


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    seq: int
    hidden: int


CASES = (
    Case("gpt2-medium", batch=8, seq=1024, hidden=1024),
    Case("llama2-7b", batch=2, seq=4096, hidden=4096),
)


def megatron_block(case: Case, mesh: Mesh) -> dict:
    nbytes = case.batch * case.seq * case.hidden * DTYPE_BYTES
    seconds = mesh.tp_collective_time("all_reduce", nbytes, TP)
    n = MEGATRON_ALL_REDUCES_PER_BLOCK
    return {"collectives": n, "bytes": n * nbytes, "seconds": n * seconds,
            "bus_bytes": n * nbytes * bus_factor("all_reduce", TP),
            "kinds": {"forward all_reduce": 2, "backward all_reduce": 2}}  # fmt: skip


def autopar_block(plan) -> dict:
    """Per-block communication, the median over blocks (blocks are usually identical), plus
    each block's share of the step's gradient sums over tp (parameters read by split work
    whose Megatron f waits for the end of the step), which Megatron's layout has not."""
    by_layer = defaultdict(list)
    for c in plan.collectives:
        if c.layer is not None:
            by_layer[c.layer].append(c)
    layers = sorted(set(plan.layer_of.values()))
    step_sums = [c for c in plan.collectives if c.axis == "tp" and c.consumer == "optimizer"]
    kinds = defaultdict(int)
    for c in by_layer[layers[0]]:
        kinds[f"{c.phase} {c.kind}"] += 1
    if step_sums:
        kinds["step gradient sums (share)"] = 1

    def median(fn):
        return statistics.median(fn(by_layer[layer]) for layer in layers)

    def share(fn):
        return sum(fn(c) for c in step_sums) / len(layers)

    return {
        "collectives": median(len),
        "bytes": median(lambda cs: sum(c.nbytes for c in cs)) + share(lambda c: c.nbytes),
        "seconds": median(lambda cs: sum(c.seconds for c in cs)) + share(lambda c: c.seconds),
        "bus_bytes": median(lambda cs: sum(c.nbytes * bus_factor(c.kind, TP) for c in cs))
        + share(lambda c: c.nbytes * bus_factor(c.kind, TP)),
        "kinds": dict(sorted(kinds.items())),
    }


def compare(case: Case) -> dict:
    mesh = Mesh.preset("a100-80gb")
    model, inputs = build_model(case.model, batch=case.batch, seq=case.seq)
    plan = make_plan(model, inputs, mesh, dtype=torch.bfloat16, tp=TP, dp=1, pp=1)
    ours, megatron = autopar_block(plan), megatron_block(case, mesh)
    return {
        "model": case.model, "batch": case.batch, "seq": case.seq, "tp": TP,
        "autopar": ours, "megatron": megatron,
        "seconds_ratio": ours["seconds"] / megatron["seconds"],
        "bus_bytes_ratio": ours["bus_bytes"] / megatron["bus_bytes"],
    }  # fmt: skip


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"


def table(rows: list[dict]) -> str:
    lines = [f"per-block communication per training step at tp={TP} on 8 x A100-80GB (bf16)"]
    for r in rows:
        a, m = r["autopar"], r["megatron"]
        lines += [
            f"{r['model']} (batch {r['batch']} x seq {r['seq']}):",
            f"  autopar : {a['seconds'] * 1e6:8.1f} us, {a['bus_bytes'] / 2**20:8.1f} MiB sent per "
            f"rank  ({_kinds(a['kinds'])})",
            f"  megatron: {m['seconds'] * 1e6:8.1f} us, {m['bus_bytes'] / 2**20:8.1f} MiB sent per "
            f"rank  ({_kinds(m['kinds'])})",
            f"  ratio autopar / megatron: time {r['seconds_ratio']:.3f}, "
            f"bytes sent {r['bus_bytes_ratio']:.3f}",
        ]
    return "\n".join(lines)


def main() -> int:
    rows = [compare(case) for case in CASES]
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "megatron_compare.json"
    out.write_text(json.dumps({"results": rows}, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
