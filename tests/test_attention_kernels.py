"""Attention kernels against their plain-XLA paths (the Pallas kernel in interpret mode on CPU, natively on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import kv_cache
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


# ----------------------------------------------------------------------------------- int8 cache (quant_policy=8)


def test_quantize_round_trip():
    x = jax.random.normal(jax.random.key(7), (3, 2, 50, 64), jnp.float32) * 3
    x = x.at[0, 0, 0].set(0.0)  # an all-zero vector stays zero (no division by a zero scale)
    values, scales = kv_cache.quantize(x)
    assert values.dtype == jnp.int8 and scales.shape == x.shape[:-1]
    assert int(jnp.abs(values.astype(jnp.int32)).max()) == 127
    back = np.asarray(values, np.float32) * np.asarray(scales)[..., None]
    # round to nearest: each element within half a step of its vector's scale
    assert np.all(np.abs(back - np.asarray(x)) <= np.asarray(scales)[..., None] / 2 + 1e-6)
    assert np.all(back[0, 0, 0] == 0)


def _int8_cache(k, v):
    (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
    dequantized = lambda q, s: q.astype(jnp.float32) * s[..., None]
    return kq, vq, ks, vs, dequantized(kq, ks), dequantized(vq, vs)


def test_decode_int8_xla_is_attention_over_the_dequantized_cache():
    """Scales applied to the scores and the probabilities equal attention over the dequantized cache."""
    q, k, v = _qkv(8)
    kq, vq, ks, vs, k_deq, v_deq = _int8_cache(k, v)
    lengths = jnp.asarray([1, 100, 256])
    with jax.default_matmul_precision("highest"):
        out = attention.decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, impl="xla")
    np.testing.assert_allclose(np.asarray(out), _naive(q, k_deq, v_deq, lengths), atol=1e-5)
    # and the int8 error against the unquantized cache stays at the quantization step's scale
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, lengths), atol=0.05)


@pytest.mark.parametrize("tiling", TILINGS, ids=["default", "split64", "split32"])
def test_decode_int8_pallas_matches_xla(tiling):
    """The ragged kernel over an int8 cache (bf16 queries) against the XLA path, including an idle slot."""
    q, k, v = _qkv(9, s=4, h=8, kvh=4, t=256, d=64)
    q = q.astype(jnp.bfloat16)
    kq, vq, ks, vs, _, _ = _int8_cache(k, v)
    lengths = jnp.asarray([256, 64, 1, 0])
    ref = attention.decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, impl="xla")
    out = ragged_decode.ragged_decode_attention(q, kq, vq, lengths, ks, vs, tiling=tiling,
                                                interpret=jax.default_backend() != "gpu")
    np.testing.assert_allclose(np.asarray(out[:3], np.float32), np.asarray(ref[:3], np.float32), atol=2e-2)
    assert np.all(np.asarray(out[3], np.float32) == 0)


def test_cache_writes_quantize_and_keep_other_slots():
    """write_prompt / write_tokens on an int8 cache store quantized values and scales in place."""
    from jaxvlm.model_config import TextConfig

    cfg = TextConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=64)
    layer = kv_cache.init_cache(cfg, 3, 16, jnp.int8)[0]
    assert layer.quantized and layer.k.dtype == jnp.int8 and layer.k_scale.shape == (3, 2, 16)
    k = jax.random.normal(jax.random.key(1), (1, 2, 5, 8))
    layer = layer.write_prompt(jnp.int32(1), k, -k)
    kq, ks = kv_cache.quantize(k[0])
    np.testing.assert_array_equal(np.asarray(layer.k[1, :, :5]), np.asarray(kq))
    np.testing.assert_array_equal(np.asarray(layer.v[1, :, :5]), -np.asarray(kq))
    np.testing.assert_array_equal(np.asarray(layer.k_scale[1, :, :5]), np.asarray(ks))
    token = jax.random.normal(jax.random.key(2), (2, 2, 8))
    layer = layer.write_tokens(jnp.asarray([3, 5]), token, token)
    tq, ts = kv_cache.quantize(token)
    np.testing.assert_array_equal(np.asarray(layer.k[0, :, 3]), np.asarray(tq[0]))
    np.testing.assert_array_equal(np.asarray(layer.k[1, :, 5]), np.asarray(tq[1]))
    np.testing.assert_array_equal(np.asarray(layer.v_scale[1, :, 5]), np.asarray(ts[1]))
    np.testing.assert_array_equal(np.asarray(layer.k[1, :, :5]), np.asarray(kq))  # the prompt is untouched
    assert not np.any(np.asarray(layer.k[2]))  # and so is the third slot
    expected = 2 * 1 * 2 * (8 + 4)  # k and v, one layer, two heads: 8 int8 values and a float32 scale each
    assert kv_cache.bytes_per_token(cfg, jnp.int8) == expected
    assert kv_cache.bytes_per_token(cfg, jnp.bfloat16) == 2 * 1 * 2 * 8 * 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_one_slot_token_write_matches_the_many_slot_write(dtype):
    """One running slot writes by slice update, more by scatter: the same slot-0 token lands the same way, and
    nothing else in the cache changes."""
    from jaxvlm.model_config import TextConfig

    cfg = TextConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=64)
    layer = kv_cache.init_cache(cfg, 2, 16, dtype)[0]
    layer = jax.tree.map(lambda a: jax.random.normal(jax.random.key(0), a.shape).astype(a.dtype), layer)
    token = jax.random.normal(jax.random.key(1), (2, 2, 8))
    one = layer.write_tokens(jnp.asarray([7]), token[:1], -token[:1])
    many = layer.write_tokens(jnp.asarray([7, 16]), token, -token)  # slot 1's position is past the cache: dropped
    for got, want, before in zip(jax.tree.leaves(one), jax.tree.leaves(many), jax.tree.leaves(layer)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        changed = np.asarray(got) != np.asarray(before)
        assert not changed[1].any() and not np.delete(changed[0], 7, axis=1).any()


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
