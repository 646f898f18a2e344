"""Attention kernels: one function per use, each with a plain-XLA path that runs everywhere.

`prefill_attention` is self-attention over whole sequences (causal over a padded prompt chunk, full over an
image's patches); `decode_attention` attends one new query per slot to that slot's filled cache prefix;
`context_attention` attends a prompt chunk that continues a cached prefix (prefix caching) to that prefix and
to itself. On GPU the first two use cuDNN flash attention and the Pallas (Triton) ragged decode kernel; the XLA
paths run everywhere and are the reference the kernels are tested against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxvlm.kernels import ragged_decode


def _platform() -> str:
    return jax.devices()[0].platform


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                      impl: str | None = None) -> jax.Array:
    """Attention over whole sequences. q [B, L, H, D]; k, v [B, L, KVH, D] (H a multiple of KVH) -> [B, L, H, D].

    Causal for prompts, which are right-padded, so causality alone keeps real tokens from seeing padding; full
    (causal=False) for the vision tower's patches.
    """
    impl = impl or ("cudnn" if _platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                    and q.shape[-1] <= 128 else "xla")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    b, l, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, l, kvh, h // kvh, d)
    scores = jnp.einsum("blkgd,bmkd->bkglm", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((l, l), bool)), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, l, h, d).astype(q.dtype)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     kv_len: int | None = None, *, k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                     impl: str | None = None) -> jax.Array:
    """One query per slot. q [S, H, D]; caches [N, KVH, T, D] with N >= S (slots past S are not read); lengths [S]
    (filled prefix, 0 for an idle slot) -> [S, H, D]; an idle slot's row is meaningless. An int8 cache
    (`kv_cache.quantize`) comes with its float32 scales [N, KVH, T]: the key scales multiply the scores and the
    value scales the probabilities, so no dequantized copy of the cache is made.

    On GPU the ragged Pallas kernel reads just each slot's prefix; it is skipped for a single slot, where
    nothing is ragged and XLA's fused read of the bucket measured as fast (5.45 against 5.41-5.43 ms for the
    whole batch-1 step on an H100, across the kernel's tilings). The XLA path reads the first `kv_len` columns
    of every slot (the caller's bucket of the longest length).
    """
    s, h, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    if impl is None:
        impl = ("pallas" if _platform() == "gpu" and s > 1 and ragged_decode.supported(t, q.dtype, k_cache.dtype)
                else "xla")
    if impl == "pallas":
        return ragged_decode.ragged_decode_attention(q, k_cache, v_cache, lengths, k_scale, v_scale)
    kv_len = min(kv_len or t, t)
    k_cache, v_cache = k_cache[:s, :, :kv_len], v_cache[:s, :, :kv_len]
    t = kv_len
    qg = q.reshape(s, kvh, h // kvh, d)
    scores = jnp.einsum("skgd,sktd->skgt", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    if k_scale is not None:
        scores = scores * k_scale[:s, :, None, :t]
    valid = jnp.arange(t)[None, :] < jnp.maximum(lengths, 1)[:, None]  # an idle slot attends to column 0
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:s, :, None, :t]
    values = v_cache.astype(q.dtype)  # int8 converts exactly
    out = jnp.einsum("skgt,sktd->skgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(s, h, d).astype(q.dtype)


def context_attention(q: jax.Array, k_rows: jax.Array, v_rows: jax.Array, starts: jax.Array, *,
                      k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """Prompt chunks that continue cached prefixes. q [B, L, H, D]: query l of row b sits at position
    starts[b] + l and attends to columns 0..starts[b] + l of its cache row; k_rows, v_rows [B, KVH, T, D] are
    those rows, already holding the chunk's own k/v (int8 rows come with their float32 scales [B, KVH, T],
    applied as in `decode_attention`) -> [B, L, H, D].

    XLA only: it materializes [B, H, L, T] scores, which suits the short chunks that prefix caching prefills
    (`prefix_cache.MAX_SUFFIX`).
    """
    b, l, h, d = q.shape
    kvh, t = k_rows.shape[1], k_rows.shape[2]
    qg = q.reshape(b, l, kvh, h // kvh, d)
    scores = jnp.einsum("blkgd,bktd->bkglt", qg, k_rows.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    visible = jnp.arange(t)[None, None, :] <= (starts[:, None] + jnp.arange(l))[:, :, None]  # [B, L, T]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    values = v_rows.astype(q.dtype)
    out = jnp.einsum("bkglt,bktd->blkgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, l, h, d).astype(q.dtype)
