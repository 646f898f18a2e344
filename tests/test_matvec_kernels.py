"""The fused one-row projection kernels (`kernels/matvec.py`) against their plain-XLA paths: in interpret mode
on CPU, natively on GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import matvec

INTERPRET = jax.default_backend() != "gpu"
TILINGS = [matvec.Tiling(block_n=32, block_k=64), matvec.Tiling(block_n=64, block_k=32, num_warps=2)]


def _inputs(k: int, n: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    bf16 = lambda a: a.astype(jnp.bfloat16)
    x = bf16(3.0 * jax.random.normal(keys[0], (1, k)))
    scale = bf16(1.0 + 0.2 * jax.random.normal(keys[1], (k,)))
    w = bf16(jax.random.normal(keys[2], (k, n)) / np.sqrt(k))
    gate_up = bf16(jax.random.normal(keys[3], (k, 2, n)) / np.sqrt(k))
    residual = bf16(jax.random.normal(keys[4], (1, n)))
    return x, scale, w, gate_up, residual


def _close(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    # One bf16 rounding of the outputs apart at most (the sums run in another order).
    np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=2 ** -7 * np.abs(ref).max())


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
@pytest.mark.parametrize("k,n", [(256, 384), (448, 128)])  # 448: K not a power of two (LLaMA-13B's 5120)
def test_kernels_match_xla(tiling, k, n):
    x, scale, w, gate_up, residual = _inputs(k, n)
    cases = {
        "norm_matmul": lambda **kw: matvec.norm_matmul(x, scale, 1e-5, w, **kw),
        "norm_swiglu": lambda **kw: matvec.norm_swiglu(x, scale, 1e-5, gate_up, **kw),
        "matmul_add": lambda **kw: matvec.matmul_add(x, w, residual, **kw),
    }
    for name, f in cases.items():
        ref = f(impl="xla")
        out = f(impl="pallas", tiling=tiling, interpret=INTERPRET)
        assert out.dtype == jnp.bfloat16, name
        _close(out, ref)


def test_xla_path_takes_any_leading_axes():
    x, scale, w, gate_up, residual = _inputs(64, 32)
    xs = jnp.concatenate([x, 2 * x, -x])[None]  # [1, 3, K]
    out = matvec.norm_matmul(xs, scale, 1e-5, w)
    assert out.shape == (1, 3, 32)
    _close(out[0, 1:2], matvec.norm_matmul(2 * x, scale, 1e-5, w, impl="xla"))
    assert matvec.norm_swiglu(xs, scale, 1e-5, gate_up).shape == (1, 3, 32)
    assert matvec.matmul_add(out, w.T, xs).shape == (1, 3, 64)


def test_kernel_refuses_several_rows():
    x, scale, w, _, _ = _inputs(64, 64)
    with pytest.raises(ValueError, match="one row"):
        matvec.norm_matmul(jnp.concatenate([x, x]), scale, 1e-5, w, impl="pallas", interpret=INTERPRET)
