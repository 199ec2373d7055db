"""What one rank's compute costs: the constants of the roofline in cost/compute.py.

Measured on the ops a transformer runs, as the generated code calls them (ATen
operator overloads, one thread per rank on CPU):

- per-node overhead: a chain of tiny ops (elementwise, views, transposes) through
  autograd, forward and then backward, per op. This is what a graph node costs whatever
  its size, and it dominates the small ops of a small model.
- matmul rate: the forward and both backward products of a transformer block's
  matmuls (tokens x hidden against hidden x 3 hidden, x 4 hidden, 4 hidden x hidden)
  at a few (tokens, hidden) sizes, with the per-node overhead taken off each call.
- memory bandwidth: the elementwise and normalization ops of a block (add, scale,
  tanh, pow, softmax, layer norm) on activation-sized tensors, bytes read plus
  written, the overhead again taken off.
- the loss: a next-token cross-entropy (`logits[:, :-1]` against the ids shifted by
  one, as a causal LM's training loop computes it) forward and backward on logits of a
  few sizes, seconds per byte of logits. Its tensors are the largest of a step, and
  their cost per byte grows with their size (on a 2-core VM 0.6-1.0 ms/MiB up to 16
  MiB, 1.9-2.8 at 64 MiB: memory the allocator hands back to the OS comes back as fresh
  pages),
  which no bandwidth measured on small tensors predicts (cost/loss.py).
- the optimizer: torch.optim's AdamW stepping fp32 parameters of a block's sizes, as
  bytes per second of `FP32_OPTIMIZER_BYTES_PER_PARAM` a parameter. Its updates run in
  place (`lerp_`, `addcmul_`, `addcdiv_`): on one core of a 2-core VM AdamW stepped
  the fidelity model's 8.4M parameters at 34 GB/s (8 of 1M: 33.5, 32 of 256K: 38)
  against the 11 GB/s of the out-of-place ops above, which priced it at 63 ms.

Operands come cold: each suite cycles through copies of its inputs filling
`ComputeSizes.cold_bytes`, several times a core's L2 cache, as a training step's
activations were written long before the op that reads them (one set of warm inputs
made the elementwise rate a third faster than the model's ops run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from autopar.calibrate.timing import suite_seconds
from autopar.cost.compute import FP32_OPTIMIZER_BYTES_PER_PARAM
from autopar.cost.overheads import OPTIMIZER_CALLS_PER_PARAM

aten = torch.ops.aten


@dataclass(frozen=True)
class ComputeSizes:
    matmul_sizes: tuple[tuple[int, int], ...] = ((512, 256), (128, 512))  # (tokens, hidden)
    elementwise_numel: int = 2**20
    cold_bytes: int = 32 * 2**20  # the inputs cycled through, per suite
    overhead_chain: int = 64
    # logits sizes: 32 MiB, glibc's largest mmap threshold, is the last its heap reuses
    loss_bytes: tuple[int, ...] = (4 * 2**20, 16 * 2**20, 32 * 2**20, 64 * 2**20)
    optimizer_params: int = 8  # parameters stepped together: 128 MiB of weights,
    optimizer_param_numel: int = 2**20  # grads and states
    window_s: float = 0.5
    windows: int = 3


def measure_compute(sizes: ComputeSizes, device: torch.device, dtype: torch.dtype) -> dict:
    """This rank's per-node overheads, matmul FLOP/s and memory bytes/s."""
    forward, backward = _overheads(sizes, device, dtype)
    rates = []
    for items, amounts in (_matmuls(sizes, device, dtype), _elementwise(sizes, device, dtype)):
        seconds = suite_seconds(items, sizes.window_s, sizes.windows, device)
        rates.append(sum(amounts) / max(seconds - len(items) * forward, 1e-9))
    matmul, bandwidth = rates
    return {
        "matmul_flops": matmul,
        "memory_bandwidth": bandwidth,
        "op_overhead_s": forward,
        "backward_op_overhead_s": backward,
        "loss_seconds_per_byte": _loss(sizes, device, dtype),
        "optimizer_bandwidth": _optimizer(sizes, device, forward),
    }


LOSS_VOCAB = 32768  # a vocabulary's width of row; sizes set the rows
# Sequences the rows are cut into: with more than one, `logits[:, :-1]` is not contiguous
# and the loss copies it (and its backward the gradient back), as a training batch does.
# One sequence of 64 MiB measured 15-25% below the step's own loss on logits that size.
LOSS_SEQUENCES = 4


def _loss(sizes: ComputeSizes, device, dtype) -> list[list[float]]:
    """[logits bytes, seconds per byte] of a next-token cross-entropy over a batch of
    `LOSS_SEQUENCES` sequences, forward and backward, at each of `sizes.loss_bytes`."""
    width = torch.tensor([], dtype=dtype).element_size()
    found = []
    for nbytes in sizes.loss_bytes:
        rows = max(nbytes // (LOSS_VOCAB * width * LOSS_SEQUENCES), 2)  # per sequence
        shape = (LOSS_SEQUENCES, rows, LOSS_VOCAB)
        logits = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, LOSS_VOCAB, shape[:2], device=device)

        def forward_and_backward(logits=logits, ids=ids) -> None:
            shifted = logits[:, :-1].reshape(-1, LOSS_VOCAB)
            torch.nn.functional.cross_entropy(shifted, ids[:, 1:].reshape(-1)).backward()
            logits.grad = None

        seconds = suite_seconds([forward_and_backward], sizes.window_s, sizes.windows, device)
        found.append([float(logits.numel() * width), seconds / (logits.numel() * width)])
    return found


