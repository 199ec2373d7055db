"""Alpha-beta time of one collective over one class of link.

Every collective is priced as

    t = steps(kind, n) * latency + factor(kind, n) * S / B

with `B` the *bus bandwidth* as nccl-tests reports it (NVIDIA/nccl-tests,
doc/PERFORMANCE.md): busbw = algbw * factor, where the factor is chosen so that
busbw is comparable with a link's peak whatever the number of ranks. Turning
that definition round gives the time of an operation of `S` bytes:
`S * factor / busbw`. The factors are nccl-tests', written for S = the full tensor:

| kind           | factor on S | latency steps | S (the `nbytes` argument)   |
|----------------|-------------|---------------|-----------------------------|
| all_reduce     | 2(n-1)/n    | 2(n-1)        | the whole buffer            |
| all_gather     | (n-1)/n     | n-1           | the gathered (full) output  |
| reduce_scatter | (n-1)/n     | n-1           | the full input              |
| all_to_all     | (n-1)/n^2   | n-1           | the full tensor             |
| send_recv      | 1           | 1             | the message                 |

`nbytes` is the full (unsharded) tensor for every kind, so that callers pass
the size they know from the graph. An all-to-all that reshards a tensor
Shard(d) -> Shard(d') moves only (n-1)/n of each rank's S/n bytes, which makes it
n times cheaper than an all-gather of the same tensor: nccl-tests' all-to-all
factor (n-1)/n applies to each rank's buffer, S/n here.

Latency steps follow the ring algorithms: a ring all-reduce is a
reduce-scatter then an all-gather, 2(n-1) steps; the one-phase collectives take
n-1 steps; a point-to-point transfer takes one. This is also the shape of NCCL's
own ring latency model (src/graph/tuning.cc: per-step hardware latency times the
number of ring steps). A group of one rank costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autopar.errors import AutoparError
from autopar.reshard import Reshard

COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def bus_factor(kind: str, num_ranks: int) -> float:
    """nccl-tests' busbw/algbw ratio for `kind` over `num_ranks` ranks."""
    n = num_ranks
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if kind == "all_to_all":
        return (n - 1) / n / n  # the factor applies to each rank's S/n buffer
    if kind == "send_recv":
        return 1.0
    raise _unknown_kind(kind)


def latency_steps(kind: str, num_ranks: int) -> int:
    """Number of sequential message latencies the ring algorithm for `kind` pays."""
    n = num_ranks
    if kind == "all_reduce":
        return 2 * (n - 1)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return n - 1
    if kind == "send_recv":
        return 1
    raise _unknown_kind(kind)


def collective_time(
    kind: str, nbytes: float, num_ranks: int, bandwidth: float, latency: float
) -> float:
    """Seconds for one `kind` collective of `nbytes` (full size) among `num_ranks` ranks.

    `bandwidth` is bus bandwidth in bytes/s, `latency` seconds per ring step.
    """
    if kind not in COLLECTIVE_KINDS:
        raise _unknown_kind(kind)
    if nbytes < 0:
        raise AutoparError(f"collective {kind} of nbytes={nbytes}: sizes cannot be negative")
    if num_ranks < 1:
        raise AutoparError(
            f"collective {kind} among num_ranks={num_ranks}: a group needs at least one rank"
        )
    if kind == "send_recv" and num_ranks > 2:
        raise AutoparError(
            f"send_recv among num_ranks={num_ranks}: a transfer has one sender and one "
            "receiver; price each pair separately"
        )
    if num_ranks == 1:
        return 0.0
    steps = latency_steps(kind, num_ranks)
    return steps * latency + bus_factor(kind, num_ranks) * nbytes / bandwidth


@dataclass(frozen=True)
class CollectiveFit:
    """The alpha-beta constants `autopar calibrate` fitted to one collective kind among
    `num_ranks` ranks of one machine, measured with every such group busy at once."""

    kind: str
    num_ranks: int
    bus_bw: float  # bytes/s
    latency: float  # seconds per latency step

    def seconds(self, nbytes: float) -> float:
        return collective_time(self.kind, nbytes, self.num_ranks, self.bus_bw, self.latency)


def _unknown_kind(kind: str) -> AutoparError:
    return AutoparError(
        f"unknown collective kind {kind!r}; valid kinds: {', '.join(COLLECTIVE_KINDS)}"
    )


def reshard_seconds(entry: Reshard, nbytes: float, price: Callable[[str, float], float]) -> float:
    """Seconds of one reshard table entry on a value of `nbytes` (full size), forward and
    backward; `price(kind, nbytes)` is the collective time on the axis's group."""
    return sum(price(step.kind, nbytes) for _, step in entry.collectives())
