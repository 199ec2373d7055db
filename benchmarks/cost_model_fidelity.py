"""Cost-model fidelity: predicted against measured training steps of pinned plans.

    .venv/bin/python benchmarks/cost_model_fidelity.py                    # 2 and 4 ranks
    .venv/bin/python benchmarks/cost_model_fidelity.py --world-sizes 2 --calibration cal.json

A GPT-2-style model (8 blocks, hidden 256, 8 heads, sequence 128, a vocabulary of
8,192) with a global batch of 16 sequences is planned
on `Mesh.local(N)` with the constants `autopar calibrate` measured (run first unless
`--calibration` names a profile), once per pinned configuration (dp, tp, pp,
microbatches, schedule) and once with nothing pinned (the solver's free choice).
All plans are built in one launch of N gloo ranks and timed round-robin: each round
runs `train_step` plus AdamW's step once per plan, in a rotating order, and a plan's
measured time is its median over the rounds after warm-up. Prints, per world size,
Spearman's rank correlation between predicted and measured steps, the median absolute
relative error, and where the free choice ranks by measurement; writes
docs/cost_model_fidelity.json and the scatter plot docs/cost_model_fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import autopar
from autopar.calibrate import calibrate
from autopar.launch import run_local
from autopar.models import build_model

DOCS = Path(__file__).resolve().parent.parent / "docs"
GLOBAL_BATCH = 16
MODEL = dict(n_layer=8, n_embd=256, n_head=8, vocab_size=8192, n_positions=128)
SEQ = 128
FIXED = dict(recompute="none", zero=0)  # pinned plans vary the layout and the schedule only

PLANS = {
    2: [
        dict(dp=2, microbatches=1),
        dict(dp=2, microbatches=4),
        dict(dp=2, microbatches=8),
        dict(tp=2, microbatches=1),
        dict(tp=2, microbatches=4),
        dict(tp=2, microbatches=1, sequence_parallel=False),
        dict(pp=2, schedule="gpipe", microbatches=2),
        dict(pp=2, schedule="gpipe", microbatches=8),
        dict(pp=2, schedule="1f1b", microbatches=2),
        dict(pp=2, schedule="1f1b", microbatches=4),
        dict(pp=2, schedule="1f1b", microbatches=16),
        dict(pp=2, schedule="interleaved1f1b", microbatches=4),
        dict(pp=2, schedule="interleaved1f1b", microbatches=8),
    ],
    4: [
        dict(dp=4, microbatches=1),
        dict(dp=4, microbatches=4),
        dict(dp=2, tp=2, microbatches=1),
        dict(dp=2, tp=2, microbatches=4),
        dict(tp=4, microbatches=1),
        dict(dp=2, pp=2, schedule="1f1b", microbatches=2),
        dict(dp=2, pp=2, schedule="1f1b", microbatches=4),
        dict(dp=2, pp=2, schedule="gpipe", microbatches=8),
        dict(dp=2, pp=2, schedule="interleaved1f1b", microbatches=4),
        dict(tp=2, pp=2, schedule="1f1b", microbatches=4),
        dict(pp=4, schedule="1f1b", microbatches=4),
        dict(pp=4, schedule="1f1b", microbatches=16),
        dict(pp=4, schedule="gpipe", microbatches=8),
        dict(pp=4, schedule="interleaved1f1b", microbatches=8),
    ],
}


def gpt():
    """The benchmark's model and one global batch of token ids, weights fixed by a seed."""
    torch.manual_seed(0)
    return build_model("gpt2", batch=GLOBAL_BATCH, seq=SEQ, device="cpu", **MODEL)


def next_token_loss(output, ids):
    logits = output.logits[:, :-1].reshape(-1, output.logits.shape[-1])
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))


def label(pins: dict) -> str:
    if not pins:
        return "free choice"
    return " ".join(f"{k}={v}" for k, v in pins.items())


def make_plans(world: int, calibration: str) -> list[dict]:
    """Every pinned plan and the free choice, as plain dicts (the plan and its label)."""
    mesh = autopar.Mesh.local(world, calibration=calibration)
    model, (ids,) = gpt()
    traced = autopar.capture(model, (ids,))
    found = []
    for pins in [*PLANS[world], {}]:
        fixed = {**FIXED, **pins} if pins else {}
        plan = autopar.plan(traced, (ids,), mesh, global_batch_size=GLOBAL_BATCH, **fixed)
        found.append({"label": label(pins), "pins": pins, "plan": plan.to_dict()})
    return found


