"""Attention kernels: one function per use, each with a plain-XLA path that runs everywhere.

`prefill_attention` is causal self-attention over a padded prompt chunk; `decode_attention` attends one new
query per slot to that slot's filled cache prefix. On GPU they use cuDNN flash attention and the Pallas
(Triton) ragged decode kernel; the XLA paths are the reference they are tested against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


# The Pallas (Triton) ragged kernel reads only each slot's filled prefix, but its Triton lowering rejects bf16
# queries in jax 0.11 (f32/bf16 dot mismatch); until that is fixed the bucketed XLA path is the default.
DECODE_IMPL = "xla"


def _platform() -> str:
    return jax.devices()[0].platform


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str | None = None) -> jax.Array:
    """Causal attention. q [B, L, H, D]; k, v [B, L, KVH, D] (H a multiple of KVH) -> [B, L, H, D].

    Prompts are right-padded, so causality alone keeps real tokens from seeing padding.
    """
    impl = impl or ("cudnn" if _platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                    and q.shape[-1] <= 128 else "xla")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    b, l, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, l, kvh, h // kvh, d)
    scores = jnp.einsum("blkgd,bmkd->bkglm", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((l, l), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, l, h, d).astype(q.dtype)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     impl: str | None = None) -> jax.Array:
    """One query per slot. q [S, H, D]; caches [S, KVH, T, D]; lengths [S] (filled prefix) -> [S, H, D].

    Only the first `lengths[s]` cache entries of slot s contribute. The XLA path reads all T columns it is
    given, so the caller slices the cache to a length bucket first; the Pallas path stops at each slot's length.
    """
    impl = impl or DECODE_IMPL
    if impl == "pallas":
        return _decode_pallas(q, k_cache, v_cache, lengths)
    s, h, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(s, kvh, h // kvh, d)
    scores = jnp.einsum("skgd,sktd->skgt", qg, k_cache, preferred_element_type=jnp.float32) / math.sqrt(d)
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("skgt,sktd->skgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(s, h, d).astype(q.dtype)


def _decode_pallas(q, k_cache, v_cache, lengths, interpret: bool = False):
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    t = k_cache.shape[2]
    block_k = min(128, t)
    # The kernel wants [S, T, KVH, D] and swaps to heads-major itself; handing it the swapped view of our
    # heads-major cache lets XLA cancel the two transposes instead of copying the cache.
    return pallas_decode.gqa(
        q, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), kv_seq_len=lengths,
        block_k=block_k, k_splits=max(1, min(16, t // block_k)), interpret=interpret,
    )


decode_attention_pallas_interpret = functools.partial(_decode_pallas, interpret=True)
