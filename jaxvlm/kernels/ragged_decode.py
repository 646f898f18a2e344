"""Ragged decode attention in Pallas (Triton on GPU): each slot reads only its own filled cache prefix.

Flash-decoding layout: the grid is (slot, KV head, split). Split c of a slot covers cache columns
[c * chunk, (c + 1) * chunk) and walks them in blocks of `block_k` keys up to the slot's length with an online
softmax; a split that starts past the length exits at once. Splitting the sequence is what keeps the GPU busy
at small batch (one slot x 32 heads alone would occupy 32 of an H100's 132 SMs). The per-split partial results
(unnormalised sums, running max, denominator) are merged in XLA, which costs a few KB per slot.

Scores are formed by broadcast-multiply-sum rather than a matrix-unit dot, which keeps the kernel valid for
the 1-4 query heads per KV head that LLaVA's models have (Triton dots need 16 rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NEG = -1e30  # a finite -inf: a fully masked block must not turn the running max into NaN


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_k: int = 64  # keys per loop iteration
    chunk: int = 256  # keys per split (a multiple of block_k)
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = False  # matrix-unit dots with the query rows padded to 16 (Triton's minimum)


def _kernel(len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block_k: int, chunk: int, scale: float,
            dot: bool):
    start = pl.program_id(2) * chunk
    count = jnp.clip(len_ref[0] - start, 0, chunk)  # this split's filled columns
    q = q_ref[...].astype(jnp.float32) * scale  # [G, D]
    g, d = q.shape

    def body(i, carry):
        m, l, acc = carry
        offset = i * block_k
        k = k_ref[pl.ds(offset, block_k), :]  # [Bk, D]
        v = v_ref[pl.ds(offset, block_k), :]
        if dot:
            s = pltriton.dot(q.astype(k.dtype), k, trans_b=True)
        else:
            k, v = k.astype(jnp.float32), v.astype(jnp.float32)
            s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, Bk]
        valid = (offset + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < count
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        pv = pltriton.dot(p.astype(v.dtype), v) if dot else jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        acc = acc * correction[:, None] + pv
        return m_new, l, acc

    init = (jnp.full((g,), _NEG, jnp.float32), jnp.zeros((g,), jnp.float32), jnp.zeros((g, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, pl.cdiv(count, block_k), body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def default_tiling(num_slots: int, max_len: int) -> Tiling:
    """Enough splits that the grid covers the GPU several times over, even for one slot."""
    chunk = 256 if num_slots >= 16 else 128
    while max_len % chunk:
        chunk //= 2
    return Tiling(block_k=min(64, chunk), chunk=chunk)


def supported(max_len: int) -> bool:
    return max_len % 16 == 0


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def ragged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                            tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """q [S, H, D]; caches [S, KVH, T, D]; lengths [S] -> [S, H, D]. Only keys < lengths[s] are read; a slot of
    length 0 gives zeros."""
    s, h, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    tiling = tiling or default_tiling(s, t)
    qg = q.reshape(s, kvh, g, d)
    if tiling.dot:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 16 - g), (0, 0)))
    rows = qg.shape[2]
    if t % tiling.chunk or tiling.chunk % tiling.block_k:
        raise ValueError(f"cache length {t} is not a multiple of the kernel's split {tiling}")
    splits = t // tiling.chunk
    partial_shape = lambda *tail: jax.ShapeDtypeStruct((s, kvh, splits, *tail), jnp.float32)
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, block_k=tiling.block_k, chunk=tiling.chunk, scale=1.0 / math.sqrt(d),
                          dot=tiling.dot),
        grid=(s, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, c: (i,)),
            pl.BlockSpec((None, None, rows, d), lambda i, j, c: (i, j, 0, 0)),
            pl.BlockSpec((None, None, tiling.chunk, d), lambda i, j, c: (i, j, c, 0)),
            pl.BlockSpec((None, None, tiling.chunk, d), lambda i, j, c: (i, j, c, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, c: (i, j, c, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, c: (i, j, c, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, c: (i, j, c, 0)),
        ],
        out_shape=[partial_shape(rows, d), partial_shape(rows), partial_shape(rows)],
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="ragged_decode_attention",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
    acc, m, l = acc[..., :g, :], m[..., :g], l[..., :g]
    # Merge the splits: rescale each to the common max, then normalise once.
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # [S, KVH, splits, G]; 0 for empty splits
    denom = jnp.sum(l * weight, axis=2)[..., None]
    out = jnp.sum(acc * weight[..., None], axis=2) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(s, h, d).astype(q.dtype)
