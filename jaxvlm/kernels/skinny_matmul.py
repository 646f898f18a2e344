"""Skinny matmul in Pallas (Triton on GPU): x [M, K] @ w [K, N] for the few rows of a decode step.

A decode step with few running sequences is a chain of matrix-vector products that must stream every weight
once. The grid is (column block, K split): each program walks its share of K in `block_k` slices, so Triton
pipelines the weight loads (`num_stages` in flight), and the rows are padded to 16 so the products run on
the matrix units (Triton's smallest dot). Only the real rows are stored. With more than one K split, the
partial sums are added in XLA; splits keep the GPU busy when N alone gives too few programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ROWS = 16  # rows per program: the smallest Triton dot, and the most rows this kernel takes


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_n: int = 64  # output columns per program
    block_k: int = 128  # contraction slice per loop iteration
    splits: int = 1  # programs sharing one column block's contraction
    num_warps: int = 4
    num_stages: int = 4
    mma: bool = True  # products on the matrix units (rows padded to 16), else multiply-adds on the CUDA cores


def default_tiling(k: int, n: int) -> Tiling | None:
    """A tiling that divides [K, N], with enough programs to fill an H100's 132 SMs twice; None if none fits."""
    for block_n in (64, 32, 128):
        if n % block_n:
            continue
        splits = 1
        while n // block_n * splits < 264 and k % (2 * splits * 128) == 0:
            splits *= 2
        if k % (splits * 128) == 0:
            return Tiling(block_n=block_n, block_k=128, splits=splits)
    return None


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, rows: int, mma: bool):
    span = x_ref.shape[1]  # this program's share of K

    def body(i, acc):
        offset = pl.multiple_of(i * block_k, block_k)
        w = w_ref[pl.ds(offset, block_k), :]
        if mma:
            return acc + pltriton.dot(x_ref[:, pl.ds(offset, block_k)], w)
        x = x_ref[0, pl.ds(offset, block_k)].astype(jnp.float32)  # one row: [Bk] x [Bk, Bn], summed at the end
        return acc + x[:, None] * w.astype(jnp.float32)

    n = o_ref.shape[1]
    init = jnp.zeros((o_ref.shape[0], n) if mma else (block_k, n), jnp.float32)
    acc = lax.fori_loop(0, span // block_k, body, init)
    if not mma:
        acc = jnp.broadcast_to(acc.sum(axis=0)[None], o_ref.shape)
    real = lax.broadcasted_iota(jnp.int32, (o_ref.shape[0],), 0) < rows  # padding rows are never stored
    pltriton.store(o_ref, acc.astype(o_ref.dtype), mask=real[:, None])


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def skinny_matmul(x: jax.Array, w: jax.Array, *, tiling: Tiling | None = None, out_dtype=None,
                  interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= 16) @ w [K, N] -> [M, N] in `out_dtype` (x's dtype by default), accumulated in f32."""
    m, k = x.shape
    n = w.shape[1]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m > (ROWS if tiling is None or tiling.mma else 1):
        raise ValueError(f"{m} rows exceed the kernel's {ROWS if tiling is None or tiling.mma else 1}")
    tiling = tiling or default_tiling(k, n)
    if tiling is None or n % tiling.block_n or k % (tiling.splits * tiling.block_k):
        raise ValueError(f"[{k}, {n}] does not divide into the kernel's blocks ({tiling})")
    span = k // tiling.splits
    xp = jnp.pad(x.astype(w.dtype), ((0, ROWS - m), (0, 0)))
    partial_dtype = out_dtype if tiling.splits == 1 else jnp.float32
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=tiling.block_k, rows=m, mma=tiling.mma),
        grid=(n // tiling.block_n, tiling.splits),
        in_specs=[
            pl.BlockSpec((ROWS, span), lambda j, s: (0, s)),
            pl.BlockSpec((span, tiling.block_n), lambda j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((None, ROWS, tiling.block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((tiling.splits, ROWS, n), partial_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="skinny_matmul",
    )(xp, w)
    return out[0, :m] if tiling.splits == 1 else out[:, :m].sum(axis=0).astype(out_dtype)
