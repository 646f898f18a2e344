"""Does the weight layout change XLA's projection matmuls? Each 7B projection stored [in, out] (as jaxvlm keeps it:
`x @ w`) against [out, in] (`x @ w.T`, contiguous along the reduction), at 1, 64 and 5,632 rows (a batch-1 decode
step, a 64-slot step, a prefill group of 8 x 704), over 32 distinct random weights in one jit (more bytes than
the L2 holds), the residual add included where the model has one. One JSON line per case.

    python benchmarks/layout_probe.py [--rows 1,64,5632]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from kernel_probe import timeit  # sibling script: benchmarks/ is on sys.path

SHAPES = {"qkv": (4096, 12288, False), "o": (4096, 4096, True), "gate_up": (4096, 22016, False),
          "down": (11008, 4096, True)}  # name: (in, out, residual add)
LAYERS = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,5632")
    args = ap.parse_args()
    key = jax.random.key(0)
    for name, (k, n, residual) in SHAPES.items():
        for layout in ("in_out", "out_in"):
            shape = (k, n) if layout == "in_out" else (n, k)
            ws = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02 for i in range(LAYERS)]
            dims = (((1,), (0,)), ((), ())) if layout == "in_out" else (((1,), (1,)), ((), ()))

            @jax.jit
            def layers(x, r, ws):
                outs = [jax.lax.dot_general(x, w, dims) for w in ws]  # bf16 out, as the model's einsums
                return [o + r for o in outs] if residual else outs

            for rows in map(int, args.rows.split(",")):
                x = jax.random.normal(jax.random.fold_in(key, 99), (rows, k), jnp.bfloat16)
                r = jax.random.normal(jax.random.fold_in(key, 98), (rows, n), jnp.bfloat16)
                sec = timeit(layers, x, r, ws, iters=15) / LAYERS
                print(json.dumps({"proj": name, "layout": layout, "rows": rows, "us": round(sec * 1e6, 2),
                                  "weight_GBps": round(k * n * 2 / sec / 1e9, 1),
                                  "TFLOPs": round(2 * rows * k * n / sec / 1e12, 1)}), flush=True)
            del ws


if __name__ == "__main__":
    main()
