"""Checkpoints saved under one plan continue training under another (gloo ranks, fp32).

One 8-rank launch trains GPT-2 (tied LM head, fused QKV: a block-interleaved shard,
a vocabulary of 127 that tp=2 pads)
for `SAVED_AT` AdamW steps under dp=2 tp=2 pp=2 and saves; the same ranks then load
it under dp=4 tp=2 pp=1 and train on. One 4-rank launch loads it under dp=2 tp=1 pp=2
with ZeRO-3, trains a step and saves, then loads that under ZeRO-1 and trains on. Both must give the losses, and the final state, of the
unsplit model trained without interruption, to 1e-5.
"""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F
from distributed import relative_error, replica_batch

from autopar.launch import run_local

GLOBAL_BATCH, SEQ = 8, 16
STEPS, SAVED_AT = 4, 2
RTOL = 1e-5


VOCAB = 127  # at tp=2 the vocabulary shards are padded (64 + 63 rows)


def gpt2(batch: int):
    return conftest.tiny_gpt2(n_layer=2, n_head=4, batch=batch, seq=SEQ, vocab_size=VOCAB)


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def adamw(parameters) -> torch.optim.AdamW:
    """eps=1e-6: above the rounding noise of gradients that are zero in exact arithmetic."""
    return torch.optim.AdamW(parameters, lr=1e-4, eps=1e-6, weight_decay=0.1)


