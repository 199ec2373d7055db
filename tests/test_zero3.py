"""ZeRO-3 at run time on 2 gloo ranks: what each rank stores and when it gathers.

Parity with the single-device model (zero=3 in 3D and pure dp) is in
tests/test_pipeline_parity.py; here, GPT-2 at dp=2 under ZeRO-3: `pm.parameters()`
are flat dp slices holding half of every weight; the generated code gathers each block's
weights once per forward; backward gathers them again (a gathered weight is never kept
for backward, without recomputation as with it), and nothing gathered outlives the step.
"""

from __future__ import annotations

import conftest
import pytest
import torch
from distributed import replica_batch
from test_pipeline_parity import free_comm_mesh, lm_loss

from autopar.launch import run_local

LAYERS, ROWS = 3, 4


def _count_gathers(rank: int, world_size: int, recompute: str) -> dict:
    import autopar
    from autopar.ops import zero

    model, (example,) = conftest.tiny_gpt2(n_layer=LAYERS, batch=ROWS // 2, seq=16)
    full_numel = sum(p.numel() for p in model.parameters())
    pm = autopar.parallelize(
        model, free_comm_mesh(2), (example,), dp=2, tp=1, pp=1, zero=3, recompute=recompute,
        global_batch_size=ROWS,
    )  # fmt: skip
    calls = {"forward": 0, "backward": 0}
    original = zero._gather

    def counted(*args):
        calls["backward" if _in_backward() else "forward"] += 1
        return original(*args)

    zero._gather = counted
    try:
        ids = torch.randint(0, 128, (ROWS, 16), generator=torch.Generator().manual_seed(rank))
        pm.train_step(replica_batch(ids, pm), replica_batch(ids, pm), lm_loss)
    finally:
        zero._gather = original
    stored = list(pm.parameters())
    return {
        "calls": calls,
        "gathers_in_code": pm.code.count("gather_params('dp'"),
        "flat": all(p.dim() == 1 for p in stored),
        "stored": sum(p.numel() for p in stored),
        "count": len(stored),
        "full": full_numel,
        "grads": all(p.grad is not None and p.grad.shape == p.shape for p in stored),
        "left": len(zero._REGISTRY),
    }


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@pytest.mark.multiprocess
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_zero3_gathers_per_block_and_again_in_backward(recompute):
    for result in run_local(_count_gathers, 2, recompute, timeout_s=300):
        assert result["flat"] and result["grads"]
        # half of every weight, and at most one element of padding per weight
        assert result["full"] / 2 <= result["stored"] <= result["full"] / 2 + result["count"]
        assert result["gathers_in_code"] >= LAYERS
        calls = result["calls"]
        assert calls["forward"] == result["gathers_in_code"]
        # every block's weights are read by its backward (a matmul keeps its weight)
        assert calls["backward"] >= LAYERS
        assert result["left"] == 0
