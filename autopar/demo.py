"""`make demo`: autopar's main job, end to end, on a laptop-sized machine.

1. trace GPT-2 small on the meta device and show its per-block FLOPs and parameters;
2. plan it for one node of 8 x A100-80GB and show the plan;
3. price its collectives; 4. compare with two nodes;
5. plan a tiny GPT-2 for a toy two-node cluster with a 3D layout (dp=2, tp=2, pp=2; the
   solver picks the microbatches and schedule), train it for a few AdamW steps on 8 local
   gloo processes, and print its loss curve next to the unsplit model's.

Each step is a small function; `run_demo` strings them together.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from autopar.console import Progress, human_count, layout_progress, write_plan_files
from autopar.launch import run_local

DEMO_MODEL, DEMO_BATCH, DEMO_SEQ = "gpt2", 8, 1024
TRAIN_WORLD, TRAIN_STEPS, TRAIN_LAYOUT = 8, 5, {"dp": 2, "tp": 2, "pp": 2}
TRAIN_TIMEOUT_S = 300


def run_demo(html: str | None = None, quiet: bool = False, train: bool = True) -> None:
    from autopar.mesh import Mesh

    progress = Progress(quiet)
    traced, inputs = demo_capture(progress)
    _heading(f"1. the model: {DEMO_MODEL}, traced on the meta device")
    print(demo_layer_table(traced))
    one_node = demo_plan(traced, inputs, Mesh.preset("a100-80gb"), progress)
    _heading("2. the best plan for one node of 8 x A100-80GB")
    print(one_node.summary())
    _heading("3. what its collectives cost")
    print(demo_collective_table(one_node))
    two_nodes = demo_plan(traced, inputs, Mesh.preset("a100-80gb", nodes=2), progress)
    _heading("4. one node against two")
    print(demo_compare_table({"1 node": one_node, "2 nodes": two_nodes}))
    write_plan_files(one_node, None, html)
    if train:
        _heading(f"5. training a tiny GPT-2 on {TRAIN_WORLD} local gloo ranks, 3D plan")
        print(demo_train(progress))
    print("\nnext: autopar plan gpt2-xl --mesh a100-80gb:2 --out plan.json --html report.html")


def _heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def demo_capture(progress: Progress):
    from autopar.capture import capture
    from autopar.models import build_model

    with progress.step(f"building {DEMO_MODEL} on the meta device"):
        model, inputs = build_model(DEMO_MODEL, batch=DEMO_BATCH, seq=DEMO_SEQ)
    with progress.step("capturing the graph (torch.export)"):
        traced = capture(model, inputs)
    progress.log(f"{len(traced.graph_module.graph.nodes)} graph nodes, {traced.num_layers} blocks")
    return traced, inputs


def demo_plan(traced, inputs, mesh, progress: Progress):
    from autopar.api import plan as make_plan

    title = f"planning for {mesh.nodes} x {mesh.devices_per_node} {mesh.device.name}"
    with progress.step(title) as update:
        return make_plan(
            traced, inputs, mesh, dtype=torch.bfloat16, progress=layout_progress(update)
        )


def demo_layer_table(traced) -> str:
    """Forward FLOPs and parameters per transformer block, from the graph analysis."""
    flops: dict = {}
    params: dict = {}
    for name, info in traced.analysis.nodes.items():
        flops[info.layer] = flops.get(info.layer, 0) + info.flops
        if name in traced.param_fqns and name not in traced.tied_params and info.shape:
            params[info.layer] = params.get(info.layer, 0) + math.prod(info.shape)
    blocks = sorted(k for k in flops if k is not None) + [None]
    lines = [
        f"{DEMO_MODEL}, batch {DEMO_BATCH} x seq {DEMO_SEQ}: forward FLOPs and parameters",
        f"  {'block':>8s} {'GFLOP':>10s} {'params':>10s}",
    ]
    for layer in blocks:
        label = "outside" if layer is None else str(layer)
        lines.append(
            f"  {label:>8s} {flops.get(layer, 0) / 1e9:10.1f} "
            f"{human_count(params.get(layer, 0)):>10s}"
        )
    total = f"{sum(flops.values()) / 1e9:10.1f} {human_count(sum(params.values())):>10s}"
    return "\n".join([*lines, f"  {'total':>8s} {total}"])


def demo_collective_table(plan) -> str:
    """Predicted cost of the plan's collectives, by mesh axis, kind and phase."""
    from autopar.plan.summary import human_bytes, human_seconds
    from autopar.viz.report import collective_totals

    lines = [f"collectives per mesh axis (tp={plan.tp}: activations and gradient sums; "
             f"dp={plan.dp}: the gradient sync), whole model, one pass of the example batch "
             f"(each of the {plan.pp} pipeline stage(s) runs its blocks' share)"]  # fmt: skip
    totals = {(axis, *key): value for axis in ("tp", "dp")
              for key, value in collective_totals(plan, axis).items()}  # fmt: skip
    if not totals:
        return "\n".join([*lines, "  none"])
    for axis, kind, phase in sorted(
        totals, key=lambda key: (key[0] != "tp", key[2] != "forward", key[1])
    ):
        count, nbytes, seconds = totals[axis, kind, phase]
        lines.append(
            f"  {axis:3s}{phase:9s} {kind:15s} x{count:<4d} {human_bytes(nbytes):>11s} "
            f"{human_seconds(seconds):>10s}"
        )
    count, nbytes, seconds = (sum(column) for column in zip(*totals.values(), strict=True))
    lines.append(
        f"  {'total':28s} x{count:<4d} {human_bytes(nbytes):>11s} {human_seconds(seconds):>10s}"
    )
    return "\n".join(lines)


