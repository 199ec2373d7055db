"""The reshard table's three users agree: every entry priced, generated and run on gloo ranks.

For every (source, target, gradient) triple of placements on a 3-d tensor, the test
checks the entry against a hand-written list of the collectives it must use, the
price the solver reads (`cost.comm.reshard_seconds`) against those collectives' times,
the call codegen emits (`codegen.reshard_node`) and, on 2 real gloo ranks, that the
emitted graph turns every rank's local value of a known full tensor into its local
value in the target placement and hands back the gradient in the source's gradient
placement. Partial values are fixed random summands of the full tensor.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx

from autopar.codegen import reshard_node, shard_tensor, unshard
from autopar.cost.comm import reshard_seconds
from autopar.errors import PlanError
from autopar.launch import run_local
from autopar.mesh import Mesh
from autopar.ops import bind_axis, bound_axes, collectives, redistribute
from autopar.ops.layout import join_chunks, take_chunk
from autopar.placement import Partial, Replicate, Shard
from autopar.reshard import gradient_placement, reshard

SHAPE = (6, 4, 12)  # dims divide by 2 ranks x 3 groups
PADDED = (5, 4, 7)  # dims 0 and 2 do not divide by 2 ranks: their shards pad
R, P = Replicate(), Partial()
PLACEMENTS = [R, P, Shard(0), Shard(2), Shard(2, 3)]
UNGROUPED = [R, P, Shard(0), Shard(2)]


def _kind(placement) -> str:
    return type(placement).__name__[0]


# (source, target, gradient) kinds -> (forward collectives, backward collectives); "S'" is
# another shard (dim or grouping), "all_to_all" only between ungrouped shards of two dims.
EXPECTED = {
    ("R", "R", "R"): ([], []),
    ("R", "R", "P"): ([], ["all_reduce"]),  # Megatron's f
    ("R", "S", "S"): ([], ["all_gather"]),
    ("P", "R", "R"): (["all_reduce"], []),  # Megatron's g
    ("P", "R", "P"): (["all_reduce"], ["all_reduce"]),
    ("P", "S", "S"): (["reduce_scatter"], ["all_gather"]),  # sequence parallelism
    ("P", "P", "R"): ([], []),
    ("S", "R", "R"): (["all_gather"], []),
    ("S", "R", "P"): (["all_gather"], ["reduce_scatter"]),  # sequence parallelism
    ("S", "S", "S"): ([], []),
    ("S", "S'", "S'"): (["all_gather"], ["all_gather"]),
    ("S", "S'a2a", "S'a2a"): (["all_to_all"], ["all_to_all"]),
}


def _gradients_of(dst) -> list:
    """The placements a consumer seeing `dst` can hand its gradient back in."""
    return {"R": [R, P], "P": [R], "S": [dst]}[_kind(dst)]


def _triples(placements=PLACEMENTS):
    for src, dst in itertools.product(placements, placements):
        for grad in _gradients_of(dst):
            yield src, dst, grad


def _expected_kind(src, dst) -> str:
    if isinstance(src, Shard) and isinstance(dst, Shard) and src != dst:
        one_dim_each = src.groups == dst.groups == 1 and src.dim != dst.dim
        return "S'a2a" if one_dim_each else "S'"
    return _kind(dst)


def _expected(src, dst, grad):
    """The hand-written entry, or None where the table must refuse."""
    if isinstance(dst, Partial) and not isinstance(src, Partial):
        return None
    key = (_kind(src), _expected_kind(src, dst), _kind(grad))
    if key[1].startswith("S'"):
        key = (key[0], key[1], key[1])
    return EXPECTED[key]


def test_every_entry_matches_the_hand_table_and_its_price():
    mesh = Mesh.preset("a100-80gb")
    nbytes = 6 * 4 * 12 * 2
    checked = 0
    for src, dst, grad in _triples():
        expected, entry = _expected(src, dst, grad), reshard(src, dst, grad)
        if expected is None:
            assert entry is None, (src, dst, grad)
            continue
        forward = [s.kind for phase, s in entry.collectives() if phase == "forward"]
        backward = [s.kind for phase, s in entry.collectives() if phase == "backward"]
        assert (forward, backward) == expected, (src, dst, grad, str(entry))
        priced = reshard_seconds(entry, nbytes, lambda k, b: mesh.tp_collective_time(k, b, 2))
        wanted = sum(mesh.tp_collective_time(k, nbytes, 2) for k in forward + backward)
        assert priced == pytest.approx(wanted) and (priced > 0) == bool(forward + backward)
        checked += 1
    assert checked == 26  # 30 triples; only a Partial value can be seen as Partial


def _graph_for(src, dst, grad, shape=SHAPE) -> fx.GraphModule:
    """What codegen emits for one edge at 2 ranks: placeholder -> reshard -> output."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(shape, device="meta")
    graph.output(reshard_node(graph, x, "tp", src, dst, grad, 2))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_codegen_emits_one_call_per_entry_and_refuses_what_the_table_refuses():
    for src, dst, grad in _triples():
        if reshard(src, dst, grad) is None:
            with pytest.raises(PlanError, match="no collective turns x"):
                _graph_for(src, dst, grad)
            continue
        code = _graph_for(src, dst, grad).code
        if reshard(src, dst, grad).is_identity:
            assert "redistribute" not in code
        else:
            assert f"redistribute(x, 'tp', '{src}', '{dst}', '{grad}')" in code, code
    padded = _graph_for(Shard(0), R, R, PADDED).code  # the gather drops the padding
    assert "redistribute(x, 'tp', 'S(0)', 'R', 'R', [5, 4, 7])" in padded


