"""`plan.to_torch()`: a plan in torch's own terms, run by torch's own `parallelize_module`.

On a mesh where communication costs enough that the solver picks Megatron's layout,
a Llama plan at tp=2 becomes ColwiseParallel / RowwiseParallel pairs per block; pinned
to sequence parallelism it adds SequenceParallel norms and sequence-sharded block
edges; on a mesh with cheap collectives a traced loss runs vocabulary-parallel (on a
vocabulary tp does not divide, padded), which torch runs under `loss_parallel()`. Torch
running each on 2 gloo ranks gives autopar's loss and gradients. What torch's styles
cannot say (a fused QKV's block-interleaved shard, GPT-2's Conv1D, sequence parallelism
around them) is listed instead.
"""

from __future__ import annotations

from contextlib import nullcontext

import conftest
import pytest
import torch
import torch.nn.functional as F
from distributed import relative_error

from autopar.launch import run_local

RTOL = 1e-5
BATCH, SEQ = 4, 16


def megatron_mesh(world_size: int, latency: float = 1e-4):
    """Slow compute and links with latency: sharding pays, each collective costs. With
    little latency a vocabulary-parallel loss's three small all-reduces beat gathering
    the logits."""
    from autopar.mesh import DeviceSpec, Mesh

    device = DeviceSpec("slow", 1e9, 1e9, memory_bytes=2**34, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device, intra_node_bw=1e9,
        inter_node_bw=1e9, intra_node_latency=latency, inter_node_latency=latency,
    )  # fmt: skip


