"""The skinny matmul kernel against XLA's dot (interpret mode on CPU, Triton on GPU), and the dispatch around it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import matmul, skinny_matmul

ON_GPU = jax.default_backend() == "gpu"


def _operands(m, k, n, dtype=jnp.bfloat16, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (m, k), dtype), (jax.random.normal(kw, (k, n), jnp.float32) * 0.05).astype(dtype)


TILINGS = [None, skinny_matmul.Tiling(block_n=32, block_k=64, splits=4), skinny_matmul.Tiling(block_n=64, block_k=32, splits=2)]


@pytest.mark.parametrize("tiling", TILINGS, ids=["default", "split4", "split2"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32], ids=["bf16-out", "f32-out"])
def test_skinny_matches_xla(m, tiling, out_dtype):
    """Split or not, every real row matches an f32-accumulated dot, and the output keeps the asked dtype."""
    x, w = _operands(m, 512, 256)
    out = skinny_matmul.skinny_matmul(x, w, tiling=tiling, out_dtype=out_dtype, interpret=not ON_GPU)
    ref = jnp.dot(x, w, preferred_element_type=jnp.float32)
    assert out.shape == (m, 256) and out.dtype == (out_dtype or jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2 if out_dtype is None else 1e-4)


def test_skinny_refuses_what_it_cannot_tile():
    x, w = _operands(1, 512, 100)
    with pytest.raises(ValueError, match="does not divide"):
        skinny_matmul.skinny_matmul(x, w, interpret=True)
    with pytest.raises(ValueError, match="17 rows"):
        skinny_matmul.skinny_matmul(*_operands(17, 512, 256), interpret=True)


def test_default_tiling_fills_the_gpu_and_divides():
    """7B decode shapes: every one tiles, with at least 128 programs (an H100 has 132 SMs)."""
    for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32064)]:
        t = skinny_matmul.default_tiling(k, n)
        assert n % t.block_n == 0 and k % (t.splits * t.block_k) == 0
        assert n // t.block_n * t.splits >= 128, (k, n, t)
    assert skinny_matmul.default_tiling(512, 100) is None


def test_matmul_keeps_leading_and_trailing_shapes():
    """matmul contracts x's last axis with w's first and keeps the rest of both, on either path."""
    x = jax.random.normal(jax.random.key(2), (2, 3, 64), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (64, 4, 5), jnp.float32)
    with jax.default_matmul_precision("highest"):
        out = matmul.matmul(x, w, impl="xla")
        ref = jnp.einsum("abk,kcd->abcd", x, w)
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="the dispatcher picks the Pallas kernel on GPU only")
def test_matmul_dispatches_skinny_products_to_the_kernel_on_gpu():
    x, w = _operands(4, 4096, 4096)
    hlo = jax.jit(lambda x, w: matmul.matmul(x, w)).lower(x, w).as_text()
    assert "skinny_matmul" in hlo
    hlo = jax.jit(lambda x, w: matmul.matmul(x, w, impl="xla")).lower(x, w).as_text()
    assert "skinny_matmul" not in hlo
