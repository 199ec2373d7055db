"""`autopar.parallelize`: how it is called, what it refuses, and what happens when a rank dies.

Parity over every (dp, tp, pp) layout is in test_pipeline_parity.py; here one spawn
of 2 processes walks the API's paths (given plan, plan made on rank 0, tracing again
at the microbatch size, misuse), and another shows that a rank dying mid-step makes
the others fail quickly with a clear error instead of hanging.
"""

from __future__ import annotations

import os

import conftest
import pytest
import torch
import torch.distributed as dist
from distributed import relative_error
from test_pipeline_parity import free_comm_mesh, lm_loss

import autopar
from autopar.errors import AutoparError
from autopar.launch import LaunchError, run_local
from autopar.normalize import MAY_VANISH_NAMES
from autopar.ops.layout import dim_order, with_dim_order
from autopar.runtime.pipeline import check_stage_ranks


def small_gpt2(batch: int = 4, n_layer: int = 2):
    return conftest.tiny_gpt2(n_layer=n_layer, n_head=4, batch=batch)


def _error(fn) -> str:
    """The message of the AutoparError `fn()` raises ('' if it raises none)."""
    try:
        fn()
    except AutoparError as error:
        return f"{type(error).__name__}: {error}"
    return ""


# --- without processes ---------------------------------------------------------------------


def test_parallelize_needs_a_process_group():
    assert not dist.is_initialized()
    model, inputs = small_gpt2()
    with pytest.raises(AutoparError, match="torchrun.*init_process_group"):
        autopar.parallelize(model, free_comm_mesh(2), inputs)


def test_with_dim_order_restores_a_traced_layout():
    traced = torch.empty(2, 3, 4, 5).transpose(1, 2)  # (2, 4, 3, 5) laid out as (2, 3, 4, 5)
    value = torch.randn(2, 4, 3, 5)
    laid_out = with_dim_order(value, dim_order(traced))
    assert laid_out.stride() == traced.stride()
    assert torch.equal(laid_out, value)
    assert with_dim_order(value, dim_order(value)).data_ptr() == value.data_ptr()  # no copy


def test_stage_placement_must_follow_the_pipelining_order():
    from types import SimpleNamespace as NS

    stages = [NS(index=0, pp_rank=0), NS(index=1, pp_rank=0)]  # not k % pp
    plan = NS(stages=stages, pp=2, schedule="gpipe")
    with pytest.raises(AutoparError, match="stage 1 on pp rank 0"):
        check_stage_ranks(plan)
    plan = NS(stages=[NS(index=k, pp_rank=k % 2) for k in range(4)], pp=2, schedule="1f1b")
    with pytest.raises(AutoparError, match="one stage per pipeline rank"):
        check_stage_ranks(plan)


# --- two processes -------------------------------------------------------------------------


@pytest.mark.parametrize("build", [small_gpt2, conftest.tiny_llama, conftest.tiny_bert])
def test_a_plan_follows_the_model_to_another_batch_size(build):
    """Planned at 4 rows run at 1, and planned at 1 run at 4: export leaves out the view
    ops that do nothing at batch 1, yet every computation keeps its stable name."""
    from autopar.capture import capture
    from autopar.codegen import shard_graph
    from autopar.runtime.pipeline import split_plan_stages
    from autopar.runtime.retrace import plan_for

    model, (ids,) = build(batch=4)
    four, one = capture(model, (ids,)), capture(model, (ids[:1],))
    names = {
        size: {n.name for n in t.graph_module.graph.nodes} for size, t in ((4, four), (1, one))
    }
    assert names[1] <= names[4]
    assert all(four.analysis.nodes[n].target in MAY_VANISH_NAMES for n in names[4] - names[1])
    for made, run in ((four, one), (one, four)):
        plan = autopar.plan(made, None, free_comm_mesh(2), tp=2, pp=1)
        moved = plan_for(plan, run.graph_module.graph)
        present = {node.name for node in run.graph_module.graph.nodes}
        assert set(moved.strategies) <= present and set(moved.stages[0].nodes) <= present
        graph = shard_graph(run, moved.node_placements(), 2)  # the placements fit the graph
        assert len(split_plan_stages(graph, moved, run)) == 1


