"""autopar's runtime against hand-written PyTorch on the same gloo ranks, side by side.

    .venv/bin/python benchmarks/runtime_overhead.py             # 2 ranks, 12 rounds
    .venv/bin/python benchmarks/runtime_overhead.py --rounds 30

One launch of 2 gloo processes (one thread each) builds every contender on the same
Llama config (4 layers, hidden 256, batch 4 x 128 per replica) and trains them in
interleaved rounds (each round visits each contender in turn: a settling step, then
the timed one, benchmarks/settled.py), so that load on the machine falls on all of
them alike:

- tp=2: `autopar.parallelize(..., tp=2)` (the loss traced with the model) against
  `parallelize_module` with torchtitan's Llama plan (q, k, v, gate, up
  column-parallel; o, down row-parallel; sequence-parallel norms; the LM head
  column-parallel under `loss_parallel`);
- dp=2: `autopar.parallelize(..., dp=2, zero=0)` against `DistributedDataParallel`
  (ZeRO pinned off, as DDP has none: left free the search may pick ZeRO, whose
  reduce-scatter after backward does not overlap with it);
- pp=2: `autopar.parallelize(..., pp=2)` (1F1B, 4 microbatches) against a
  hand-split model run by `PipelineStage` and `Schedule1F1B` with the same split.

A step is forward, backward, gradient sync, AdamW's step and zeroing the gradients,
ending with the loss as a Python float. Setup is the time from the model to a module
ready to train (`parallelize`, or wrapping and splitting by hand), the slowest rank's,
after one untimed `parallelize` (the first call in a process also pays imports and
torch.export's start: reported apart as the cold setup).
Prints median step times (the slowest rank's per round), their ratios and the median
of each round's ratio (steadier when the load drifts), and writes them
to benchmarks/results/runtime_overhead.json. Check `uptime` first: a loaded machine
makes every contender slower, and the ratios noisier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from settled import settle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's autopar, not an installed one
RESULTS = ROOT / "benchmarks" / "results"
WORLD, ROWS, SEQ, MICROBATCHES = 2, 4, 128, 4
LLAMA = dict(
    num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=1024, vocab_size=32000, max_position_embeddings=SEQ,
)  # fmt: skip
PAIRS = (("tp", "autopar tp=2", "parallelize_module"), ("dp", "autopar dp=2", "DDP"),
         ("pp", "autopar pp=2", "pipelining by hand"))  # fmt: skip


def build_llama() -> nn.Module:
    """The same weights on every rank and for every contender."""
    from autopar.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_model("llama2-7b", batch=ROWS, seq=SEQ, device="cpu", **LLAMA)
    return model


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over (B, T, vocab) logits."""
    logits = output.logits if hasattr(output, "logits") else output
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def adamw(parameters) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=1e-4)


# --- contenders: setup() builds, step(ids) trains one step and returns the loss --------------


class Autopar:
    """`autopar.parallelize` with pinned degrees; `traced_loss`: the loss traced with the
    model (then a cross-entropy over vocabulary-sharded logits runs vocabulary-parallel)."""

    def __init__(self, traced_loss: bool = False, **pins):
        self.traced_loss, self.pins = traced_loss, pins

    def setup(self, model: nn.Module, ids: torch.Tensor) -> None:
        import autopar

        mesh = autopar.Mesh.local(WORLD)
        loss = dict(loss_fn=lm_loss, example_target=ids) if self.traced_loss else {}
        self.pm = autopar.parallelize(model, mesh, (ids,), **self.pins, **loss)
        self.optimizer = adamw(self.pm.parameters())

    def step(self, ids: torch.Tensor) -> float:
        loss = self.pm.train_step((ids,), ids, *([] if self.traced_loss else [lm_loss]))
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss


class TensorParallel:
    """torchtitan's Llama layout with `parallelize_module`: Megatron's column- and
    row-parallel matmuls, sequence-parallel norms and residual stream, and the loss
    parallel over the vocabulary (`loss_parallel`). Hugging Face's Llama reads the
    sequence length off its inputs, so values between blocks stay DTensors (global
    shapes) where torchtitan's own model hands on local tensors."""

    def setup(self, model: nn.Module, ids: torch.Tensor) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (WORLD,))
        gather = dict(input_kwarg_layouts={"hidden_states": Shard(1)},
                      desired_input_kwarg_layouts={"hidden_states": Replicate()})  # fmt: skip
        scatter = dict(output_layouts=Shard(1), use_local_output=False)
        block = {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(**gather),
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(**scatter),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(**scatter),
        }  # fmt: skip
        plan = {f"model.layers.{i}.{path}": style for i in range(len(model.model.layers))
                for path, style in block.items()}  # fmt: skip
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), **scatter)
        plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
        self.model = parallelize_module(model, mesh, plan)
        self.optimizer = adamw(self.model.parameters())

    def step(self, ids: torch.Tensor) -> float:
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():
            loss = lm_loss(self.model(ids), ids)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.full_tensor().item()


