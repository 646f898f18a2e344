"""Ragged decode attention in Pallas (Triton on GPU): each slot reads only its own filled cache prefix.

Flash-decoding layout: the grid is (slot, KV head, split). Split c of a slot covers cache columns
[c * chunk, (c + 1) * chunk) and walks them in blocks of `block_k` keys, up to the slot's length, with an online
softmax; a split that starts past the length (or a slot of length 0, an idle one) exits at once. Splitting the
sequence keeps the GPU busy when few slots are running. The per-split partial results (unnormalised sums,
running max, denominator) are merged in XLA.

The query heads that share a KV head (1 for LLaVA's MHA models, up to 4 with GQA) fill 16 rows so scores and
the weighted sum run on the matrix units (Triton's dots need 16 rows): a single head is repeated inside the
kernel, a group is zero-padded; only the real rows are stored. Measured on an H100 against a
broadcast-multiply-sum formulation, the dots were 1.3-1.8x faster.

An int8 cache (`kv_cache.py`) is read as int8, converted exactly to the query's dtype for the dots, with its
per-key scales multiplying the scores and the probabilities.
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
_ROWS = 16  # query rows per program: the smallest Triton dot


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_k: int = 64  # keys per loop iteration
    chunk: int = 256  # keys per split (a multiple of block_k)
    num_warps: int = 4
    num_stages: int = 2


def default_tiling(num_slots: int, num_kv_heads: int, max_len: int, cache_dtype=jnp.bfloat16) -> Tiling:
    """Chosen from the H100 sweeps in `benchmarks/kernel_probe.py` and `kv_probe.py` (docs/benchmarks.md): short
    splits while few (slot, head) pairs exist, so that one sequence still spreads over the SMs; long ones when
    the slots alone fill the GPU, which saves partial results and merge work. An int8 cache takes 128-key
    blocks, the bytes of bf16's 64 (a 64-slot step: 11.5 against 12.5 ms with 64-key blocks)."""
    chunk = 1024 if num_slots * num_kv_heads >= 1024 else 256
    while max_len % chunk:
        chunk //= 2
    return Tiling(block_k=min(128 if jnp.dtype(cache_dtype) == jnp.int8 else 64, chunk), chunk=chunk)


def supported(max_len: int, query_dtype, cache_dtype) -> bool:
    """16-bit queries (f32 dots would run in TF32 on the GPU) over a cache of the same dtype or int8, whose
    length splits into 16-key blocks."""
    sixteen = jnp.dtype(query_dtype) in (jnp.bfloat16, jnp.float16)
    return max_len % 16 == 0 and sixteen and jnp.dtype(cache_dtype) in (jnp.dtype(query_dtype), jnp.int8)


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, block_k: int, chunk: int, rows: int, scale: float,
            quantized: bool):
    """refs: (k_scale, v_scale,) for an int8 cache, then the outputs acc, m, l."""
    ks_ref, vs_ref, acc_ref, m_ref, l_ref = refs if quantized else (None, None, *refs)
    start = pl.program_id(2) * chunk
    count = jnp.clip(len_ref[0] - start, 0, chunk)  # this split's filled columns
    q = q_ref[...]  # [16, D], or [1, D] (one query head per KV head), repeated to the dot's 16 rows here
    q = jnp.broadcast_to(q, (_ROWS, q.shape[-1]))

    def body(i, carry):
        m, l, acc = carry
        offset = i * block_k
        k = k_ref[pl.ds(offset, block_k), :].astype(q.dtype)  # [Bk, D]; int8 converts exactly
        v = v_ref[pl.ds(offset, block_k), :].astype(q.dtype)
        s = pltriton.dot(q, k, trans_b=True) * scale  # [16, Bk] f32
        if quantized:  # each key's scale multiplies its scores
            s = s * ks_ref[pl.ds(offset, block_k)][None, :]
        valid = (offset + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < count
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        weights = p * vs_ref[pl.ds(offset, block_k)][None, :] if quantized else p  # and each value's, its weight
        acc = acc * correction[:, None] + pltriton.dot(weights.astype(v.dtype), v)
        return m_new, l, acc

    n, d = q.shape
    init = (jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, pl.cdiv(count, block_k), body, init)
    real = lax.broadcasted_iota(jnp.int32, (n,), 0) < rows  # padding rows are never written back
    pltriton.store(acc_ref, acc, mask=real[:, None])
    pltriton.store(m_ref, m, mask=real)
    pltriton.store(l_ref, l, mask=real)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def ragged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                            k_scale: jax.Array | None = None, v_scale: jax.Array | None = None, *,
                            tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """q [S, H, D]; caches [N, KVH, T, D] with N >= S; lengths [S] -> [S, H, D]. Only keys < lengths[s] of slots
    s < S are read; a slot of length 0 gives zeros. An int8 cache comes with its scales [N, KVH, T]."""
    s, h, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    if g > _ROWS:
        raise ValueError(f"{g} query heads per KV head exceed the kernel's {_ROWS} rows")
    tiling = tiling or default_tiling(s, kvh, t, k_cache.dtype)
    if t % tiling.chunk or tiling.chunk % tiling.block_k:
        raise ValueError(f"cache length {t} is not a multiple of the kernel's split {tiling}")
    splits = t // tiling.chunk
    # One query head per KV head (MHA) is repeated inside the kernel; a group is padded here (an XLA pad of the
    # queries to 16 rows took 1.6% of a 64-slot int8 decode step on an H100).
    q_rows = 1 if g == 1 else _ROWS
    qg = q.reshape(s, kvh, g, d)
    if g > 1:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, _ROWS - g), (0, 0)))
    partial_shape = lambda *tail: jax.ShapeDtypeStruct((s, kvh, splits, _ROWS, *tail), jnp.float32)
    quantized = k_scale is not None
    cache_block = pl.BlockSpec((None, None, tiling.chunk, d), lambda i, j, c: (i, j, c, 0))
    scale_block = pl.BlockSpec((None, None, tiling.chunk), lambda i, j, c: (i, j, c))
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, block_k=tiling.block_k, chunk=tiling.chunk, rows=g, scale=1.0 / math.sqrt(d),
                          quantized=quantized),
        grid=(s, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, c: (i,)),
            pl.BlockSpec((None, None, q_rows, d), lambda i, j, c: (i, j, 0, 0)),
            cache_block,
            cache_block,
            *([scale_block, scale_block] if quantized else []),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, _ROWS, d), lambda i, j, c: (i, j, c, 0, 0)),
            pl.BlockSpec((None, None, None, _ROWS), lambda i, j, c: (i, j, c, 0)),
            pl.BlockSpec((None, None, None, _ROWS), lambda i, j, c: (i, j, c, 0)),
        ],
        out_shape=[partial_shape(d), partial_shape(), partial_shape()],
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="ragged_decode_attention",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache, *([k_scale, v_scale] if quantized else []))
    acc, m, l = acc[..., :g, :], m[..., :g], l[..., :g]
    # Merge the splits: rescale each to the common max, then normalise once.
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # [S, KVH, splits, G]; 0 for empty splits
    denom = jnp.sum(l * weight, axis=2)[..., None]
    out = jnp.sum(acc * weight[..., None], axis=2) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(s, h, d).astype(q.dtype)
