"""Weight matmuls: one function with a plain-XLA path that runs everywhere.

On GPU, a product with at most 16 rows (a decode step with few running sequences) goes to the skinny Pallas
kernel, which streams the weight closer to the memory bandwidth than XLA's dot (docs/benchmarks.md); every
other product, and every other platform, uses XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvlm.kernels import skinny_matmul


def _platform() -> str:
    return jax.devices()[0].platform


def matmul(x: jax.Array, w: jax.Array, *, out_dtype=None, impl: str | None = None) -> jax.Array:
    """x [..., K] @ w [K, ...] -> [..., *w.shape[1:]] in `out_dtype` (x's dtype by default), accumulated in f32.

    `impl`: None chooses, "xla" forces the portable path (sharded programs: XLA cannot split the kernel).
    """
    k, out_shape = w.shape[0], w.shape[1:]
    rows = x.shape[:-1]
    w2 = w.reshape(k, -1)
    x2 = x.reshape(-1, k)
    if impl is None:
        impl = "pallas" if (_platform() == "gpu" and x2.shape[0] <= skinny_matmul.ROWS
                            and w.dtype in (jnp.bfloat16, jnp.float16)
                            and skinny_matmul.default_tiling(*w2.shape) is not None) else "xla"
    if impl == "pallas":
        y = skinny_matmul.skinny_matmul(x2, w2, out_dtype=out_dtype)
    else:
        y = jnp.dot(x2, w2, preferred_element_type=jnp.float32 if out_dtype == jnp.float32 else None)
        y = y.astype(out_dtype or y.dtype)
    return y.reshape(*rows, *out_shape)