class DataParallel:
    def setup(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.model = nn.parallel.DistributedDataParallel(model)
        self.optimizer = adamw(self.model.parameters())

    def step(self, ids: torch.Tensor) -> float:
        loss = lm_loss(self.model(ids), ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


class FirstHalf(nn.Module):
    """Embedding and the first blocks of a Hugging Face Llama: ids -> hidden states."""

    def __init__(self, model: nn.Module, blocks: int):
        super().__init__()
        self.model = model.model
        self.model.layers = self.model.layers[:blocks]
        self.model.norm = nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


class SecondHalf(nn.Module):
    """The last blocks, the final norm and the LM head: hidden states -> logits."""

    def __init__(self, model: nn.Module, blocks: int):
        super().__init__()
        self.model, self.lm_head = model.model, model.lm_head
        self.model.layers = self.model.layers[blocks:]
        self.model.embed_tokens = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(inputs_embeds=hidden).last_hidden_state)


class PipelineByHand:
    """Two stages split at the middle block, run by `Schedule1F1B`."""

    def setup(self, model: nn.Module, ids: torch.Tensor) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        self.rank = dist.get_rank()
        half = len(model.model.layers) // 2
        part = FirstHalf(model, half) if self.rank == 0 else SecondHalf(model, half)
        stage = PipelineStage(part, self.rank, WORLD, torch.device("cpu"))
        self.schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=lm_loss)
        self.optimizer = adamw(part.parameters())

    def step(self, ids: torch.Tensor) -> float:
        losses: list[torch.Tensor] = []
        if self.rank == 0:
            self.schedule.step(ids)
        else:
            self.schedule.step(target=ids, losses=losses)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(torch.stack(losses).mean()) if losses else 0.0


def contenders() -> dict[str, object]:
    pp = dict(pp=2, microbatches=MICROBATCHES, schedule="1f1b")
    return {
        "autopar tp=2": Autopar(traced_loss=True, tp=2), "parallelize_module": TensorParallel(),
        "autopar dp=2": Autopar(dp=2, zero=0), "DDP": DataParallel(),
        "autopar pp=2": Autopar(**pp), "pipelining by hand": PipelineByHand(),
    }  # fmt: skip


# --- the launch -----------------------------------------------------------------------------


def _batch(round_: int) -> torch.Tensor:
    """This rank's replica batch: the same for all contenders in a round (dp ranks differ)."""
    generator = torch.Generator().manual_seed(1000 * round_ + dist.get_rank())
    return torch.randint(0, LLAMA["vocab_size"], (ROWS, SEQ), generator=generator)


def worker(rank: int, world_size: int, rounds: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    built = contenders()
    model = build_llama()  # the first call in a process pays imports and torch.export's start
    dist.barrier()
    start = time.perf_counter()
    Autopar(traced_loss=True, tp=2).setup(model, _batch(0))  # the ILP solver's start too
    cold = time.perf_counter() - start
    setup = {}
    for name, contender in built.items():
        model = build_llama()
        dist.barrier()
        start = time.perf_counter()
        contender.setup(model, _batch(0))
        setup[name] = time.perf_counter() - start
    steps: dict[str, list[float]] = {name: [] for name in built}
    for round_ in range(warmup + rounds):
        ids = _batch(round_)
        for name, contender in built.items():
            settle(lambda contender=contender, ids=ids: contender.step(ids))
            dist.barrier()
            start = time.perf_counter()
            contender.step(ids)
            if round_ >= warmup:
                steps[name].append(time.perf_counter() - start)
    return {"setup": setup, "cold_setup": cold, "steps": steps}


def summarize(per_rank: list[dict]) -> dict:
    """The slowest rank per round, then the median over rounds; ratios per pair."""
    names = list(per_rank[0]["steps"])
    step = {
        name: statistics.median(
            max(times) for times in zip(*(r["steps"][name] for r in per_rank), strict=True)
        )
        for name in names
    }
    setup = {name: max(r["setup"][name] for r in per_rank) for name in names}
    ratios = {axis: step[ours] / step[theirs] for axis, ours, theirs in PAIRS}
    slowest = {name: [max(t) for t in zip(*(r["steps"][name] for r in per_rank), strict=True)]
               for name in names}  # fmt: skip
    paired = {  # each round's ratio (the two ran back to back), then the median: load that
        axis: statistics.median(a / b for a, b in zip(slowest[ours], slowest[theirs], strict=False))
        for axis, ours, theirs in PAIRS  # drifts between rounds cancels out
    }
    cold = max(r["cold_setup"] for r in per_rank)
    return {"step_s": step, "setup_s": setup, "cold_setup_s": cold, "ratios": ratios,
            "paired_ratios": paired}  # fmt: skip


def table(summary: dict) -> str:
    lines = [f"{'':22s} {'step ms':>9s} {'setup s':>8s}   {'ratio':>5s} {'paired':>6s}"]
    for axis, ours, theirs in PAIRS:
        for name in (ours, theirs):
            ratio = f"{summary['ratios'][axis]:5.2f}" if name == ours else ""
            paired = f"{summary['paired_ratios'][axis]:6.2f}" if name == ours else ""
            lines.append(
                f"{name:22s} {summary['step_s'][name] * 1e3:9.1f} "
                f"{summary['setup_s'][name]:8.2f}   {ratio:>5s} {paired:>6s}"
            )
    lines.append("ratio: median step over median step; paired: median of each round's ratio")
    lines.append(
        f"(the first parallelize in a process, tp=2, untimed above: {summary['cold_setup_s']:.2f} s, "
        "imports and torch.export's first call included)"
    )
    return "\n".join(lines)


def _uptime() -> str:
    """`uptime`'s line (the load averages): a loaded machine slows every contender."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    from autopar.launch import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--out", default=str(RESULTS / "runtime_overhead.json"))
    args = parser.parse_args(argv)
    before = _uptime()
    print(f"uptime: {before}", flush=True)
    per_rank = run_local(worker, WORLD, args.rounds, args.warmup, timeout_s=3600)
    summary = summarize(per_rank)
    print(table(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "uptime_before": before, "uptime_after": _uptime()}  # fmt: skip
    record = {"machine": meta, "rounds": args.rounds, "model": LLAMA, "batch": [ROWS, SEQ],
              **summary, "per_rank": per_rank}  # fmt: skip
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
