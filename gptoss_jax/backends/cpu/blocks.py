"""A weight in blocks of 16 rows: how a CPU whose kernels read it so holds the unembedding.

[N, K] is held as [N/16, K, 16]: each block of 16 rows (vocabulary entries) stores its K columns one
after another, 16 values each. The bf16 matvec kernel (cpu_kernels.h, Bf16MatvecBlocks) then loads one
k's 16 weights, widens them once and multiplies them by every row's x[r, k] (outer products in
registers) instead of summing dot products across a vector's lanes; on AVX2 that is where the 16-row
unembedding of batched decoding spends its time (Runtime.unembedding_blocks says when). Works on numpy
and jax arrays alike; in both directions it is a reshape and a transpose, no arithmetic.
"""

from __future__ import annotations

BLOCK = 16


def holds_blocks(vocab_size: int) -> bool:
    """Whether a [vocab_size, K] weight can be held in blocks (whole blocks only)."""
    return vocab_size % BLOCK == 0


def to_blocks(w):
    """[N, K] -> [N/16, K, 16] (N a multiple of 16)."""
    n, k = w.shape
    return w.reshape(n // BLOCK, BLOCK, k).transpose(0, 2, 1)


def from_blocks(w):
    """[N/16, K, 16] -> [N, K]: the inverse of to_blocks."""
    blocks, k, block = w.shape
    return w.transpose(0, 2, 1).reshape(blocks * block, k)
