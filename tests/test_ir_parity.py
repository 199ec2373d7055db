"""Sequence parallelism and the traced vocabulary-parallel loss against single-device training.

On 4 real gloo processes (fp32, dropout 0), through `autopar.parallelize` with the
solver's own plans on a mesh where communication is free (so it shards whatever it
can) and `sequence_parallel=True` pinned: GPT-2 (tied head), Llama (grouped-query
attention) and BERT at tp=2 (dp=2) and tp=4, and GPT-2 with its 50,257-word vocabulary
at tp=4 with the loss traced (the vocabulary pads to 4 x 12,565; the cross-entropy runs
on vocabulary shards). Per case, on every rank: the loss of each of 3 AdamW steps,
every gradient after the first, and `full_state_dict()` after the last equal the
unsplit model's to 1e-5 relative. All cases run in one spawn.
"""

from __future__ import annotations

import conftest
import pytest
import torch
from distributed import replica_batch
from test_pipeline_parity import _numpy, _worst, adamw, free_comm_mesh, lm_loss

from autopar.launch import run_local

WORLD, ROWS, SEQ, STEPS, RTOL = 4, 8, 16, 3, 1e-5


def gpt2(batch, vocab_size=128):
    return conftest.tiny_gpt2(n_layer=2, n_head=4, batch=batch, seq=SEQ, vocab_size=vocab_size)


def gpt2_full_vocabulary(batch):
    return gpt2(batch, vocab_size=50257)


def llama(batch):
    return conftest.tiny_llama(n_layer=2, n_head=8, n_kv_head=4, batch=batch, seq=SEQ)


def bert(batch):
    return conftest.tiny_bert(n_layer=2, n_head=4, batch=batch, seq=SEQ)


def hidden_loss(output, ids):
    """BERT has no head: a loss on its last hidden state that the target weights."""
    return (output.last_hidden_state.square().mean(-1) * (ids % 3)).mean()


MODELS = {"gpt2": gpt2, "gpt2-50257": gpt2_full_vocabulary, "llama": llama, "bert": bert}
LOSSES = {"bert": hidden_loss}
# (model, dp, tp, loss traced with the model)
CASES = [
    ("gpt2", 2, 2, False), ("llama", 2, 2, False), ("bert", 2, 2, False),
    ("gpt2", 1, 4, False), ("llama", 1, 4, False), ("bert", 1, 4, False),
    ("gpt2-50257", 1, 4, True),
]  # fmt: skip


def _vocab(name: str) -> int:
    return 50257 if name == "gpt2-50257" else 128


def batches(name: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, _vocab(name), (ROWS, SEQ), generator=generator) for _ in range(STEPS)]


def reference_run(name: str) -> dict:
    model, _ = MODELS[name](ROWS)
    loss_fn, optimizer = LOSSES.get(name, lm_loss), adamw(model.parameters())
    losses, grads = [], {}
    for step, ids in enumerate(batches(name)):
        loss = loss_fn(model(ids), ids)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            named = model.named_parameters(remove_duplicate=False)
            grads = {k: None if p.grad is None else p.grad.clone() for k, p in named}
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": losses, "grads": grads, "state": model.state_dict()}


def parity_case(rank: int, name: str, dp: int, tp: int, traced_loss: bool) -> dict:
    import autopar

    loss_fn = LOSSES.get(name, lm_loss)
    model, (example,) = MODELS[name](ROWS // dp)
    traced = {"loss_fn": loss_fn, "example_target": example} if traced_loss else {}
    pm = autopar.parallelize(
        model, free_comm_mesh(WORLD), (example,), dp=dp, tp=tp, pp=1, sequence_parallel=True,
        **traced,
    )  # fmt: skip
    optimizer = adamw(pm.parameters())
    losses, grads = [], {}
    for step, ids in enumerate(batches(name)):
        mine = replica_batch(ids, pm)
        losses.append(float(pm.train_step(mine, mine, *([] if traced_loss else [loss_fn]))))
        if step == 0:
            grads = _numpy(pm.full_grads())
        optimizer.step()
        optimizer.zero_grad()
    plan = pm.plan
    return {
        "losses": losses, "grads": grads, "state": _numpy(pm.full_state_dict()),
        "layout": (plan.dp, plan.tp), "sequence_parallel": plan.sequence_parallel,
        "code": pm.code if rank == 0 else "",
    }  # fmt: skip


def _worker(rank: int, world_size: int, cases: list) -> list[dict]:
    return [parity_case(rank, *case) for case in cases]


def _failures(rank, case, result, reference) -> list[str]:
    name, dp, tp, traced_loss = case
    where = f"rank {rank}, {name} dp={dp} tp={tp}{' traced loss' if traced_loss else ''}"
    failures = []
    if result["layout"] != (dp, tp) or not result["sequence_parallel"]:
        failures.append(f"{where}: planned {result['layout']}, sp={result['sequence_parallel']}")
    losses = zip(result["losses"], reference["losses"], strict=True)
    errors = {f"loss {k}": abs(a - b) / abs(b) for k, (a, b) in enumerate(losses)}
    grads = {k: reference["grads"][k] for k in result["grads"]}
    for what, (actual, expected) in {
        "grad": (result["grads"], grads), "state": (result["state"], reference["state"])
    }.items():  # fmt: skip
        error, key = _worst(actual, expected, what)
        errors[key] = error
    worst = max(errors, key=errors.get)
    if errors[worst] > RTOL:
        failures.append(f"{where}: {worst} off by {errors[worst]:.2e}")
    if rank == 0 and traced_loss and "vocab_parallel_cross_entropy(" not in result["code"]:
        failures.append(f"{where}: the loss did not run vocabulary-parallel")
    return failures


@pytest.mark.multiprocess
def test_sequence_parallel_and_vocabulary_parallel_training_matches_one_device():
    references = {name: reference_run(name) for name in {case[0] for case in CASES}}
    results = run_local(_worker, WORLD, CASES, timeout_s=500)
    failures = [
        failure
        for rank, per_case in enumerate(results)
        for case, result in zip(CASES, per_case, strict=True)
        for failure in _failures(rank, case, result, references[case[0]])
    ]
    assert not failures, "\n".join(failures)
