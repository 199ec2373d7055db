"""Cost-model fidelity: predicted against measured training steps of pinned plans.

    .venv/bin/python benchmarks/cost_model_fidelity.py                    # 2 and 4 ranks
    .venv/bin/python benchmarks/cost_model_fidelity.py --world-sizes 2 --calibration cal.json

A GPT-2-style model (8 blocks, hidden 256, 8 heads, sequence 128, a vocabulary of
8,192) with a global batch of 16 sequences is planned
on `Mesh.local(N)` with the constants `autopar calibrate` measured (run first unless
`--calibration` names a profile), once per pinned configuration (dp, tp, pp,
microbatches, schedule) and once with nothing pinned (the solver's free choice).
All plans are built in one launch of N gloo ranks and timed round-robin: each round
visits every plan once, in a rotating order, and runs `train_step` plus AdamW's step
twice in a row, timing the second (benchmarks/settled.py says why); a plan's measured
time is its median over the rounds after warm-up. Before each step every rank
runs a short burst of matmuls (the load probe): its wall time over its CPU time says
how much of the cores the ranks got just then, and the "load-adjusted" figures scale
each step by the share expected with our ranks alone (1 / core_share) over the one
probed, so that other processes' load on a shared machine is reported apart from
the model's error (both are printed and kept). Prints, per world size,
Spearman's rank correlation between predicted and measured steps, the median absolute
relative error, and where the free choice ranks by measurement; writes
docs/cost_model_fidelity.json and the scatter plot docs/cost_model_fidelity.png.

    .venv/bin/python benchmarks/cost_model_fidelity.py --reprice docs/cost_model_fidelity.json
    .venv/bin/python benchmarks/cost_model_fidelity.py --compare cal1.json cal2.json

`--reprice` keeps a run's measurements and predicts them again (the calibration
named, or the run's): a change to the cost model is judged without timing again. If
the free choice then differs from the one measured, the plan measured with its
layout stands in, or the summary says that it was not measured. `--compare` prints
how far two calibrations' predictions of the same plans lie apart (repeatability).
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
from settled import settle

import autopar
from autopar.calibrate import calibrate
from autopar.cost.sharing import core_share
from autopar.errors import AutoparError
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
        dict(tp=2, microbatches=1, sequence_parallel=True),
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


def layout(plan: dict) -> tuple:
    """What makes two plans run alike: degrees, microbatches, schedule and memory choices."""
    keys = ("dp", "tp", "pp", "num_microbatches", "schedule", "recompute", "zero",
            "sequence_parallel")  # fmt: skip
    return tuple(plan[k] for k in keys)


PROBE_MATMULS = 24  # about 10 ms of one core's work


def _probe(a: torch.Tensor) -> float:
    """How much slower than its CPU time a fixed burst of matmuls ran, all ranks at once:
    1 on an idle core, 1 / core_share with our ranks sharing the cores, more when other
    processes of the machine took a part of them."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(PROBE_MATMULS):
        torch.mm(a, a)
    return (time.perf_counter() - wall) / max(time.process_time() - cpu, 1e-6)


def _worker(rank, world, plans, calibration, rounds, warmup):
    """Build every plan's module, then time them round-robin, each timed step after
    settling steps and a load probe; rank 0's step times and probes."""
    mesh = autopar.Mesh.local(world, calibration=calibration)
    model, (ids,) = gpt()
    runs = []
    for entry in plans:
        plan = autopar.Plan.from_dict(entry["plan"])
        pm = autopar.parallelize(model, mesh, (ids,), plan=plan)
        runs.append((pm, torch.optim.AdamW(pm.parameters(), lr=1e-5)))
    samples, probes, a = [[] for _ in plans], [[] for _ in plans], torch.randn(256, 512)
    a = a @ a.t()
    for r in range(warmup + rounds):
        for i in range(len(plans)):
            j = (i + r) % len(plans)
            pm, optimizer = runs[j]
            mine = ids[pm.dp_rank :: pm.dp_size]  # this replica's rows of the global batch
            settle(lambda pm=pm, optimizer=optimizer, mine=mine: _step(pm, optimizer, mine))
            slowdown = _probe(a[:, :256].contiguous())
            dist.barrier()
            start = time.perf_counter()
            _step(pm, optimizer, mine)
            dist.barrier()
            if r >= warmup:
                samples[j].append(time.perf_counter() - start)
                probes[j].append(slowdown)
    return samples, probes


