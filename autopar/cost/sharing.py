"""Ranks that share cores: a pipeline's idle ranks hand theirs to the busy ones.

When a node runs more ranks than it has cores (`Mesh.local(4)` on 2 cores), the
device rates are those measured with every rank busy at once. A pipeline rank
waiting in its bubble blocks in a receive and uses no core, so the ranks still
working run faster, by up to `Mesh.idle_speedup` (the measured rate with as many
ranks as cores over the rate with all of them busy). Two bounds then hold, in the
manner of a roofline:

- the schedule's critical path, run at the faster rate:  critical_s / idle_speedup;
- the cores' work: every rank's busy time at the all-busy rate, shared out evenly, so
  the mean busy time over the ranks (the cores never idle while work is left).

The step is the larger of the two. With a core per rank (speedup 1) it is the critical
path; with pure data or tensor parallelism (every rank busy throughout) the busy time
equals the critical path and nothing changes.
"""

from __future__ import annotations


def shared_core_seconds(critical_s: float, mean_busy_s: float, idle_speedup: float) -> float:
    """The step of a schedule whose critical path takes `critical_s` and whose ranks are
    busy `mean_busy_s` on average, both at the all-busy rate."""
    if idle_speedup <= 1:
        return critical_s
    return max(critical_s / idle_speedup, min(mean_busy_s, critical_s))


def core_share(ranks: int, cores: int) -> float:
    """The fraction of a core each of `ranks` busy ranks gets from `cores` (the OS
    shares them out evenly): a calibrated rate per CPU second times this is the rate
    per wall second."""
    return min(1.0, max(cores, 1) / max(ranks, 1))