def train(pm, optimizer, steps: list[torch.Tensor]) -> list[float]:
    """The one place training steps run: `pm.train_step` on this replica's rows of each
    global batch."""
    losses = []
    for ids in steps:
        mine = replica_batch(ids, pm)
        losses.append(float(pm.train_step(mine, mine, lm_loss)))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def reference() -> dict:
    model, _ = gpt2(GLOBAL_BATCH)
    optimizer = adamw(model.parameters())
    losses = []
    for ids in batches():
        loss = lm_loss(model(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": model.state_dict()}


def free_comm_mesh(world_size: int):
    """Communication costs nothing, compute is slow: the solver shards what it can."""
    from autopar.mesh import DeviceSpec, Mesh

    device = DeviceSpec("slow", 1e9, 1e9, memory_bytes=2**34, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device, intra_node_bw=1e15,
        inter_node_bw=1e15, intra_node_latency=0.0, inter_node_latency=0.0,
    )  # fmt: skip


def parallel(world_size: int, layout: tuple[int, int, int], microbatches: int, **options):
    import autopar

    dp, tp, pp = layout
    model, (example,) = gpt2(GLOBAL_BATCH // dp // microbatches)
    return autopar.parallelize(
        model, free_comm_mesh(world_size), (example,), dp=dp, tp=tp, pp=pp,
        microbatches=microbatches, global_batch_size=GLOBAL_BATCH, **options,
    )  # fmt: skip


def _numpy(state: dict) -> dict:
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def save_then_resume(rank: int, world_size: int, path: str) -> dict:
    """dp=2 tp=2 pp=2: train and save; dp=4 tp=2 pp=1: load and train on."""
    import autopar

    pm = parallel(world_size, (2, 2, 2), 2)
    layouts = sorted({str(slot.placement) for slot in pm.part.state.held_slots().values()})
    optimizer = adamw(pm.parameters())
    before = train(pm, optimizer, batches()[:SAVED_AT])
    autopar.save_checkpoint(path, pm, optimizer, extra={"step": SAVED_AT})
    pm = parallel(world_size, (4, 2, 1), 1)
    optimizer = adamw(pm.parameters())
    extra = autopar.load_checkpoint(path, pm, optimizer)
    after = train(pm, optimizer, batches()[extra["step"] :])
    state = _numpy(pm.full_state_dict())
    return {"losses": before + after, "state": state, "extra": extra, "layouts": layouts}


def resume_elsewhere(rank: int, world_size: int, path: str) -> dict:
    """dp=2 tp=1 pp=2 with ZeRO-3 (the parameters in dp slices): load, train a step, save;
    the same with ZeRO-1 (only the optimizer's states in dp slices): load that, train on."""
    import autopar

    pm = parallel(world_size, (2, 1, 2), 2, zero=3)
    optimizer = adamw(pm.parameters())
    extra = autopar.load_checkpoint(path, pm, optimizer)
    losses = train(pm, optimizer, batches()[extra["step"] : extra["step"] + 1])
    autopar.save_checkpoint(path + "-zero3", pm, optimizer, extra={"step": extra["step"] + 1})
    pm = parallel(world_size, (2, 1, 2), 2, zero=1)
    optimizer = adamw(pm.parameters())
    extra = autopar.load_checkpoint(path + "-zero3", pm, optimizer)
    losses += train(pm, optimizer, batches()[extra["step"] :])
    return {"losses": losses, "state": _numpy(pm.full_state_dict())}


def _failures(results: list[dict], expected: dict, first_step: int) -> list[str]:
    failures = []
    for rank, result in enumerate(results):
        wanted = expected["losses"][first_step:]
        for step, (got, want) in enumerate(zip(result["losses"], wanted, strict=True)):
            if abs(got - want) > RTOL * abs(want):
                failures.append(f"rank {rank} step {first_step + step}: loss {got} != {want}")
        for key, value in result["state"].items():
            error = relative_error(torch.from_numpy(value), expected["state"][key])
            if error > RTOL:
                failures.append(f"rank {rank} {key}: off by {error:.1e}")
    return failures


@pytest.mark.multiprocess
def test_checkpoint_from_3d_layout_resumes_under_other_layouts_and_world_sizes(tmp_path):
    expected = reference()
    path = str(tmp_path / "ckpt")
    saved = run_local(save_then_resume, 8, path, timeout_s=300)
    assert saved[0]["extra"] == {"step": SAVED_AT}
    # stored as DTensor chunks (S(0): the padded vocabulary too) and whole (S(0,g3): fused QKV)
    assert {"S(0)", "S(0,g3)"} <= set(saved[0]["layouts"]), saved[0]["layouts"]
    failures = _failures(saved, expected, 0)
    resumed = run_local(resume_elsewhere, 4, path, timeout_s=300)
    failures += _failures(resumed, expected, SAVED_AT)
    assert not failures, "\n".join(failures[:20])


def bad_loads(rank: int, world_size: int, path: str) -> list[str]:
    """A checkpoint of GPT-2 (model only) loaded wrongly: the AutoparError each gives
    (after a round trip of pm.state_dict() through dcp.save and dcp.load)."""
    import autopar

    def single(model_and_example):
        model, example = model_and_example
        return autopar.parallelize(model, free_comm_mesh(1), example)

    pm = single(gpt2(2))
    autopar.save_checkpoint(path, pm)
    _round_trip_through_dcp(pm, path + "-dcp")
    other = single(conftest.tiny_llama(n_layer=1, batch=2, seq=SEQ))
    attempts = [
        lambda: autopar.load_checkpoint(path, other),
        lambda: autopar.load_checkpoint(path, pm, adamw(pm.parameters())),
        lambda: autopar.load_checkpoint(path + "-missing", pm),
    ]
    messages = []
    for attempt in attempts:
        try:
            attempt()
            messages.append("no error")
        except autopar.AutoparError as error:
            messages.append(str(error))
    return messages


def _round_trip_through_dcp(pm, path: str) -> None:
    """pm.state_dict() with dcp.save / dcp.load directly: the values come back."""
    import torch.distributed.checkpoint as dcp

    original = pm.full_state_dict()
    dcp.save({"model": pm.state_dict()}, checkpoint_id=path)
    pm.load_full_state_dict({key: torch.zeros_like(value) for key, value in original.items()})
    state = {"model": pm.state_dict()}
    dcp.load(state, checkpoint_id=path)
    pm.load_state_dict(state["model"])
    for key, value in pm.full_state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)


@pytest.mark.multiprocess
def test_state_dict_round_trips_and_loading_a_checkpoint_wrongly_says_what_is_wrong(tmp_path):
    (messages,) = run_local(bad_loads, 1, str(tmp_path / "gpt2"), timeout_s=120)
    other_model, no_optimizer, missing = messages
    assert "is not of this model" in other_model and "model.embed_tokens.weight" in other_model
    assert "keys it does not have (transformer.h.0" in other_model, other_model
    assert "same model" in other_model
    assert "holds no optimizer state" in no_optimizer
    assert "no checkpoint at" in missing and "save_checkpoint" in missing
