"""How well one matmul's shape fills a GPU: its share of the device's matmul peak.

A GPU computes a product C = A @ B (A is m x k, B is k x n) in output tiles of
`tile` x `tile` elements, one per thread block, each stepping through k (NVIDIA,
"Matrix Multiplication Background User's Guide", sections on tile quantization).
Two effects of the shape follow, and only these are modeled:

- tile quantization: the last row and column of tiles are partly idle when m or n is
  not a multiple of the tile, so a 96-wide head dim runs 128-wide tiles at 3/4;
- the k loop's fill: a thread block's software pipeline loads `fill` elements of k
  before its first multiply and drains after the last, so a product with an inner dim
  of k sustains k / (k + fill) of a long one (a 768-wide row-parallel shard runs ~10%
  below a 6144-wide one).

`DeviceSpec.matmul_efficiency` is what a large, aligned product sustains; the GPU
presets set `matmul_tile` and `matmul_fill` (`autopar/mesh.py`, sources in
docs/cost-model.md). Devices with `matmul_tile` 1 (CPU ranks, whose rates
`autopar calibrate` measures on the model's own shapes) run every shape at the flat
efficiency. Training runs each forward product's two backward products too, whose
shapes are the forward's with the dims rotated: dA = dC @ B^T is (m, n) @ (n, k), dB =
A^T @ dC is (k, m) @ (m, n); all three do the same FLOPs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from autopar.cost.memory import ATTENTION_CORE
from autopar.placement import Shard

if TYPE_CHECKING:
    from autopar.mesh import DeviceSpec

Product = tuple[int, int, int]  # (m, n, k) of one A @ B, batch dims folded into m

_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.matmul.default,
    torch.ops.aten.bmm.default,
}


def local_products(node: fx.Node, inputs, tp: int) -> tuple[Product, ...]:
    """The matmul products `node` runs on one rank whose inputs are placed as `inputs`
    (one placement per `node.all_input_nodes`); () for a node that is not a matmul."""
    if node.target not in _MATMULS and node.target not in ATTENTION_CORE:
        return ()
    shapes = [
        _local_shape(arg, placement, tp)
        for arg, placement in zip(node.all_input_nodes, inputs, strict=True)
    ]
    if any(shape is None for shape in shapes) or len(shapes) < 2:
        return ()
    if node.target in ATTENTION_CORE:  # scores = q @ k^T, then scores @ v, per batch and head
        (*_, seq_q, head), (*_, seq_kv, _d) = shapes[0], shapes[1]
        return ((seq_q, seq_kv, head), (seq_q, shapes[2][-1], seq_kv))
    a, b = shapes[0], shapes[1]
    if len(a) < 2 or len(b) < 2:
        return ()
    return ((math.prod(a[:-1]), b[-1], a[-1]),)


def _local_shape(arg: fx.Node, placement, tp: int) -> list[int] | None:
    value = arg.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    shape = list(value.shape)
    if isinstance(placement, Shard) and shape:
        dim = placement.dim % len(shape)
        shape[dim] = math.ceil(shape[dim] / tp)
    return shape


def product_efficiency(product: Product, device: DeviceSpec) -> float:
    """Share of peak one (m, n, k) product sustains on `device`."""
    m, n, k = product
    tile = device.matmul_tile
    if tile <= 1 or min(product) <= 0:
        return device.matmul_efficiency
    quantized = (m / (math.ceil(m / tile) * tile)) * (n / (math.ceil(n / tile) * tile))
    return device.matmul_efficiency * quantized * k / (k + device.matmul_fill)


def efficiency(products: tuple[Product, ...], device: DeviceSpec, *, training: bool) -> float:
    """The share of peak at which a node running `products` (equal FLOPs each, as a
    product and its backward products do) does its arithmetic: the harmonic mean, as
    the products run one after another."""
    if not products:
        return device.matmul_efficiency
    if training:  # each product's two backward products: its dims rotated
        products = tuple(p for m, n, k in products for p in ((m, n, k), (m, k, n), (k, n, m)))
    return len(products) / sum(1 / product_efficiency(p, device) for p in products)
