"""Residual add + RMSNorm in one pass: one function with a plain-XLA path that runs everywhere.

Between a decoder layer's matmuls sit a residual add and an RMSNorm. XLA runs them as three kernels (the add,
the mean of squares, the scaling); with one token per sequence each is a tiny kernel whose cost is mostly its
launch, ~1.4 us on an H100, paid 64 times a step. On GPU the Pallas kernel does all three, one row per program.
Both paths compute exactly what transformers' LLaMA does: the add rounds to the input dtype, the norm works in
float32 and rounds before the weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _platform() -> str:
    return jax.devices()[0].platform


def supported(dim: int, dtype) -> bool:
    """Triton blocks are powers of two; float32 keeps XLA (it is not a serving dtype on GPU)."""
    return dim & (dim - 1) == 0 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def add_rms_norm(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, *,
                 impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(x + delta, RMSNorm(x + delta) * scale) for x, delta [..., D] and scale [D], both in x's dtype.

    `impl`: None chooses (the Pallas kernel on GPU where `supported`), "xla" forces the portable path.
    """
    if impl is None:
        impl = "pallas" if _platform() == "gpu" and supported(x.shape[-1], x.dtype) else "xla"
    if impl == "pallas":
        total, normed = _pallas(x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1]), scale, eps=eps)
        return total.reshape(x.shape), normed.reshape(x.shape)
    total = x + delta.astype(x.dtype)
    return total, rms_norm(total, scale, eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LLaMA's RMSNorm: float32 statistics, rounded to x's dtype before the weight."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def _kernel(x_ref, delta_ref, scale_ref, total_ref, normed_ref, *, eps: float):
    dtype = total_ref.dtype
    total = (x_ref[...].astype(jnp.float32) + delta_ref[...].astype(jnp.float32)).astype(dtype)  # [1, D]
    total_ref[...] = total
    xf = total.astype(jnp.float32)
    y = (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(dtype)
    # A product of two 16-bit floats is exact in float32: rounding it once matches XLA's 16-bit multiply.
    normed_ref[...] = (scale_ref[...].astype(jnp.float32)[None, :] * y.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _pallas(x: jax.Array, delta: jax.Array, scale: jax.Array, *, eps: float, interpret: bool = False):
    rows, dim = x.shape
    row = pl.BlockSpec((1, dim), lambda i: (i, 0))
    out = jax.ShapeDtypeStruct((rows, dim), x.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(rows,),
        in_specs=[row, row, pl.BlockSpec((dim,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[out, out],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, delta.astype(x.dtype), scale.astype(x.dtype))