def _worker(rank, world, plans, calibration, rounds, warmup):
    """Build every plan's module, then time them round-robin; rank 0's medians."""
    mesh = autopar.Mesh.local(world, calibration=calibration)
    model, (ids,) = gpt()
    runs = []
    for entry in plans:
        plan = autopar.Plan.from_dict(entry["plan"])
        pm = autopar.parallelize(model, mesh, (ids,), plan=plan)
        runs.append((pm, torch.optim.AdamW(pm.parameters(), lr=1e-5)))
    samples = [[] for _ in plans]
    for r in range(warmup + rounds):
        for i in range(len(plans)):
            j = (i + r) % len(plans)
            pm, optimizer = runs[j]
            dist.barrier()
            start = time.perf_counter()
            pm.train_step((ids,), ids, next_token_loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            if r >= warmup:
                samples[j].append(time.perf_counter() - start)
    return samples


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def summarize(world: int, plans: list[dict], samples: list[list[float]]) -> dict:
    rows = []
    for entry, times in zip(plans, samples, strict=True):
        plan = entry["plan"]
        measured, predicted = statistics.median(times), plan["cost"]["step_time_s"]
        rows.append({
            "label": entry["label"], "dp": plan["dp"], "tp": plan["tp"], "pp": plan["pp"],
            "microbatches": plan["num_microbatches"], "schedule": plan["schedule"],
            "recompute": plan["recompute"], "zero": plan["zero"],
            "predicted_s": predicted, "measured_s": measured,
            "measured_iqr_s": float(np.subtract(*np.percentile(times, [75, 25]))),
            "relative_error": predicted / measured - 1, "samples_s": times,
        })  # fmt: skip
    pinned = rows[:-1]
    free = rows[-1]
    by_measured = sorted(rows, key=lambda r: r["measured_s"])
    fastest = by_measured[0]
    return {
        "world_size": world,
        "plans": rows,
        "spearman": spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "spearman_pinned": spearman(
            [r["predicted_s"] for r in pinned], [r["measured_s"] for r in pinned]
        ),
        "median_abs_relative_error": statistics.median(abs(r["relative_error"]) for r in rows),
        "free_choice": _describe(free),
        "free_choice_rank": by_measured.index(free) + 1,
        "free_choice_over_fastest": free["measured_s"] / fastest["measured_s"] - 1,
        "fastest": _describe(fastest),
    }


def _describe(row: dict) -> str:
    return f"dp={row['dp']} tp={row['tp']} pp={row['pp']} m={row['microbatches']} {row['schedule']}"


def report(result: dict) -> str:
    lines = [f"\n{result['world_size']} gloo ranks:"]
    lines.append(f"  {'plan':42s} {'predicted':>10s} {'measured':>10s} {'error':>7s}")
    for r in sorted(result["plans"], key=lambda r: r["measured_s"]):
        name = r["label"] if r["label"] != "free choice" else f"free choice ({_describe(r)})"
        lines.append(
            f"  {name:42s} {r['predicted_s'] * 1e3:8.0f} ms {r['measured_s'] * 1e3:8.0f} ms "
            f"{r['relative_error']:+7.1%}"
        )
    lines.append(
        f"  Spearman {result['spearman']:.2f}, median |error| "
        f"{result['median_abs_relative_error']:.1%}; the free choice ({result['free_choice']}) "
        f"ranks {result['free_choice_rank']} of {len(result['plans'])} by measurement, "
        f"{result['free_choice_over_fastest']:+.1%} over the fastest ({result['fastest']})"
    )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rows = result["plans"]
        pred = [r["predicted_s"] * 1e3 for r in rows]
        meas = [r["measured_s"] * 1e3 for r in rows]
        colors = ["tab:red" if r["label"] == "free choice" else "tab:blue" for r in rows]
        ax.scatter(pred, meas, c=colors)
        for r, x, y in zip(rows, pred, meas, strict=True):
            ax.annotate(_describe(r).replace(" tp=1", "").replace(" pp=1", ""), (x, y),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        low, high = min(pred + meas) * 0.9, max(pred + meas) * 1.1
        ax.plot([low, high], [low, high], color="gray", lw=0.8, ls="--")
        ax.set(xlim=(low, high), ylim=(low, high), xlabel="predicted step (ms)",
               ylabel="measured step (ms)",
               title=f"{result['world_size']} gloo ranks: Spearman {result['spearman']:.2f}, "
               f"median |err| {result['median_abs_relative_error']:.0%}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--calibration", help="a profile from `autopar calibrate --out`")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(DOCS / "cost_model_fidelity.json"))
    args = parser.parse_args(argv)
    calibration = args.calibration
    if calibration is None:
        calibration = str(Path(args.out).with_name("cost_model_fidelity.calibration.json"))
        print(f"calibrating 1..{max(args.world_sizes)} ranks into {calibration}", flush=True)
        calibrate(max(args.world_sizes), out_path=calibration)
    results = []
    for world in args.world_sizes:
        start, load = time.perf_counter(), os.getloadavg()[0]
        plans = make_plans(world, calibration)
        samples = run_local(_worker, world, plans, calibration, args.rounds, args.warmup,
                            timeout_s=3600)[0]  # fmt: skip
        result = summarize(world, plans, samples)
        result.update(load_before=load, load_after=os.getloadavg()[0],
                      seconds=time.perf_counter() - start)  # fmt: skip
        results.append(result)
        print(report(result), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"calibration": calibration, "model": MODEL, "seq": SEQ,
                               "global_batch": GLOBAL_BATCH, "results": results}, indent=1))  # fmt: skip
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