def demo_compare_table(plans: dict) -> str:
    from autopar.plan.summary import human_bytes, human_seconds

    lines = [f"  {'mesh':8s} {'dp':>3s} {'tp':>3s} {'pp':>3s} {'step':>10s} {'comm':>10s} "
             f"{'memory':>11s} {'TFLOP/s':>8s}"]  # fmt: skip
    for label, plan in plans.items():
        c = plan.cost
        lines.append(
            f"  {label:8s} {plan.dp:3d} {plan.tp:3d} {plan.pp:3d} "
            f"{human_seconds(c.step_time_s):>10s} {human_seconds(c.comm_s):>10s} "
            f"{human_bytes(c.memory_per_device_bytes):>11s} {c.tflops_per_device:8.1f}"
        )
    return "\n".join(["best plan per mesh (batch per replica fixed):", *lines])


# ----------------------------------------------------------------------------- parser


# ----------------------------------------------------------------------------- training


def tiny_gpt2():
    """A 4-block GPT-2 small enough to train on CPU, with weights fixed by a seed."""
    from autopar.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(
            "gpt2", batch=8, seq=32, device="cpu", n_layer=4, n_embd=64, n_head=4,
            vocab_size=256, n_positions=64,
        )  # fmt: skip


def toy_cluster():
    """Two nodes of four devices with A100 links but 1/1000 of an A100's compute and memory
    bandwidth: at this scale a toy model's matmuls are worth splitting, as a real
    model's are on real A100s (on A100 constants the solver keeps a toy replicated)."""
    from autopar.mesh import DeviceSpec, Mesh

    a100 = Mesh.preset("a100-80gb", nodes=2)
    device = DeviceSpec(
        "toy device (A100 / 1000)", peak_flops=a100.device.peak_flops / 1000,
        memory_bandwidth=a100.device.memory_bandwidth / 1000, memory_bytes=a100.device.memory_bytes,
    )  # fmt: skip
    return dataclasses.replace(a100, devices_per_node=TRAIN_WORLD // 2, device=device)


def next_token_loss(output, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM loss: predict token t+1 from tokens up to t."""
    logits = output.logits[:, :-1].reshape(-1, output.logits.shape[-1])
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))


def _batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (8, 32), generator=generator) for _ in range(steps)]


def single_device_losses(steps: int) -> list[float]:
    model, _ = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in _batches(steps):
        loss = next_token_loss(model(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _train_worker(rank: int, world_size: int, steps: int) -> tuple[list[float], str]:
    """One of the 8 processes: plan (rank 0 broadcasts it), build its part, train."""
    import autopar

    model, inputs = tiny_gpt2()
    pm = autopar.parallelize(model, toy_cluster(), (inputs[0][:4],), **TRAIN_LAYOUT)
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    losses = []
    for ids in _batches(steps):
        mine = ids[pm.dp_rank :: pm.dp_size]  # this replica's rows, as a DistributedSampler deals
        losses.append(float(pm.train_step((mine,), mine, next_token_loss)))
        optimizer.step()
        optimizer.zero_grad()
    return losses, pm.plan.summary()


def parallel_losses(steps: int) -> tuple[list[float], str]:
    """Losses (equal on every rank) and the plan's summary, from 8 local gloo processes."""
    return run_local(_train_worker, TRAIN_WORLD, steps, timeout_s=TRAIN_TIMEOUT_S)[0]


def demo_train(progress: Progress) -> str:
    with progress.step(f"training on {TRAIN_WORLD} gloo processes"):
        parallel, summary = parallel_losses(TRAIN_STEPS)
    with progress.step("training the unsplit model"):
        single = single_device_losses(TRAIN_STEPS)
    lines = [summary, "", f"  {'step':>4s} {'parallel':>12s} {'unsplit':>12s} {'difference':>11s}"]
    for step, (a, b) in enumerate(zip(parallel, single, strict=True)):
        lines.append(f"  {step:4d} {a:12.6f} {b:12.6f} {abs(a - b):11.2e}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(parallel, single, strict=True))
    lines.append(f"largest relative difference: {worst:.1e}")
    return "\n".join(lines)
