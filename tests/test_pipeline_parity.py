"""`autopar.parallelize` against single-device training on 8 gloo processes (fp32, dropout 0).

Every (dp, tp, pp) factorization of 8 that the brief lists, for Hugging Face GPT-2
(tied LM head) and Llama (grouped-query attention), with the solver's own plans
(`autopar.plan` on rank 0, on a mesh where communication is free so it shards),
and each pipeline schedule pinned at least twice. Per case, on every rank:

- the loss of each of 3 `train_step`s equals the unsplit model's;
- after the first step every full gradient equals the unsplit model's;
- after 3 AdamW steps `full_state_dict()` equals the unsplit model's state dict;
- `pm(ids)` gives the unsplit model's logits on every rank.

All cases run in one spawn of 8 processes. The global batch is 16 sequences of 16
tokens; each case's example inputs have its microbatch size, so no case traces twice
(test_parallelize.py covers a plan run at another batch size).
"""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F
from distributed import relative_error, replica_batch

from autopar.launch import run_local

WORLD = 8
GLOBAL_BATCH, SEQ = 16, 16
FORWARD_ROWS = 8  # a multiple of every pipeline case's microbatch size
RTOL = 1e-5
STEPS = 3


def free_comm_mesh(world_size: int = WORLD):
    """Communication costs nothing, compute is slow: the solver shards whatever it can."""
    from autopar.mesh import DeviceSpec, Mesh

    device = DeviceSpec("slow", 1e9, 1e9, memory_bytes=2**34, dtype_bytes=4)
    return Mesh(
        nodes=1, devices_per_node=world_size, device=device, intra_node_bw=1e15,
        inter_node_bw=1e15, intra_node_latency=0.0, inter_node_latency=0.0,
    )  # fmt: skip


def gpt2(batch: int = 2):
    return conftest.tiny_gpt2(n_layer=8, n_head=8, batch=batch, seq=SEQ)


def llama(batch: int = 2):
    return conftest.tiny_llama(n_layer=8, n_head=8, n_kv_head=4, batch=batch, seq=SEQ)


MODELS = {"gpt2": gpt2, "llama": llama}


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over tokens."""
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(vocab: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def adamw(parameters) -> torch.optim.AdamW:
    """Adam at settings where fp32 reassociation stays below the tolerance.

    Adam divides by the gradient's running magnitude, so rounding differences in
    small or cancelling gradient elements become differences in the step itself,
    in proportion to lr: on one device, summing the batch gradient as 8
    microbatches instead of one moves the state by 3.8e-5 (relative) after 3 steps
    at lr=1e-3, 4e-6 at lr=1e-4 (tp=8 here: 1.05e-5). At lr=3e-5 the parameters
    still move 100x the tolerance. eps=1e-6 sits above the rounding noise (~1e-11)
    of gradients that are zero in exact arithmetic (a key bias, through softmax).
    """
    return torch.optim.AdamW(parameters, lr=3e-5, eps=1e-6)


def _numpy(tensors: dict) -> dict:
    """Plain arrays: tensors sent through a queue would live in the worker's shared memory."""
    return {k: None if v is None else v.detach().numpy().copy() for k, v in tensors.items()}


def reference_run(model_name: str) -> dict:
    """The unsplit model trained the same way: losses, first gradients, final state, logits."""
    model, _ = MODELS[model_name]()
    optimizer = adamw(model.parameters())
    losses, grads = [], {}
    for step, ids in enumerate(batches()):
        loss = lm_loss(model(ids), ids)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters(remove_duplicate=False)}
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits = model(forward_batch()).logits
    return {"losses": losses, "grads": grads, "state": model.state_dict(), "logits": logits}


def forward_batch() -> torch.Tensor:
    return batches()[0][:FORWARD_ROWS]


