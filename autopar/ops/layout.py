"""Index arithmetic of `Shard(dim, groups)`: which slice of a full tensor a rank holds.

With `groups = g` and `n` ranks, dimension `dim` (size D) is cut into g equal
blocks, each block into n equal chunks, and rank r holds chunk r of every block,
concatenated in block order: D / n elements. With g = 1 this is plain chunking.
Viewing the dimension as (g, n, D / (g n)) turns both directions into one
`select` or one `stack`, with no Python loop over blocks.

An ungrouped dim that does not divide by n is padded, as Megatron-LM pads a
vocabulary: each rank holds ceil(D / n) elements and the last ranks' tails are
padding, zeros when a full tensor is cut (`take_chunk`) and dropped when shards are
joined (`join_chunks(..., size=D)`).
"""

from __future__ import annotations

import torch


def _blocked_shape(shape: torch.Size, dim: int, groups: int, num_chunks: int) -> list[int]:
    size = shape[dim]
    if size % (groups * num_chunks) != 0:
        raise ValueError(
            f"dimension {dim} of size {size} does not split into {groups} groups "
            f"x {num_chunks} chunks (shape {tuple(shape)})"
        )
    return [*shape[:dim], groups, num_chunks, size // (groups * num_chunks), *shape[dim + 1 :]]


def padded(size: int, num_chunks: int) -> int:
    """`size` rounded up to a multiple of `num_chunks`: the padded length of a shard."""
    return -(-size // num_chunks) * num_chunks


def pad_to(full: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`full` with zeros appended along `dim` up to `size`."""
    missing = size - full.shape[dim]
    if missing == 0:
        return full
    zeros = full.new_zeros((*full.shape[:dim], missing, *full.shape[dim + 1 :]))
    return torch.cat([full, zeros], dim)


def take_chunk(
    full: torch.Tensor, dim: int, groups: int, index: int, num_chunks: int
) -> torch.Tensor:
    """Chunk `index` of every one of the `groups` blocks of `full` along `dim` (contiguous);
    an ungrouped dim that does not divide is padded with zeros first."""
    dim = dim % full.dim()
    if groups == 1:
        full = pad_to(full, dim, padded(full.shape[dim], num_chunks))
    blocked = full.reshape(_blocked_shape(full.shape, dim, groups, num_chunks))
    return blocked.select(dim + 1, index).flatten(dim, dim + 1).contiguous()


def join_chunks(chunks, dim: int, groups: int, size: int | None = None) -> torch.Tensor:
    """Inverse of `take_chunk` over all indices: rebuild the block-interleaved full tensor,
    `size` long along `dim` (None: the chunks hold no padding)."""
    first = chunks[0]
    dim = dim % first.dim()
    blocked = [c.reshape(_blocked_shape(c.shape, dim, groups, 1)).squeeze(dim + 1) for c in chunks]
    joined = torch.stack(blocked, dim + 1).flatten(dim, dim + 2)
    return joined if size is None else joined.narrow(dim, 0, size)


def dim_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from outermost to innermost in memory (ties broken by index)."""
    return tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))


def with_dim_order(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """`x`'s values, laid out in memory with dimensions `order` from outermost to innermost.

    View nodes of a traced graph were recorded against their producer's strides;
    a tensor that arrives in another layout (from a collective, or from another
    pipeline stage) must be put back in the traced one. No copy if it already is.
    """
    if len(order) != x.dim():
        return x
    inverse = sorted(range(x.dim()), key=order.__getitem__)
    return x.permute(order).contiguous().permute(inverse)
