"""Autograd collectives on real gloo processes against single-process references.

Every rank builds the same full tensors from a fixed seed, so the expected
forward value and input gradient of each op follow from the layout arithmetic
(`take_chunk`) alone, with no communication.
"""

from __future__ import annotations

import pytest
import torch

from autopar.codegen.params import shard_tensor, unshard
from autopar.errors import PlanError
from autopar.launch import run_local
from autopar.placement import Partial, Replicate, Shard
from autopar.runtime import collectives as C
from autopar.runtime.layout import join_chunks, take_chunk

SHAPE = (6, 4, 12)  # dims divide by 2 ranks x 3 groups


def _full(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _assert_equal(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


def _check_all_gather(rank, n, dim, groups) -> None:
    full, grad = _full(1), _full(2)
    x = _leaf(take_chunk(full, dim, groups, rank, n))
    out = C.all_gather(x, dim, groups, "tp")
    _assert_equal(out, full)
    out.backward(grad)
    _assert_equal(x.grad, take_chunk(grad, dim, groups, rank, n))


def _check_shard_local(rank, n, dim, groups) -> None:
    full, grad = _full(3), _full(4)
    x = _leaf(full)
    out = C.shard_local(x, dim, groups, "tp")
    _assert_equal(out, take_chunk(full, dim, groups, rank, n))
    out.backward(take_chunk(grad, dim, groups, rank, n))
    _assert_equal(x.grad, grad)


def _check_reduce_scatter(rank, n, dim, groups) -> None:
    summands, grad = [_full(10 + r) for r in range(n)], _full(5)
    x = _leaf(summands[rank])
    out = C.reduce_scatter(x, dim, groups, "tp")
    torch.testing.assert_close(out, take_chunk(sum(summands), dim, groups, rank, n))
    out.backward(take_chunk(grad, dim, groups, rank, n))
    _assert_equal(x.grad, grad)


def _check_all_reduce(rank, n) -> None:
    summands, grad = [_full(20 + r) for r in range(n)], _full(6)
    x = _leaf(summands[rank])
    out = C.all_reduce(x, "tp")
    torch.testing.assert_close(out, sum(summands))
    out.backward(grad)
    _assert_equal(x.grad, grad)
    _assert_equal(x, summands[rank])  # the input is not reduced in place


def _check_copy_to_parallel(rank, n) -> None:
    full, grads = _full(7), [_full(30 + r) for r in range(n)]
    x = _leaf(full)
    out = C.copy_to_parallel(x, "tp")
    _assert_equal(out, full)
    out.backward(grads[rank])
    torch.testing.assert_close(x.grad, sum(grads))


def _check_all_to_all(rank, n, gather_dim, scatter_dim) -> None:
    full, grad = _full(8), _full(9)
    x = _leaf(take_chunk(full, gather_dim, 1, rank, n))
    out = C.all_to_all(x, gather_dim, scatter_dim, "tp")
    _assert_equal(out, take_chunk(full, scatter_dim, 1, rank, n))
    out.backward(take_chunk(grad, scatter_dim, 1, rank, n))
    _assert_equal(x.grad, take_chunk(grad, gather_dim, 1, rank, n))


def _check_every_op(rank: int, n: int) -> None:
    for dim in (0, 2, -1):
        for groups in (1, 3):
            _check_all_gather(rank, n, dim, groups)
            _check_shard_local(rank, n, dim, groups)
            _check_reduce_scatter(rank, n, dim, groups)
    _check_all_reduce(rank, n)
    _check_copy_to_parallel(rank, n)
    _check_all_to_all(rank, n, 0, 2)
    _check_all_to_all(rank, n, 2, 1)


def collectives_worker(rank: int, world_size: int) -> list[str]:
    C.bind_axis("tp")
    _check_every_op(rank, world_size)
    # Same checks through the fallbacks a backend without native ops would take.
    C._UNSUPPORTED.update({("gloo", "reduce_scatter"), ("gloo", "all_to_all")})
    _check_every_op(rank, world_size)
    return sorted(op for _, op in C._UNSUPPORTED)


@pytest.mark.multiprocess
def test_collectives_forward_and_backward_on_two_ranks():
    assert run_local(collectives_worker, 2) == [["all_to_all", "reduce_scatter"]] * 2


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("groups", [1, 3])
def test_take_chunk_and_join_chunks_are_inverse(dim, groups):
    full = torch.arange(6 * 12 * 6).reshape(6, 12, 6)
    chunks = [take_chunk(full, dim, groups, r, 2) for r in range(2)]
    assert all(c.is_contiguous() for c in chunks)
    _assert_equal(join_chunks(chunks, dim, groups), full)


def test_groups_interleave_blocks():
    # 3 blocks [0..3], [4..7], [8..11]; rank 1 of 2 holds the second half of each.
    full = torch.arange(12)
    assert take_chunk(full, 0, 3, 1, 2).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_tensor(full, Shard(0, 3), 1, 2).tolist() == [2, 3, 6, 7, 10, 11]


def test_shard_tensor_round_trip_and_errors():
    full = torch.randn(4, 6)
    for placement in (Replicate(), Shard(0), Shard(1, 3), Shard(-1)):
        shards = [shard_tensor(full, placement, r, 2) for r in range(2)]
        _assert_equal(unshard(shards, placement), full)
    with pytest.raises(PlanError, match="Partial"):
        shard_tensor(full, Partial(), 0, 2)


def test_unbound_axis_names_the_fix():
    with pytest.raises(ValueError, match="bind_axis"):
        C.all_reduce(torch.ones(2), "no_such_axis")


def test_single_rank_axis_is_identity():
    with C.bound_axes({"tp": None}):
        x = _leaf(torch.randn(4, 6))
        out = C.all_gather(C.copy_to_parallel(x, "tp"), 1, 3, "tp")
        out.sum().backward()
    _assert_equal(out, x)
    _assert_equal(x.grad, torch.ones(4, 6))
