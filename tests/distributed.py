"""Run a function on real torch.distributed (gloo) processes and collect what each returns.

    results = run_distributed(worker, 2, arg)   # worker(rank, world_size, arg) on 2 processes

Workers must be module-level functions (spawn re-imports their module) and
return something picklable. Each run takes a free port, every process gets a
collective timeout, the parent joins with a deadline and kills stragglers, and
raises one `WorkerError` naming every rank that failed (with its traceback text),
died without a result (its exit code) or stayed silent.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its rank and traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, timeout_s, results, worker_fn, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = worker_fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    worker_fn,
    world_size: int,
    *args,
    timeout_s: float = 120,
    failure_grace_s: float = 10,
    collective_timeout_s: float | None = None,
) -> list:
    """Run `worker_fn(rank, world_size, *args)` on `world_size` gloo processes; results by rank.

    `timeout_s` bounds the whole run, `collective_timeout_s` (default: the same) every
    collective. Once a rank fails or dies, the others get `failure_grace_s` more to
    report (they usually fail at once, their peer gone); then one `WorkerError` lists
    every failure, death and silent rank.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(
            target=_entry,
            args=(
                rank,
                world_size,
                port,
                collective_timeout_s or timeout_s,
                results,
                worker_fn,
                args,
            ),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    finished = False
    try:
        values = _collect(results, processes, timeout_s, failure_grace_s)
        finished = True
        return values
    finally:
        _stop(processes, grace_s=10 if finished else 0)


def _collect(results, processes, timeout_s: float, failure_grace_s: float) -> list:
    values: dict[int, object] = {}
    problems: dict[int, str] = {}  # rank -> what went wrong
    deadline = time.monotonic() + timeout_s
    while len(values) + len(problems) < len(processes) and time.monotonic() < deadline:
        had_problems = bool(problems)
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            _note_deaths(processes, values, problems)
        else:
            if ok:
                values[rank] = value
            else:
                problems[rank] = f"rank {rank} failed:\n{value}"
        if problems and not had_problems:
            deadline = min(deadline, time.monotonic() + failure_grace_s)
    if problems or len(values) < len(processes):
        silent = sorted(set(range(len(processes))) - set(values) - set(problems))
        lines = [problems[rank] for rank in sorted(problems)]
        if silent:
            lines.append(f"ranks {silent} gave no result within the time allowed")
        raise WorkerError("\n".join(lines))
    return [values[rank] for rank in range(len(processes))]


def _note_deaths(processes, values, problems) -> None:
    """A process that exited non-zero without a result has died (os._exit, a signal, OOM)."""
    for rank, process in enumerate(processes):
        if rank in values or rank in problems or process.is_alive():
            continue
        if process.exitcode not in (None, 0):
            problems[rank] = f"rank {rank} exited with code {process.exitcode} without a result"


def _stop(processes, grace_s: float) -> None:
    """Join within `grace_s` (0 after a failure: the others may wait in a collective), then kill."""
    for process in processes:
        process.join(timeout=grace_s)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


# --- parity of a ParallelModule with the single-device model --------------------------------


def check_parity(cases: list, world_size: int, *, timeout_s: float = 300) -> list[list[dict]]:
    """Run every `(model_factory, placements_fn)` case on `world_size` gloo ranks in one spawn.

    `model_factory()` returns `(model, example_inputs)` built deterministically (same
    seed on every rank); `placements_fn(traced, tp_size)` returns the placement map.
    Each rank asserts parity itself; results are per rank, per case (see `parity_case`).
    """
    return run_distributed(_parity_worker, world_size, cases, timeout_s=timeout_s)


def _parity_worker(rank: int, world_size: int, cases: list) -> list[dict]:
    return [
        parity_case(rank, world_size, factory, placements_fn) for factory, placements_fn in cases
    ]


def _weights_like(outputs) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(t.shape, generator=generator) for t in outputs]


def _loss(outputs, weights) -> torch.Tensor:
    return sum((t * w).sum() for t, w in zip(outputs, weights, strict=True))


def relative_error(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """max |actual - expected| / max(max |expected|, 1e-2); 0 when both are None."""
    if actual is None or expected is None:
        assert actual is None and expected is None, "a gradient exists on one side only"
        return 0.0
    actual, expected = actual.detach(), expected.detach()
    # Floor: some true values are ~0 (a key bias's gradient through softmax is exactly
    # zero), where relative error compares rounding noise with rounding noise. With
    # rtol 1e-5 the floor amounts to an absolute tolerance of 1e-7.
    scale = expected.abs().max().clamp_min(1e-2)
    return float((actual - expected).abs().max() / scale)


def parity_case(rank: int, world_size: int, factory, placements_fn, rtol: float = 1e-5) -> dict:
    """Forward, backward and state dict of a ParallelModule against the model itself."""
    from torch.utils import _pytree as pytree

    from autopar.capture import capture
    from autopar.runtime import ParallelModule

    model, inputs = factory()
    traced = capture(model, inputs)
    placements = placements_fn(traced, world_size)
    pm = ParallelModule(traced, placements, model, tp_size=world_size, tp_rank=rank)
    expected = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    actual = [t for t in pytree.tree_leaves(pm(*inputs)) if isinstance(t, torch.Tensor)]
    weights = _weights_like(expected)
    _loss(expected, weights).backward()
    _loss(actual, weights).backward()
    errors = {"output": max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))}
    reference = dict(model.named_parameters(remove_duplicate=False))
    for key, grad in pm.full_grads().items():
        errors[key] = relative_error(grad, reference[key].grad)
    state, original = pm.full_state_dict(), model.state_dict()
    assert list(state) == list(original), (list(state), list(original))
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"rank {rank}: {worst} off by {errors[worst]:.2e}"
    return {"errors": errors, "code": pm.code}
