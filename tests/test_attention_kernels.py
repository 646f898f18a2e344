"""Attention kernels against their plain-XLA paths (the Pallas kernel in interpret mode on CPU, natively on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import attention, ragged_decode


def _qkv(seed, s=3, h=4, kvh=2, t=256, d=32, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (s, h, d), dtype)
    k = jax.random.normal(k2, (s, kvh, t, d), dtype)
    v = jax.random.normal(k3, (s, kvh, t, d), dtype)
    return q, k, v


def _naive(q, k, v, lengths):
    """Per-slot softmax attention over the first `length` entries, written out in numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s, h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    for i in range(s):
        n = int(lengths[i])
        for j in range(h):
            kk, vv = k[i, j // group, :n], v[i, j // group, :n]
            w = kk @ q[i, j] / np.sqrt(d)
            w = np.exp(w - w.max())
            out[i, j] = (w / w.sum()) @ vv
    return out


def test_decode_xla_matches_naive():
    q, k, v = _qkv(0)
    lengths = jnp.asarray([1, 100, 256])
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls for float32
        out = attention.decode_attention(q, k, v, lengths, impl="xla")
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, lengths), atol=1e-5)


TILINGS = [None, ragged_decode.Tiling(block_k=16, chunk=64), ragged_decode.Tiling(block_k=32, chunk=32, num_warps=2)]


@pytest.mark.parametrize("tiling", TILINGS, ids=["default", "split64", "split32"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 256, 32), (2, 4, 4, 128, 16), (3, 8, 8, 512, 128)])
def test_decode_pallas_matches_xla(shape, tiling):
    """The ragged kernel (interpret mode on CPU, Triton on GPU) against the XLA path, with lengths that end
    inside a block, on a split boundary, and at the full cache. On GPU only 16-bit caches are dispatched to it
    (f32 dots would run in TF32)."""
    s, h, kvh, t, d = shape
    interpret = jax.default_backend() != "gpu"
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)) if interpret else ((jnp.bfloat16, 2e-2),):
        q, k, v = _qkv(1, s, h, kvh, t, d, dtype)
        lengths = np.random.default_rng(s).integers(1, t + 1, size=s)
        lengths[:3] = [t, 64, 1][:s]
        lengths = jnp.asarray(lengths)
        with jax.default_matmul_precision("highest"):
            ref = attention.decode_attention(q, k, v, lengths, impl="xla")
        out = ragged_decode.ragged_decode_attention(q, k, v, lengths, tiling=tiling, interpret=interpret)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol)


def test_decode_pallas_zero_length_slot_gives_zeros():
    q, k, v = _qkv(5, s=2, t=64)
    out = ragged_decode.ragged_decode_attention(q, k, v, jnp.asarray([0, 10]), interpret=jax.default_backend() != "gpu")
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_over_the_first_rows_of_a_bigger_cache(impl):
    """A decode step over the first S rows passes the whole cache (N > S slots); the rest are never read."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3, s=5, t=128))
    q, lengths = q[:2], jnp.asarray([40, 128])
    interpret = jax.default_backend() != "gpu"

    def attend(k, v):
        if impl == "pallas":
            return ragged_decode.ragged_decode_attention(q, k, v, lengths, interpret=interpret)
        return attention.decode_attention(q, k, v, lengths, impl="xla")

    out = np.asarray(attend(k, v), np.float32)
    poisoned = np.asarray(attend(k.at[2:].set(jnp.nan), v.at[2:].set(jnp.nan)), np.float32)
    np.testing.assert_array_equal(out, poisoned)
    np.testing.assert_allclose(out, _naive(q, k[:2], v[:2], lengths), atol=2e-2)


def test_decode_xla_reads_only_the_bucket():
    q, k, v = _qkv(4, t=256)
    lengths = jnp.asarray([10, 64, 100])
    full = attention.decode_attention(q, k, v, lengths, impl="xla")
    bucket = attention.decode_attention(q, k, v, lengths, 128, impl="xla")
    np.testing.assert_allclose(np.asarray(bucket), np.asarray(full), atol=1e-6)


def test_prefill_xla_is_causal_attention():
    b, l, h, kvh, d = 2, 9, 4, 2, 16
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (b, l, h, d))
    k = jax.random.normal(keys[1], (b, l, kvh, d))
    v = jax.random.normal(keys[2], (b, l, kvh, d))
    out = np.asarray(attention.prefill_attention(q, k, v, impl="xla"))
    for t in range(l):  # position t attends to 0..t: decode attention with length t+1 over the prefix
        step = attention.decode_attention(q[:, t], k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.full((b,), t + 1), impl="xla")
        np.testing.assert_allclose(out[:, t], np.asarray(step), atol=1e-5)


def test_prefill_xla_full_attention_is_decode_over_everything():
    """causal=False (the vision tower): every position attends to the whole sequence."""
    b, l, h, d = 2, 7, 4, 16
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (b, l, h, d)) for kk in keys)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls for float32
        out = np.asarray(attention.prefill_attention(q, k, v, causal=False, impl="xla"))
        for t in range(l):
            step = attention.decode_attention(q[:, t], k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.full((b,), l),
                                              impl="xla")
            np.testing.assert_allclose(out[:, t], np.asarray(step), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention exists on GPU only")
@pytest.mark.parametrize("shape,causal", [((2, 128, 8, 2, 64), True), ((5, 577, 16, 16, 64), False)],
                         ids=["prompt-causal", "clip-tiles-full"])
def test_prefill_cudnn_matches_xla(shape, causal):
    b, l, h, kvh, d = shape
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (b, l, n, d), jnp.bfloat16) for kk, n in zip(keys, (h, kvh, kvh)))
    ref = attention.prefill_attention(q, k, v, causal=causal, impl="xla").astype(jnp.float32)
    out = attention.prefill_attention(q, k, v, causal=causal, impl="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-2)
