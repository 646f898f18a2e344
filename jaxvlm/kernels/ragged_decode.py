"""Ragged decode attention in Pallas (Triton on GPU): each slot reads only its own filled cache prefix.

One program per (slot, KV head) walks that slot's keys in blocks up to `lengths[slot]` with an online softmax,
so a batch of mixed lengths reads what it holds rather than the longest sequence's length. Scores are
formed by broadcast-multiply-sum instead of a matrix unit dot, which keeps it valid for the 1-4 query heads
per KV head that LLaVA's models have (Triton dots need 16 rows). Works on a bf16 cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NEG = -1e30  # a finite -inf: a fully masked block must not turn the running max into NaN


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, scale: float):
    length = len_ref[0]
    q = q_ref[...].astype(jnp.float32) * scale  # [G, D]
    g, d = q.shape

    def body(i, carry):
        m, l, acc = carry
        start = i * block_k
        k = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)  # [Bk, D]
        v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, Bk]
        valid = (start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < length
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, l, acc

    init = (jnp.full((g,), _NEG, jnp.float32), jnp.zeros((g,), jnp.float32), jnp.zeros((g, d), jnp.float32))
    _, l, acc = lax.fori_loop(0, pl.cdiv(length, block_k), body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def block_size(group: int, head_dim: int, max_len: int) -> int | None:
    """Keys per block: the [group, block, head_dim] product stays within ~8K values per program; None when the
    cache length is not a multiple of it (the caller then uses another path)."""
    block = max(16, min(128, 8192 // (group * head_dim)))
    block = 1 << (block.bit_length() - 1)
    return block if max_len % block == 0 else None


@functools.partial(jax.jit, static_argnames=("interpret",))
def ragged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                            interpret: bool = False) -> jax.Array:
    """q [S, H, D]; caches [S, KVH, T, D]; lengths [S] -> [S, H, D]. Only keys < lengths[s] are read."""
    s, h, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    block_k = block_size(g, d, t)
    if block_k is None:
        raise ValueError(f"cache length {t} is not a multiple of the kernel's key block")
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, scale=1.0 / math.sqrt(d)),
        grid=(s, kvh),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((None, None, g, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, t, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, t, d), lambda i, j: (i, j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, g, d), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((s, kvh, g, d), q.dtype),
        interpret=interpret,
        name="ragged_decode_attention",
    )(lengths.astype(jnp.int32), q.reshape(s, kvh, g, d), k_cache, v_cache)
    return out.reshape(s, h, d)