def _api_worker(rank: int, world_size: int, plan_path: str, other_plan_path: str) -> dict:
    model, (ids,) = small_gpt2(batch=4)
    mesh = free_comm_mesh(2)
    plan = autopar.Plan.load(plan_path)
    found = {
        "wrong world": _error(lambda: autopar.parallelize(model, free_comm_mesh(4), (ids,))),
        "plan and pins": _error(lambda: autopar.parallelize(model, mesh, (ids,), plan, pp=2)),
        "other model": _error(
            lambda: autopar.parallelize(model, mesh, (ids,), autopar.Plan.load(other_plan_path))
        ),
        "bad pin": _error(lambda: autopar.parallelize(model, mesh, (ids,), tp=3)),
    }
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    expected = lm_loss(model(batch), batch)
    expected.backward()
    expected = expected.item()
    # a given plan, made at the example batch (4 rows), run at its microbatch size (1 row:
    # export drops the no-op expands of the mask, so the runtime's graph has fewer nodes)
    pm = autopar.parallelize(model, mesh, (ids,), plan).eval().train()  # nn.Module modes work
    found["given plan loss"] = abs(pm.train_step(batch, batch, lm_loss) - expected) / expected
    reference = dict(model.named_parameters(remove_duplicate=False))
    found["grads"] = max(
        relative_error(grad, reference[key].grad) for key, grad in pm.full_grads().items()
    )
    found["rows"] = _error(lambda: pm.train_step(batch[:2], batch[:2], lm_loss))
    with torch.no_grad():
        found["logits"] = relative_error(pm(batch).logits, model(batch).logits)
    found["code"] = pm.code
    # planned on rank 0 (tp over both ranks), one microbatch
    pm = autopar.parallelize(model, mesh, (ids,), tp=2)
    found["planned loss"] = abs(pm.train_step((batch,), batch, lm_loss) - expected) / expected
    found["planned layout"] = (pm.plan.dp, pm.plan.tp, pm.plan.pp)
    found["bert"] = _bert_errors(mesh, batch)
    return found


def _bert_errors(mesh, batch: torch.Tensor) -> dict[str, float]:
    """BERT in two stages: two outputs, the last stage passes one through unchanged."""
    model, (ids,) = conftest.tiny_bert(n_layer=2, batch=2)
    pm = autopar.parallelize(model, mesh, (ids,), pp=2, microbatches=2, global_batch_size=4)

    def loss_fn(output, target):
        return output.last_hidden_state.square().mean()

    loss = pm.train_step(batch, batch, loss_fn)
    expected = loss_fn(model(batch), batch)
    expected.backward()
    reference = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        output, expected_output = pm(batch), model(batch)
    return {
        "loss": abs(loss - expected.item()) / expected.item(),
        "grads": max(relative_error(g, reference[k].grad) for k, g in pm.full_grads().items()),
        "pooler": relative_error(output.pooler_output, expected_output.pooler_output),
    }


@pytest.mark.multiprocess
def test_parallelize_paths_and_misuse_on_two_ranks(tmp_path):
    model, (ids,) = small_gpt2(batch=4)
    plan = autopar.plan(model, (ids,), free_comm_mesh(2), pp=2, microbatch_size=1, schedule="1f1b")
    assert (plan.pp, plan.num_microbatches, plan.microbatch_size) == (2, 4, 1)
    plan.save(tmp_path / "plan.json")
    other_model, (other_ids,) = small_gpt2(batch=4, n_layer=1)
    autopar.plan(other_model, (other_ids,), free_comm_mesh(2), pp=2).save(tmp_path / "other.json")
    results = run_local(
        _api_worker, 2, str(tmp_path / "plan.json"), str(tmp_path / "other.json"), timeout_s=180
    )
    for rank, found in enumerate(results):
        assert "world size 2" in found["wrong world"] and "world_size=4" in found["wrong world"]
        assert "pass one or the other" in found["plan and pins"]
        assert (
            found["other model"].startswith("PlanError")
            and "different model" in found["other model"]
        )
        assert "tp=3" in found["bad pin"], found["bad pin"]  # rank 0's error, on every rank
        assert found["given plan loss"] <= 1e-5 and found["grads"] <= 1e-5, rank
        assert "pass this replica's batch of 4 rows" in found["rows"]
        assert found["logits"] <= 1e-5, rank  # every rank gets the whole output
        assert f"stage {rank} of 2 on pp rank {rank}" in found["code"]
        assert found["planned layout"] == (1, 2, 1)
        assert found["planned loss"] <= 1e-5, rank
        assert max(found["bert"].values()) <= 1e-5, (rank, found["bert"])


def _dying_worker(rank: int, world_size: int) -> str:
    model, (ids,) = small_gpt2(batch=2)
    mesh = free_comm_mesh(2)
    pm = autopar.parallelize(model, mesh, (ids,), pp=2, microbatches=2, global_batch_size=4)

    def loss_fn(output, target):
        if rank == 1:  # the last stage computes the loss: die in the middle of the step
            os._exit(1)
        return lm_loss(output, target)

    batch = torch.randint(0, 128, (4, 16))
    pm.train_step(batch, batch, loss_fn)
    return "finished"


@pytest.mark.multiprocess
def test_a_dead_rank_makes_the_others_fail_quickly():
    with pytest.raises(LaunchError) as caught:
        # collectives give up after 20 s; the others get 30 s after the death to report
        run_local(_dying_worker, 2, timeout_s=120, failure_grace_s=30, collective_timeout_s=20)
    message = str(caught.value)
    assert "rank 1 exited with code 1 without a result" in message
    assert "rank 0 failed" in message, message  # it raised within the grace; it did not hang
    assert "autopar: train_step on rank 0" in message and "another rank" in message