def _optimizer(sizes: ComputeSizes, device, overhead_s: float) -> float:
    """Bytes/s of AdamW's step over fp32 parameters (the master weights under mixed
    precision too), each call's per-node overhead taken off (cost/overheads.py)."""
    params = [
        torch.nn.Parameter(torch.randn(sizes.optimizer_param_numel, device=device))
        for _ in range(sizes.optimizer_params)
    ]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-5)  # its first step makes the states
    seconds = suite_seconds([optimizer.step], sizes.window_s, sizes.windows, device)
    calls = len(params) * OPTIMIZER_CALLS_PER_PARAM * overhead_s
    moved = len(params) * sizes.optimizer_param_numel * FP32_OPTIMIZER_BYTES_PER_PARAM
    return moved / max(seconds - calls, 1e-9)


def _overheads(sizes: ComputeSizes, device, dtype) -> tuple[float, float]:
    """Seconds per node of a chain of tiny ops: forward (recording autograd), backward."""
    x = torch.ones(4, 4, device=device, dtype=dtype, requires_grad=True)
    steps = (
        lambda t: aten.mul.Tensor(t, 1.0001),
        lambda t: aten.view.default(t, [16]),
        lambda t: aten.add.Tensor(t, 1.0),
        lambda t: aten.view.default(t, [4, 4]),
        lambda t: aten.transpose.int(t, 0, 1),
        lambda t: aten.transpose.int(t, 0, 1),  # contiguous again for the next view
    )
    length = sizes.overhead_chain

    def chain() -> torch.Tensor:
        y = x
        for i in range(length):
            y = steps[i % len(steps)](y)
        return y

    def forward_and_backward() -> None:
        chain().sum().backward()

    fwd, both = (suite_seconds([f], sizes.window_s, sizes.windows, device)
                 for f in (chain, forward_and_backward))  # fmt: skip
    return fwd / length, max(both - fwd, 0.0) / length


def _matmuls(sizes: ComputeSizes, device, dtype) -> tuple[list[Callable], list[float]]:
    """A block's matmuls forward (X W) and backward (dY W^T, X^T dY) at each size."""
    width = torch.tensor([], dtype=dtype).element_size()
    shapes = [
        (tokens, k, n)
        for tokens, hidden in sizes.matmul_sizes
        for k, n in ((hidden, 3 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden))
    ]
    once = sum((t * k + k * n + t * n) * width for t, k, n in shapes)
    items, flops = [], []
    for tokens, k, n in shapes * _copies(sizes.cold_bytes, once):
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        w = torch.randn(k, n, device=device, dtype=dtype)
        dy = torch.randn(tokens, n, device=device, dtype=dtype)
        items += [
            lambda x=x, w=w: aten.mm.default(x, w),
            lambda dy=dy, w=w: aten.mm.default(dy, w.t()),
            lambda x=x, dy=dy: aten.mm.default(x.t(), dy),
        ]
        flops += [2.0 * tokens * k * n] * 3
    return items, flops


def _elementwise(sizes: ComputeSizes, device, dtype) -> tuple[list[Callable], list[float]]:
    """A block's memory-bound ops on activation-sized tensors, and the bytes each moves."""
    numel, width = sizes.elementwise_numel, torch.tensor([], dtype=dtype).element_size()
    items, nbytes = [], []
    for _ in range(_copies(sizes.cold_bytes, 2 * numel * width)):
        a = torch.randn(numel // 256, 256, device=device, dtype=dtype)
        b = torch.randn_like(a)
        weight, bias = torch.ones(256, device=device, dtype=dtype), torch.zeros_like(a[0])
        ops = (
            (lambda a=a, b=b: aten.add.Tensor(a, b), 3),
            (lambda a=a, b=b: aten.mul.Tensor(a, b), 3),
            (lambda a=a: aten.mul.Tensor(a, 0.5), 2),
            (lambda a=a: aten.tanh.default(a), 2),
            (lambda a=a: aten.pow.Tensor_Scalar(a, 3.0), 2),
            (lambda a=a: aten._softmax.default(a, -1, False), 2),
            (lambda a=a, w=weight, c=bias: aten.native_layer_norm.default(a, [256], w, c, 1e-5), 2),
        )
        items += [op for op, _ in ops]
        nbytes += [float(tensors * numel * width) for _, tensors in ops]
    return items, nbytes


def _copies(cold_bytes: int, one_set_bytes: int) -> int:
    """How many copies of a suite's inputs fill `cold_bytes` (at least one)."""
    return max(1, -(-cold_bytes // max(one_set_bytes, 1)))
