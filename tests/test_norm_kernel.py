"""The fused residual-add + RMSNorm kernel against its XLA path (interpret mode on CPU, Triton on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import rms_norm

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("rows,dim", [(1, 64), (5, 256), (3, 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pallas_matches_xla(rows, dim, dtype):
    """Both outputs, the sum and the normed row, agree bit for bit or within one rounding of the 16-bit dtype
    (the mean of squares may be summed in another order)."""
    keys = jax.random.split(jax.random.key(rows), 3)
    x = (jax.random.normal(keys[0], (rows, dim)) * 3).astype(dtype)
    delta = jax.random.normal(keys[1], (rows, dim)).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(keys[2], (dim,))).astype(dtype)
    ref_total, ref_normed = rms_norm.add_rms_norm(x, delta, scale, 1e-5, impl="xla")
    total, normed = rms_norm._pallas(x, delta, scale, eps=1e-5, interpret=not ON_GPU)
    assert total.dtype == normed.dtype == dtype
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(ref_total, np.float32))
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(ref_normed, np.float32), rtol=1e-2, atol=1e-3)
    assert np.mean(np.asarray(normed) == np.asarray(ref_normed)) > 0.99


def test_xla_path_is_llama_rms_norm_after_the_add():
    """The portable path: the add rounds to the input dtype, then LLaMA's float32 norm, rounded before the
    weight (transformers' LlamaRMSNorm), on any leading shape."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 32)).astype(jnp.bfloat16)
    delta = jax.random.normal(jax.random.key(1), (2, 3, 32)).astype(jnp.bfloat16)
    scale = jnp.linspace(0.5, 1.5, 32).astype(jnp.bfloat16)
    total, normed = rms_norm.add_rms_norm(x, delta, scale, 1e-6, impl="xla")
    want = (np.asarray(x, np.float32) + np.asarray(delta, np.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(total), want)
    wf = want.astype(np.float32)
    y = (wf / np.sqrt((wf * wf).mean(-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(normed, np.float32), (np.asarray(scale, np.float32) * y.astype(np.float32)),
                               rtol=1e-2)


def test_dispatch_keeps_float32_and_odd_widths_on_xla():
    assert not rms_norm.supported(5120, jnp.bfloat16) and rms_norm.supported(4096, jnp.bfloat16)
    assert not rms_norm.supported(4096, jnp.float32)
    x = jnp.ones((2, 48), jnp.float32)
    hlo = jax.jit(lambda x: rms_norm.add_rms_norm(x, x, jnp.ones(48), 1e-5)).lower(x).as_text()
    assert "add_rms_norm" not in hlo
