"""Parity checks on real torch.distributed (gloo) processes.

`check_parity` runs cases through `autopar.launch.run_local` and compares a parallel
module with the single-device model on every rank.
"""

from __future__ import annotations

import torch

from autopar.launch import run_local


def replica_batch(batch: torch.Tensor, pm) -> torch.Tensor:
    """This data-parallel replica's rows of a global batch, as a `DistributedSampler`
    without shuffling deals them (row i to replica i mod dp)."""
    return batch[pm.dp_rank :: pm.dp_size]


# --- parity of a ParallelModule with the single-device model --------------------------------


def check_parity(cases: list, world_size: int, *, timeout_s: float = 300) -> list[list[dict]]:
    """Run every `(model_factory, placements_fn)` case on `world_size` gloo ranks in one spawn.

    `model_factory()` returns `(model, example_inputs)` built deterministically (same
    seed on every rank); `placements_fn(traced, tp_size)` returns the placement map.
    Each rank asserts parity itself; results are per rank, per case (see `parity_case`).
    """
    return run_local(_parity_worker, world_size, cases, timeout_s=timeout_s)


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
    pm.sum_partial_grads()
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