def _summands(full: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(full.shape, generator=generator) for _ in range(n - 1)]
    return [*parts, full - sum(parts)]


def _local(full: torch.Tensor, placement, rank: int, n: int, seed: int) -> torch.Tensor:
    if isinstance(placement, Partial):
        return _summands(full, n, seed)[rank]
    return shard_tensor(full, placement, rank, n)


def _run_entry(rank: int, n: int, src, dst, grad, shape=SHAPE) -> None:
    generator = torch.Generator().manual_seed(1)
    full = torch.randn(shape, generator=generator)
    full_grad = torch.randn(shape, generator=generator)
    x = _local(full, src, rank, n, seed=2).requires_grad_(True)
    out = _graph_for(src, dst, grad, shape)(x)
    torch.testing.assert_close(out, _local(full, dst, rank, n, seed=2), msg=f"{src}->{dst}")
    out.backward(_local(full_grad, grad, rank, n, seed=3))
    expected_grad = _local(full_grad, gradient_placement(src), rank, n, seed=3)
    torch.testing.assert_close(x.grad, expected_grad, msg=f"{src}->{dst} grad {grad}")


def reshard_worker(rank: int, world_size: int) -> list[str]:
    bind_axis("tp")
    for triple in _triples():
        if reshard(*triple) is not None:
            _run_entry(rank, world_size, *triple)
    for triple in _triples(UNGROUPED):  # padded shards: zeros in, padding dropped out
        if reshard(*triple) is not None:
            _run_entry(rank, world_size, *triple, shape=PADDED)
    # the same again through the fallbacks a backend without native ops would take
    collectives._UNSUPPORTED.update({("gloo", "reduce_scatter"), ("gloo", "all_to_all")})
    for triple in _triples():
        if reshard(*triple) is not None:
            _run_entry(rank, world_size, *triple)
    return sorted(op for _, op in collectives._UNSUPPORTED)


@pytest.mark.multiprocess
def test_every_entry_runs_forward_and_backward_on_two_ranks():
    assert run_local(reshard_worker, 2) == [["all_to_all", "reduce_scatter"]] * 2


# --- the index arithmetic of a shard -----------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("groups", [1, 3])
def test_take_chunk_and_join_chunks_are_inverse(dim, groups):
    full = torch.arange(6 * 12 * 6).reshape(6, 12, 6)
    chunks = [take_chunk(full, dim, groups, r, 2) for r in range(2)]
    assert all(c.is_contiguous() for c in chunks)
    torch.testing.assert_close(join_chunks(chunks, dim, groups), full, rtol=0, atol=0)


def test_groups_interleave_blocks():
    # 3 blocks [0..3], [4..7], [8..11]; rank 1 of 2 holds the second half of each.
    full = torch.arange(12)
    assert take_chunk(full, 0, 3, 1, 2).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_tensor(full, Shard(0, 3), 1, 2).tolist() == [2, 3, 6, 7, 10, 11]


def test_shard_tensor_round_trip_and_errors():
    full = torch.randn(4, 6)
    for placement in (Replicate(), Shard(0), Shard(1, 3), Shard(-1)):
        shards = [shard_tensor(full, placement, r, 2) for r in range(2)]
        torch.testing.assert_close(unshard(shards, placement), full, rtol=0, atol=0)
    with pytest.raises(PlanError, match="Partial"):
        shard_tensor(full, Partial(), 0, 2)


def test_unbound_axis_names_the_fix():
    with pytest.raises(ValueError, match="bind_axis"):
        redistribute(torch.ones(2), "no_such_axis", "P", "R", None)


def test_single_rank_axis_is_identity():
    with bound_axes({"tp": None}):
        x = torch.randn(4, 6, requires_grad=True)
        out = redistribute(redistribute(x, "tp", "R", "R", "P"), "tp", "S(1,g3)", "R", "R")
        out.sum().backward()
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(x.grad, torch.ones(4, 6))
