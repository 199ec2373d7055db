"""`plan.to_torch()`: a plan in torch's own terms, run by torch's own `parallelize_module`.

On a mesh where communication costs enough that the solver picks Megatron's layout,
a Llama plan at tp=2 becomes ColwiseParallel / RowwiseParallel pairs per block; torch
running them on 2 gloo ranks gives autopar's loss and gradients. What torch's styles
cannot say (a fused QKV's block-interleaved shard, GPT-2's Conv1D) is listed instead.
"""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F
from distributed import relative_error

from autopar.launch import run_local

RTOL = 1e-5
BATCH, SEQ = 4, 16


def megatron_mesh(world_size: int):
    """Slow compute and links with latency: sharding pays, each collective costs."""
    from autopar.mesh import DeviceSpec, Mesh

    device = DeviceSpec("slow", 1e9, 1e9, memory_bytes=2**34, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device, intra_node_bw=1e9,
        inter_node_bw=1e9, intra_node_latency=1e-4, inter_node_latency=1e-4,
    )  # fmt: skip


def llama(n_layer: int = 2):
    return conftest.tiny_llama(
        n_layer=n_layer, hidden=64, n_head=4, n_kv_head=2, batch=BATCH, seq=SEQ
    )


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def train_step(pm, ids: torch.Tensor) -> float:
    """The one place autopar trains here: `pm.train_step` on the global batch (dp=1)."""
    return float(pm.train_step(ids, ids, lm_loss))


def _full(grad):
    from torch.distributed.tensor import DTensor

    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def autopar_and_torch(rank: int, world_size: int, plan) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    import autopar

    model, example = llama()
    pm = autopar.parallelize(model, megatron_mesh(world_size), example, plan=plan)
    ours = {"loss": train_step(pm, batch()), "grads": pm.full_grads()}
    model, _ = llama()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, plan.to_torch().tp_plan)
    loss = lm_loss(model(batch()), batch())
    loss.backward()
    named = model.named_parameters(remove_duplicate=False)
    grads = {name: _full(param.grad) for name, param in named}
    sharded = sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters())
    errors = {"loss": abs(float(loss) - ours["loss"]) / abs(ours["loss"])}
    errors.update({name: relative_error(grads[name], ours["grads"][name]) for name in grads})
    return {"errors": errors, "sharded": sharded}


@pytest.mark.multiprocess
def test_to_torch_llama_tp2_under_parallelize_module_matches_autopar():
    import autopar

    model, example = llama()
    plan = autopar.plan(model, example, megatron_mesh(2), tp=2, dp=1, pp=1, sequence_parallel=False)
    torch_plan = plan.to_torch()
    styles = {
        path.rsplit(".", 1)[-1]: type(style).__name__ for path, style in torch_plan.tp_plan.items()
    }
    assert styles["q_proj"] == styles["gate_proj"] == "ColwiseParallel", torch_plan.describe()
    assert styles["o_proj"] == styles["down_proj"] == "RowwiseParallel", torch_plan.describe()
    results = run_local(autopar_and_torch, 2, plan, timeout_s=240)
    for rank, result in enumerate(results):
        assert result["sharded"] >= 14, f"rank {rank}: only {result['sharded']} sharded"
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= RTOL, (
            f"rank {rank}: {worst} off by {result['errors'][worst]:.1e}"
        )


def test_to_torch_lists_what_torch_cannot_express_and_the_split_points():
    import autopar

    model, example = conftest.tiny_gpt2(n_layer=2, batch=2, seq=SEQ)
    gpt2 = autopar.plan(model, example, megatron_mesh(2), tp=2, dp=1, pp=1).to_torch()
    fused = [line for line in gpt2.not_expressible if "c_attn.weight" in line]
    assert fused and "block-interleaved" in fused[0], gpt2.describe()
    assert "transformer.h.0.attn.c_attn" not in gpt2.tp_plan
    model, example = llama(n_layer=4)
    piped = autopar.plan(model, example, megatron_mesh(4), tp=2, dp=1, pp=2, schedule="1f1b")
    torch_plan = piped.to_torch()
    assert torch_plan.mesh_shape == (2, 1, 2) and torch_plan.schedule == "Schedule1F1B"
    first = min(piped.stages[1].layers)
    assert list(torch_plan.split_points) == [f"model.layers.{first}"], torch_plan.describe()
