"""A one-token decoder layer's projections, each with the small ops around it folded into one kernel.

At batch 1 a decode step is weight reads: each layer streams its four projection matrices once. XLA runs each
projection as a GEMM and puts the RMSNorm before it and the SwiGLU or the residual add after it into kernels
of their own, and at one row such a kernel costs ~1.2 us whatever it computes (about 0.3 ms of a 4.3 ms step on
an H200, docs/benchmarks.md). Here, on GPU and for a single row, a projection is one Pallas (Triton) kernel:
the RMSNorm is its prologue (every program recomputes the row's statistics from a few KB that L2 serves), the
SwiGLU or the residual add its epilogue.

Each program owns `block_n` output columns and walks its [K, block_n] slice of the weight in `block_k` rows,
multiplying in float32 into a [block_k, block_n] accumulator that is summed once at the end: one row needs no
matrix units, and a product of two bf16 values is exact in float32.

Every function has a plain-XLA path (the model's own math, any number of rows) that runs everywhere and that
the kernel is tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_n: int = 64  # output columns per program
    block_k: int = 64  # weight rows per loop iteration
    num_warps: int = 4
    num_stages: int = 3


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LLaMA's RMSNorm: statistics in float32, rounded to the input dtype before the weight multiplies."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2, F] (gate, up) -> silu(gate) * up."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def _use_kernel(x: jax.Array, w: jax.Array, n: int, impl: str | None) -> bool:
    one_row = x.ndim == 2 and x.shape[0] == 1
    if impl == "pallas" and not one_row:
        raise ValueError(f"the matvec kernels take one row, not {x.shape}")
    if impl is not None:
        return impl == "pallas"
    return (one_row and jax.devices()[0].platform == "gpu" and x.dtype == w.dtype == jnp.bfloat16
            and x.shape[1] % Tiling.block_k == 0 and n % Tiling.block_n == 0)


def norm_matmul(x: jax.Array, scale: jax.Array, eps: float, w: jax.Array, *, impl: str | None = None,
                tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """rms_norm(x) @ w: x [..., K], scale [K], w [K, N] -> [..., N]. `impl` "xla", or "pallas" (x [1, K]); None
    picks the kernel for one bf16 row on GPU."""
    if not _use_kernel(x, w, w.shape[1], impl):
        return rms_norm(x, scale, eps) @ w
    return _launch(_norm_matmul_kernel, x, [scale], [w], [], (None,), tiling, eps, interpret)


def norm_swiglu(x: jax.Array, scale: jax.Array, eps: float, w: jax.Array, *, impl: str | None = None,
                tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """swiglu(rms_norm(x) @ w): x [..., K], w [K, 2, F] (gate, up) -> [..., F]."""
    if not _use_kernel(x, w, w.shape[2], impl):
        return swiglu(jnp.einsum("...d,dtf->...tf", rms_norm(x, scale, eps), w))
    return _launch(_norm_swiglu_kernel, x, [scale], [w, w], [], (0, 1), tiling, eps, interpret)


def matmul_add(x: jax.Array, w: jax.Array, residual: jax.Array, *, impl: str | None = None,
               tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """residual + x @ w: x [..., K], w [K, N], residual [..., N] -> [..., N]."""
    if not _use_kernel(x, w, w.shape[1], impl):
        return residual + x @ w
    return _launch(_matmul_add_kernel, x, [], [w], [residual], (None,), tiling, None, interpret)


# ------------------------------------------------------------------------------------------------- kernels


def _stream(x_at, w_refs, block_k: int) -> list[jax.Array]:
    """For each weight ref [K, Bn]: sum_k x[k] * w[k, :] in float32 ([Bn]); `x_at(offset)` gives x's next
    `block_k` values in float32."""
    k = w_refs[0].shape[0]

    def body(i, accs):
        offset = pl.multiple_of(i * block_k, block_k)
        xk = x_at(offset)[:, None]
        return tuple(a + xk * w[pl.ds(offset, block_k), :].astype(jnp.float32) for a, w in zip(accs, w_refs))

    init = tuple(jnp.zeros((block_k, w.shape[-1]), jnp.float32) for w in w_refs)
    return [a.sum(axis=0) for a in lax.fori_loop(0, k // block_k, body, init)]


def _normed(x_ref, scale_ref, eps: float, block_k: int):
    """`x_at` for rms_norm(x), with `rms_norm`'s roundings; the sum of squares is taken first, in one pass."""
    k, dtype = x_ref.shape[0], x_ref.dtype
    load = lambda offset: x_ref[pl.ds(offset, block_k)].astype(jnp.float32)
    squares = lax.fori_loop(0, k // block_k, lambda i, s: s + jnp.square(load(i * block_k)),
                            jnp.zeros((block_k,), jnp.float32))
    inv = lax.rsqrt(jnp.sum(squares) / k + eps)
    rounded = lambda v: v.astype(dtype).astype(jnp.float32)
    return lambda offset: rounded(scale_ref[pl.ds(offset, block_k)].astype(jnp.float32) * rounded(load(offset) * inv))


def _norm_matmul_kernel(x_ref, scale_ref, w_ref, o_ref, *, eps: float, block_k: int):
    (acc,) = _stream(_normed(x_ref, scale_ref, eps, block_k), [w_ref], block_k)
    o_ref[...] = acc.astype(o_ref.dtype)


def _norm_swiglu_kernel(x_ref, scale_ref, gate_ref, up_ref, o_ref, *, eps: float, block_k: int):
    gate, up = _stream(_normed(x_ref, scale_ref, eps, block_k), [gate_ref, up_ref], block_k)
    rounded = lambda v: v.astype(o_ref.dtype).astype(jnp.float32)  # the projection's bf16 outputs
    gate, up = rounded(gate), rounded(up)
    o_ref[...] = (rounded(gate / (1.0 + jnp.exp(-gate))) * up).astype(o_ref.dtype)


def _matmul_add_kernel(x_ref, w_ref, residual_ref, o_ref, *, eps: None, block_k: int):
    del eps
    (acc,) = _stream(lambda offset: x_ref[pl.ds(offset, block_k)].astype(jnp.float32), [w_ref], block_k)
    product = acc.astype(o_ref.dtype).astype(jnp.float32)
    o_ref[...] = (residual_ref[...].astype(jnp.float32) + product).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _launch(kernel, x, vectors, weights, column_inputs, index: tuple[int | None, ...], tiling: Tiling | None, eps,
            interpret: bool):
    """One program per `block_n` output columns. x [1, K] and `vectors` ([K] each) are read whole by every
    program; weights[i] is [K, N], or [K, T, N] read at [:, index[i], :]; `column_inputs` [1, N] are read at
    the program's columns."""
    tiling = tiling or Tiling()
    k, n, bn = x.shape[1], weights[0].shape[-1], tiling.block_n
    whole = pl.BlockSpec((k,), lambda j: (0,))
    columns = pl.BlockSpec((bn,), lambda j: (j,))
    weight_specs = [pl.BlockSpec((k, bn), lambda j: (0, j)) if i is None
                    else pl.BlockSpec((k, None, bn), lambda j, i=i: (0, i, j)) for i in index]
    out = pl.pallas_call(
        functools.partial(kernel, eps=eps, block_k=tiling.block_k),
        grid=(n // bn,),
        in_specs=[whole, *[whole for _ in vectors], *weight_specs, *[columns for _ in column_inputs]],
        out_specs=columns,
        out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name=kernel.__name__.strip("_"),
    )(x[0], *vectors, *weights, *[c[0] for c in column_inputs])
    return out[None]