def parity_case(rank: int, model_name, layout, schedule, microbatches, options=None) -> dict:
    """Train `STEPS` steps with `parallelize` (pinned `options` too: ZeRO, recomputation);
    what rank 0 (all: losses, logits) saw."""
    import time

    import autopar

    start = time.perf_counter()
    dp, tp, pp = layout
    # example inputs of one microbatch: the plan's graph is the runtime's, traced once
    model, (example,) = MODELS[model_name](batch=GLOBAL_BATCH // dp // microbatches)
    options = dict(options or {})
    traced_loss = options.pop("traced_loss", False)  # the loss traced with the model
    loss = {"loss_fn": lm_loss, "example_target": example} if traced_loss else {}
    pm = autopar.parallelize(
        model, free_comm_mesh(), (example,), dp=dp, tp=tp, pp=pp, microbatches=microbatches,
        schedule=schedule, global_batch_size=GLOBAL_BATCH, **options, **loss,
    )  # fmt: skip
    optimizer = adamw(pm.parameters())
    losses, grads = [], {}
    for step, ids in enumerate(batches()):
        mine = replica_batch(ids, pm)
        losses.append(float(pm.train_step(mine, mine, *([] if traced_loss else [lm_loss]))))
        if step == 0:
            grads = pm.full_grads()
        optimizer.step()
        optimizer.zero_grad()
    state = pm.full_state_dict()
    logits = pm(forward_batch()).logits if pp > 1 and not traced_loss else None
    plan = pm.plan
    result = {
        "losses": losses,
        "logits": None if logits is None else logits.numpy(),
        "plan": (plan.dp, plan.tp, plan.pp, plan.num_microbatches, plan.schedule),
        "pinned": {
            "zero": plan.zero,
            "recompute": plan.recompute,
            "sequence_parallel": plan.sequence_parallel,
            "traced_loss": pm.traced_loss is not None,
        },  # fmt: skip
        "stages": len(pm.part.stage_modules) if pp > 1 else 1,
        "sliced": all(
            slot.sliced is not None
            for slot in pm.part.state.held_slots().values()
            if slot.is_parameter
        ),  # fmt: skip
        "seconds": time.perf_counter() - start,
    }
    if rank == 0:  # identical on every rank (gathered and broadcast)
        result.update(grads=_numpy(grads), state=_numpy(state), code=pm.code)
    return result


def _parity_worker(rank: int, world_size: int, cases: list) -> list[dict]:
    return [parity_case(rank, *case) for case in cases]


def _worst(actual: dict, expected: dict, what: str) -> tuple[float, str]:
    assert list(actual) == list(expected), f"{what} keys differ: {set(actual) ^ set(expected)}"
    errors = {
        key: relative_error(None if value is None else torch.from_numpy(value), expected[key])
        for key, value in actual.items()
    }
    worst = max(errors, key=errors.get)
    return errors[worst], f"{what} {worst}"


def case_errors(result: dict, reference: dict) -> dict[str, float]:
    errors = {
        f"loss {step}": abs(a - b) / abs(b)
        for step, (a, b) in enumerate(zip(result["losses"], reference["losses"], strict=True))
    }
    if result["logits"] is not None:
        errors["logits"] = relative_error(torch.from_numpy(result["logits"]), reference["logits"])
    if "grads" in result:
        grads = {k: reference["grads"][k] for k in result["grads"]}
        error, key = _worst(result["grads"], grads, "grad")
        errors[key] = error
        error, key = _worst(result["state"], reference["state"], "state")
        errors[key] = error
    return errors


# (dp, tp, pp) -> (schedule, microbatches) per model. Every pipeline schedule runs for both
# models; microbatches are as few as the schedule allows (1F1B: >= pp, interleaved: a
# multiple of pp), each (4, 2, 1) case accumulates over 2, the others take one.
LAYOUTS = {
    "gpt2": {
        (8, 1, 1): (None, 1), (1, 8, 1): (None, 1), (1, 1, 8): ("gpipe", 2),
        (2, 2, 2): ("interleaved1f1b", 2), (1, 2, 4): ("1f1b", 4), (4, 2, 1): (None, 2),
        (2, 1, 4): ("interleaved1f1b", 4),
    },
    "llama": {
        (8, 1, 1): (None, 1), (1, 8, 1): (None, 1), (1, 1, 8): ("1f1b", 8),
        (2, 2, 2): ("gpipe", 2), (1, 2, 4): ("interleaved1f1b", 4), (4, 2, 1): (None, 2),
        (2, 1, 4): ("1f1b", 4),
    },
}  # fmt: skip

# ZeRO (1, 2, 3) and activation recomputation, pinned, in 3D and in pure data parallelism
MEMORY_CASES = [
    ("gpt2", (2, 2, 2), "1f1b", 2, {"zero": 1, "recompute": "full"}),
    ("llama", (2, 2, 2), "interleaved1f1b", 2, {"zero": 2, "recompute": "selective"}),
    ("gpt2", (8, 1, 1), None, 1, {"zero": 2, "recompute": "selective"}),
    ("llama", (8, 1, 1), None, 1, {"zero": 1, "recompute": "full"}),
    ("gpt2", (2, 2, 2), "1f1b", 2, {"zero": 3, "recompute": "selective"}),
    ("llama", (4, 2, 1), None, 2, {"zero": 3, "recompute": "full"}),
    ("llama", (8, 1, 1), None, 1, {"zero": 3, "recompute": "none"}),
]
# sequence parallelism with the vocabulary-parallel loss traced, in 3D
SEQUENCE_CASES = [
    ("gpt2", (2, 2, 2), "1f1b", 2, {"sequence_parallel": True, "traced_loss": True}),
    ("llama", (2, 2, 2), "interleaved1f1b", 2, {"sequence_parallel": True, "traced_loss": True}),
]
CASES = (
    [
        (name, layout, schedule, microbatches, {})
        for name, layouts in LAYOUTS.items()
        for layout, (schedule, microbatches) in layouts.items()
    ]
    + MEMORY_CASES
    + SEQUENCE_CASES
)


def _collectives(code: str) -> set[str]:
    """The reshard calls in the generated code, by the placements they turn into."""
    return {
        line.split("redistribute(")[1].split(")")[0]
        for line in code.splitlines()
        if "redistribute(" in line
    }


def _case_failures(rank: int, case: tuple, result: dict, reference: dict) -> list[str]:
    name, layout, schedule, microbatches, options = case
    where = f"rank {rank}, {name} (dp, tp, pp) = {layout}, {schedule or 'no schedule'} {options}"
    failures = []
    if {k: result["pinned"][k] for k in options} != options:
        failures.append(f"{where}: planned {result['pinned']}")
    if result["plan"][:4] != (*layout, microbatches):
        failures.append(f"{where}: plan {result['plan']}")
    if schedule is not None and result["plan"][4] != schedule:
        failures.append(f"{where}: schedule {result['plan'][4]}")
    if schedule is not None and result["stages"] != (2 if schedule == "interleaved1f1b" else 1):
        failures.append(f"{where}: {result['stages']} stages on this rank")
    errors = case_errors(result, reference)
    worst = max(errors, key=errors.get)
    if errors[worst] > RTOL:
        failures.append(f"{where}: {worst} off by {errors[worst]:.2e}")
    if rank == 0 and layout[1] > 1 and not _collectives(result["code"]):
        failures.append(f"{where}: the solver was expected to shard")
    if rank == 0 and layout[1] == 1 and _collectives(result["code"]):
        failures.append(f"{where}: tp=1 code runs tensor-parallel reshards")
    if (options.get("zero") == 3) != result["sliced"]:
        failures.append(f"{where}: parameters stored as dp slices: {result['sliced']}")
    if rank == 0 and options.get("zero") == 3 and "gather_params('dp'" not in result["code"]:
        failures.append(f"{where}: no per-block gather in pm.code")
    if rank == 0 and layout[2] > 1 and "receives" not in result["code"]:
        failures.append(f"{where}: no stage header in pm.code")
    return failures


@pytest.mark.multiprocess
def test_parallelize_matches_single_device_training_on_8_ranks():
    references = {name: reference_run(name) for name in MODELS}
    results = run_local(_parity_worker, WORLD, CASES, timeout_s=600)
    failures = [
        failure
        for rank, per_case in enumerate(results)
        for case, result in zip(CASES, per_case, strict=True)
        for failure in _case_failures(rank, case, result, references[case[0]])
    ]
    for case, result in zip(CASES, results[0], strict=True):
        errors = case_errors(result, references[case[0]])
        print(case, f"{result['seconds']:.1f}s", {k: f"{v:.1e}" for k, v in errors.items()})
    assert not failures, "\n".join(failures)
