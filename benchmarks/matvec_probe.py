"""The fused one-row projections of `jaxvlm/kernels/matvec.py` against XLA, at llava-7B's four shapes.

Each case runs a projection over 32 distinct weight matrices in one jitted call (as a decode step's 32 layers
do; one matrix reused would sit in L2) and prints per-layer microseconds, the weights' bytes per second, and
the largest difference from XLA's path. XLA's path includes the norm, SwiGLU or residual-add kernels that the
fused kernels fold in. A sweep over tilings, then the chosen defaults:

    python benchmarks/matvec_probe.py [--sweep] [--layers 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import matvec
from kernel_probe import emit, timeit  # a sibling script: benchmarks/ is on sys.path when this one runs

D, F, QKV = 4096, 11008, 3 * 4096  # llava-7B: hidden, MLP and fused q/k/v widths
INTERPRET = jax.default_backend() != "gpu"  # a CPU smoke run of the probe itself


def cases():
    """name -> (call(x, w, **options), x shape, weight shape)."""
    key = iter(jax.random.split(jax.random.key(0), 8))
    scale = (1 + 0.1 * jax.random.normal(next(key), (D,))).astype(jnp.bfloat16)
    residual = jax.random.normal(next(key), (1, D), jnp.bfloat16)
    return {
        "qkv": (lambda x, w, **kw: matvec.norm_matmul(x, scale, 1e-5, w, **kw), (1, D), (D, QKV)),
        "gate_up": (lambda x, w, **kw: matvec.norm_swiglu(x, scale, 1e-5, w, **kw), (1, D), (D, 2, F)),
        "o": (lambda x, w, **kw: matvec.matmul_add(x, w, residual, **kw), (1, D), (D, D)),
        "down": (lambda x, w, **kw: matvec.matmul_add(x, w, residual, **kw), (1, F), (F, D)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time every tiling, not only the defaults")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    for name, (call, x_shape, w_shape) in cases().items():
        if args.only and name not in args.only.split(","):
            continue
        keys = jax.random.split(jax.random.key(1), args.layers + 1)
        x = jax.random.normal(keys[0], x_shape, jnp.bfloat16)
        weights = [(0.02 * jax.random.normal(k, w_shape, jnp.float32)).astype(jnp.bfloat16) for k in keys[1:]]
        gb = args.layers * np.prod(w_shape) * 2 / 1e9
        run = lambda **kw: jax.jit(lambda x, ws: [call(x, w, **kw) for w in ws])
        ref = run(impl="xla")
        ref_out = np.asarray(ref(x, weights)[-1], np.float32)

        def measure(label, fn, **extra) -> float:
            s = timeit(fn, x, weights, iters=20)
            diff = float(np.abs(np.asarray(fn(x, weights)[-1], np.float32) - ref_out).max())
            emit(case=name, impl=label, us_per_layer=round(s / args.layers * 1e6, 2), tb_s=round(gb / s / 1e3, 3),
                 max_diff=diff, ref_max=float(np.abs(ref_out).max()), **extra)
            return s

        measure("xla", ref)
        measure("pallas-default", run(impl="pallas", interpret=INTERPRET))
        if not args.sweep:
            continue

        def sweep(tilings):
            timed = []
            for tiling in tilings:
                fields = [tiling.block_n, tiling.block_k, tiling.num_warps, tiling.num_stages]
                if w_shape[-1] % tiling.block_n or x_shape[1] % tiling.block_k:
                    continue
                try:
                    timed.append((measure("pallas", run(impl="pallas", tiling=tiling, interpret=INTERPRET),
                                          tiling=fields), tiling))
                except Exception as e:  # a tiling Triton cannot compile (registers, shared memory)
                    emit(case=name, impl="pallas", tiling=fields, error=str(e)[:200])
            return min(timed, key=lambda t: t[0])[1]

        # Block shapes first, then warps and pipeline stages for the best of them.
        best = sweep(matvec.Tiling(block_n=bn, block_k=bk) for bn, bk in itertools.product((16, 32, 64, 128),
                                                                                           (32, 64, 128, 256))
                     if bn * bk <= 8192)
        sweep(dataclasses.replace(best, num_warps=w, num_stages=s) for w, s in itertools.product((2, 4, 8),
                                                                                                 (2, 3, 4)))

if __name__ == "__main__":
    main()