def _step(pm, optimizer, ids: torch.Tensor) -> None:
    pm.train_step((ids,), ids, next_token_loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def summarize(world: int, plans: list[dict], measured: list, expected: float) -> dict:
    """Rows and figures; `measured[i]` holds plan i's step times and load probes (None:
    not measured). A step's load-adjusted time is its measured one times `expected` (the
    probe's slowdown with our ranks alone on the machine: 1 / core_share) over the
    probe's slowdown just before it."""
    if measured[-1] is None:  # a re-priced free choice nobody measured
        return _unmeasured(world, plans, measured, expected)
    rows = [_row(entry, m, expected) for entry, m in zip(plans, measured, strict=True)]
    result = {"world_size": world, "expected_probe_slowdown": expected, "plans": rows}
    for key, suffix in (("measured_s", ""), ("adjusted_s", "_adjusted")):
        result |= {f"{name}{suffix}": v for name, v in _figures(rows, key).items()}
    return result


def _row(entry: dict, measured: dict, expected: float) -> dict:
    plan, times, probes = entry["plan"], measured["samples_s"], measured["probe_slowdown"]
    adjusted = statistics.median(t * expected / p for t, p in zip(times, probes, strict=True))
    predicted = plan["cost"]["step_time_s"]
    return {
        "label": entry["label"], "dp": plan["dp"], "tp": plan["tp"], "pp": plan["pp"],
        "microbatches": plan["num_microbatches"], "schedule": plan["schedule"],
        "recompute": plan["recompute"], "zero": plan["zero"],
        "sequence_parallel": plan["sequence_parallel"], "predicted_s": predicted,
        "measured_s": statistics.median(times), "adjusted_s": adjusted,
        "measured_iqr_s": float(np.subtract(*np.percentile(times, [75, 25]))),
        "relative_error": predicted / statistics.median(times) - 1,
        "adjusted_relative_error": predicted / adjusted - 1,
        "samples_s": times, "probe_slowdown": probes, "layout": list(layout(plan)),
    }  # fmt: skip


def _figures(rows: list[dict], key: str) -> dict:
    """Spearman, median |error| and the free choice's standing, by `key` (raw or adjusted)."""
    free = rows[-1]
    by_measured = sorted(rows, key=lambda r: r[key])
    fastest = by_measured[0]
    predicted, times = [r["predicted_s"] for r in rows], [r[key] for r in rows]
    return {
        "spearman": spearman(predicted, times),
        "spearman_pinned": spearman(predicted[:-1], times[:-1]),
        "median_abs_relative_error": statistics.median(
            abs(p / t - 1) for p, t in zip(predicted, times, strict=True)
        ),
        "free_choice": _describe(free),
        "free_choice_rank": by_measured.index(free) + 1,
        "free_choice_over_fastest": free[key] / fastest[key] - 1,
        "fastest": _describe(fastest),
        "distinct_plans": len({tuple(r["layout"]) for r in rows}),
    }


def _unmeasured(world, plans, measured, expected) -> dict:
    """The summary of the pinned plans alone, when the free choice was not measured."""
    result = summarize(world, plans[:-1] + [plans[-2]], measured[:-1] + [measured[-2]], expected)
    result["plans"] = result["plans"][:-1]
    for suffix in ("", "_adjusted"):
        result[f"free_choice{suffix}"] = f"{label_of(plans[-1]['plan'])} (not measured)"
        result[f"free_choice_rank{suffix}"] = result[f"free_choice_over_fastest{suffix}"] = None
    return result


def label_of(plan: dict) -> str:
    return (f"dp={plan['dp']} tp={plan['tp']} pp={plan['pp']} m={plan['num_microbatches']} "
            f"{plan['schedule']}")  # fmt: skip


CALIBRATION_NAME = "cost_model_fidelity.calibration.json"  # kept next to the run's JSON


def run_calibration(run: dict, run_path: Path) -> str:
    """The calibration a saved run was predicted with: the path it records (a relative one
    from the run's folder), else the file of that name next to the run's JSON (a run
    recorded in another checkout names a path of that checkout), else AutoparError."""
    recorded = Path(run["calibration"])
    beside = run_path.parent / recorded.name
    for candidate in (run_path.parent / recorded, beside):  # an absolute path stays itself
        if candidate.is_file():
            return str(candidate)
    raise AutoparError(
        f"the run {run_path} was predicted with the calibration {recorded}, which does not "
        f"exist, and there is no {recorded.name} next to it ({beside}); pass `--calibration "
        "CAL.json` (a profile from `autopar calibrate --out CAL.json`)"
    )


def reprice(run: dict, calibration: str) -> list[dict]:
    """A run's measurements against the predictions of `calibration`."""
    results = []
    for old in run["results"]:
        world, rows = old["world_size"], old["plans"]
        plans = make_plans(world, calibration)
        measured = [{k: r[k] for k in ("samples_s", "probe_slowdown")} for r in rows]
        by_layout = {tuple(r["layout"]): m for r, m in zip(rows, measured, strict=True)}
        measured[-1] = by_layout.get(layout(plans[-1]["plan"]))
        result = summarize(world, plans, measured, old["expected_probe_slowdown"])
        result.update({k: old[k] for k in ("load_before", "load_after", "seconds") if k in old})
        results.append(result)
    return results


def compare(first: str, second: str, worlds) -> str:
    """How far two calibrations' predictions of the benchmark's plans lie apart."""
    lines = []
    for world in worlds:
        a, b = (make_plans(world, c) for c in (first, second))
        gaps = [y["plan"]["cost"]["step_time_s"] / x["plan"]["cost"]["step_time_s"] - 1
                for x, y in zip(a[:-1], b[:-1], strict=True)]  # fmt: skip
        lines.append(f"{world} ranks: predictions of {len(gaps)} pinned plans differ by a median "
                     f"{statistics.median(abs(g) for g in gaps):.1%}, at most "
                     f"{max(abs(g) for g in gaps):.1%}; free choice {label_of(a[-1]['plan'])} "
                     f"and {label_of(b[-1]['plan'])}")  # fmt: skip
    return "\n".join(lines)


def _describe(row: dict) -> str:
    return f"dp={row['dp']} tp={row['tp']} pp={row['pp']} m={row['microbatches']} {row['schedule']}"


def report(result: dict) -> str:
    lines = [f"\n{result['world_size']} gloo ranks:"]
    lines.append(f"  {'plan':48s} {'predicted':>10s} {'measured':>10s} {'error':>7s} "
                 f"{'adjusted':>10s} {'error':>7s}")  # fmt: skip
    for r in sorted(result["plans"], key=lambda r: r["adjusted_s"]):
        name = r["label"] if r["label"] != "free choice" else f"free choice ({_describe(r)})"
        lines.append(
            f"  {name:48s} {r['predicted_s'] * 1e3:8.0f} ms {r['measured_s'] * 1e3:8.0f} ms "
            f"{r['relative_error']:+7.1%} {r['adjusted_s'] * 1e3:8.0f} ms "
            f"{r['adjusted_relative_error']:+7.1%}"
        )
    for suffix, what in (("", "measured"), ("_adjusted", "load-adjusted")):
        over = result[f"free_choice_over_fastest{suffix}"]
        lines.append(
            f"  {what}: Spearman {result['spearman' + suffix]:.2f}, median |error| "
            f"{result['median_abs_relative_error' + suffix]:.1%}; the free choice "
            f"({result['free_choice' + suffix]}) ranks {result['free_choice_rank' + suffix]} of "
            f"{len(result['plans'])}, "
            + (f"{over:+.1%} over" if over is not None else "against")
            + f" the fastest ({result['fastest' + suffix]})"
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
        raw = [r["measured_s"] * 1e3 for r in rows]
        meas = [r["adjusted_s"] * 1e3 for r in rows]
        colors = ["tab:red" if r["label"] == "free choice" else "tab:blue" for r in rows]
        ax.scatter(pred, raw, marker="x", c="gray", s=14, label="measured")
        ax.scatter(pred, meas, c=colors, label="load-adjusted (red: free choice)")
        ax.legend(fontsize=7, loc="upper left")
        for r, x, y in zip(rows, pred, meas, strict=True):
            ax.annotate(_describe(r).replace(" tp=1", "").replace(" pp=1", ""), (x, y),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        low, high = min(pred + meas + raw) * 0.9, max(pred + meas + raw) * 1.1
        ax.plot([low, high], [low, high], color="gray", lw=0.8, ls="--")
        ax.set(
            xlim=(low, high),
            ylim=(low, high),
            xlabel="predicted step (ms)",
            ylabel="measured step (ms)",
            title=f"{result['world_size']} gloo ranks, adjusted: Spearman "
            f"{result['spearman_adjusted']:.2f}, median |err| "
            f"{result['median_abs_relative_error_adjusted']:.0%}\nmeasured: Spearman "
            f"{result['spearman']:.2f}, median |err| {result['median_abs_relative_error']:.0%}",
        )
    # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--calibration", help="a profile from `autopar calibrate --out`")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(DOCS / "cost_model_fidelity.json"))
    parser.add_argument("--reprice", metavar="RUN.json", help="predict a run's measurements again")
    parser.add_argument("--compare", nargs=2, metavar="CAL.json", help="two calibrations' gap")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare, args.world_sizes))
        return 0
    if args.reprice:
        run = json.loads(Path(args.reprice).read_text())
        try:
            calibration = args.calibration or run_calibration(run, Path(args.reprice))
        except AutoparError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        results = reprice(run, calibration)
        for result in results:
            print(report(result))
        _write(Path(args.out), run | {"calibration": calibration, "results": results})
        return 0
    calibration = args.calibration
    if calibration is None:
        calibration = str(Path(args.out).with_name(CALIBRATION_NAME))
        print(f"calibrating 1..{max(args.world_sizes)} ranks into {calibration}", flush=True)
        calibrate(max(args.world_sizes), out_path=calibration)
    results = []
    for world in args.world_sizes:
        start, load = time.perf_counter(), os.getloadavg()[0]
        plans = make_plans(world, calibration)
        samples, probes = run_local(_worker, world, plans, calibration, args.rounds,
                                    args.warmup, timeout_s=3600)[0]  # fmt: skip
        measured = [{"samples_s": t, "probe_slowdown": p}
                    for t, p in zip(samples, probes, strict=True)]  # fmt: skip
        cores = len(os.sched_getaffinity(0))
        result = summarize(world, plans, measured, 1 / core_share(world, cores))
        result.update(load_before=load, load_after=os.getloadavg()[0],
                      seconds=time.perf_counter() - start)  # fmt: skip
        results.append(result)
        print(report(result), flush=True)
    _write(Path(args.out), {"calibration": calibration, "model": MODEL, "seq": SEQ,
                            "global_batch": GLOBAL_BATCH, "results": results})  # fmt: skip
    return 0


def _write(out: Path, run: dict) -> None:
    """The run as JSON, its calibration named relative to the JSON where it lies beside it."""
    calibration = Path(run["calibration"]).resolve()
    if calibration.parent == out.resolve().parent:
        run = run | {"calibration": calibration.name}
    out.write_text(json.dumps(run, indent=1))
    plot(run["results"], out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