def llama(n_layer: int = 2, vocab_size: int = 128):
    return conftest.tiny_llama(
        n_layer=n_layer, hidden=64, n_head=4, n_kv_head=2, vocab_size=vocab_size,
        batch=BATCH, seq=SEQ,
    )  # fmt: skip


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch(vocab_size: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _full(grad):
    from torch.distributed.tensor import DTensor

    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def llama_plan(world_size: int, vocab_size: int = 128, *, traced_loss=False, latency=1e-4, **pins):
    """A tp=2 Llama plan on the Megatron mesh, with `lm_loss` traced when asked."""
    import autopar

    model, example = llama(vocab_size=vocab_size)
    loss = {"loss_fn": lm_loss, "example_target": example[0]} if traced_loss else {}
    mesh = megatron_mesh(world_size, latency)
    return autopar.plan(model, example, mesh, tp=2, dp=1, pp=1, **loss, **pins), mesh


def autopar_and_torch(rank: int, world_size: int, cases: list) -> list[dict]:
    """For each `(plan, mesh, vocab_size, traced_loss)`: one training step of autopar's
    module and of the model under `parallelize_module(plan.to_torch().tp_plan)` (the loss
    under `loss_parallel()` where the export says so), and how far apart they are."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    import autopar

    tp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    results = []
    for plan, mesh, vocab_size, traced_loss in cases:
        ids = batch(vocab_size)
        model, example = llama(vocab_size=vocab_size)
        loss = {"loss_fn": lm_loss, "example_target": example[0]} if traced_loss else {}
        pm = autopar.parallelize(model, mesh, example, plan=plan, **loss)
        step = pm.train_step(ids, ids) if traced_loss else pm.train_step(ids, ids, lm_loss)
        ours = {"loss": float(step), "grads": pm.full_grads()}
        model, _ = llama(vocab_size=vocab_size)
        torch_plan = plan.to_torch()
        parallelize_module(model, tp_mesh, torch_plan.tp_plan)
        with loss_parallel() if torch_plan.loss_parallel else nullcontext():
            loss = lm_loss(model(ids), ids)
            loss.backward()
        loss = float(_full(loss))
        named = model.named_parameters(remove_duplicate=False)
        grads = {name: _full(param.grad) for name, param in named}
        sharded = sum(
            isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters()
        )
        errors = {"loss": abs(loss - ours["loss"]) / abs(ours["loss"])}
        errors.update({name: relative_error(grads[name], ours["grads"][name]) for name in grads})
        results.append({"errors": errors, "sharded": sharded})
    return results


def assert_torch_matches(results: list[list[dict]], min_sharded: int = 14) -> None:
    for rank, per_case in enumerate(results):
        for case, result in enumerate(per_case):
            assert result["sharded"] >= min_sharded, f"rank {rank} case {case}: {result['sharded']}"
            worst = max(result["errors"], key=result["errors"].get)
            assert result["errors"][worst] <= RTOL, (
                f"rank {rank} case {case}: {worst} off by {result['errors'][worst]:.1e}"
            )


def _styles(torch_plan) -> dict[str, object]:
    """Module name (the path's last part, first block) -> its torch style."""
    return {path.replace("model.layers.0.", ""): style for path, style in torch_plan.tp_plan.items()
            if ".layers." not in path or ".layers.0." in path}  # fmt: skip


@pytest.mark.multiprocess
def test_to_torch_llama_tp2_under_parallelize_module_matches_autopar():
    plan, mesh = llama_plan(2, sequence_parallel=False)
    torch_plan = plan.to_torch()
    styles = {
        name.rsplit(".", 1)[-1]: type(style).__name__ for name, style in _styles(torch_plan).items()
    }
    assert styles["q_proj"] == styles["gate_proj"] == "ColwiseParallel", torch_plan.describe()
    assert styles["o_proj"] == styles["down_proj"] == "RowwiseParallel", torch_plan.describe()
    assert_torch_matches(run_local(autopar_and_torch, 2, [(plan, mesh, 128, False)], timeout_s=240))


@pytest.mark.multiprocess
def test_to_torch_sequence_parallel_and_loss_parallel_match_autopar():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import SequenceParallel

    sequence, sequence_mesh = llama_plan(2, sequence_parallel=True)
    vocab, vocab_mesh = llama_plan(2, 127, traced_loss=True, latency=1e-6, sequence_parallel=False)
    both, both_mesh = llama_plan(2, 127, traced_loss=True, latency=1e-6, sequence_parallel=True)
    for plan in (sequence, both):
        torch_plan = plan.to_torch()
        styles = _styles(torch_plan)
        assert not [m for m in torch_plan.not_expressible if "sequence" in m], torch_plan.describe()
        for norm in ("input_layernorm", "post_attention_layernorm", "model.norm"):
            assert isinstance(styles[norm], SequenceParallel), torch_plan.describe()
        assert styles["self_attn.q_proj"].input_layouts == (Shard(1),), torch_plan.describe()
        assert styles["mlp.down_proj"].output_layouts == (Shard(1),), torch_plan.describe()
        assert not styles["mlp.down_proj"].use_local_output  # the residual add gets a DTensor
    for plan in (vocab, both):  # 127 classes: autopar pads to 128, torch shards 64 + 63
        torch_plan = plan.to_torch()
        lost = [line for line in torch_plan.not_expressible if "loss" in line or "lm_head" in line]
        assert torch_plan.loss_parallel and not lost, torch_plan.describe()
        assert _styles(torch_plan)["lm_head"].output_layouts == (Shard(-1),)
    assert not sequence.to_torch().loss_parallel  # no traced loss: logits whole
    cases = [(sequence, sequence_mesh, 128, False), (vocab, vocab_mesh, 127, True),
             (both, both_mesh, 127, True)]  # fmt: skip
    assert_torch_matches(run_local(autopar_and_torch, 2, cases, timeout_s=300))


def test_to_torch_lists_what_torch_cannot_express_and_the_split_points():
    import autopar

    model, example = conftest.tiny_gpt2(n_layer=2, batch=2, seq=SEQ)
    gpt2 = autopar.plan(model, example, megatron_mesh(2), tp=2, dp=1, pp=1).to_torch()
    fused = [line for line in gpt2.not_expressible if "c_attn.weight" in line]
    assert fused and "block-interleaved" in fused[0], gpt2.describe()
    assert "transformer.h.0.attn.c_attn" not in gpt2.tp_plan
    model, example = conftest.tiny_gpt2(n_layer=2, batch=2, seq=SEQ)
    sp = autopar.plan(model, example, megatron_mesh(2), tp=2, dp=1, pp=1, sequence_parallel=True)
    torch_plan = sp.to_torch()
    (why,) = [line for line in torch_plan.not_expressible if line.startswith("sequence")]
    assert "c_attn" in why and "DTensor" in why, why  # the fused QKV torch leaves replicated
    assert not any(type(s).__name__ == "SequenceParallel" for s in torch_plan.tp_plan.values())
    loss = {"loss_fn": lm_loss, "example_target": example[0]}
    tied = autopar.plan(model, example, megatron_mesh(2, 1e-6), tp=2, dp=1, pp=1, **loss)
    assert tied.to_torch().loss_parallel is False  # the plan's loss is vocabulary-parallel ...
    (why,) = [line for line in tied.to_torch().not_expressible if "loss" in line]
    assert "lm_head" in why and "no torch style" in why, why  # ... on a head tied to wte
    model, example = llama(n_layer=4)
    piped = autopar.plan(model, example, megatron_mesh(4), tp=2, dp=1, pp=2, schedule="1f1b",
                         sequence_parallel=True)  # fmt: skip
    torch_plan = piped.to_torch()
    assert torch_plan.mesh_shape == (2, 1, 2) and torch_plan.schedule == "Schedule1F1B"
    first = min(piped.stages[1].layers)
    assert list(torch_plan.split_points) == [f"model.layers.{first}"], torch_plan.describe()
    (why,) = [line for line in torch_plan.not_expressible if line.startswith("sequence")]
    assert "PipelineStage" in why and "SequenceParallel" not in torch_plan.describe(), why
