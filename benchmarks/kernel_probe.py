"""Op-level GPU probe: decode attention (XLA, cuDNN and the ragged Pallas kernel's tilings), the KV-cache write,
and fused against separate projection matmuls, each at 7B shapes over enough layers in one jit that the
data read stays far past the L2 cache. Prints JSON lines; use it to choose defaults before the full
benchmark (`run.py`).

    python benchmarks/kernel_probe.py [--budget-s 420]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import attention, ragged_decode
from jaxvlm.runner import _length_bucket

LAYERS, HEADS, HEAD_DIM, HIDDEN, MLP = 32, 32, 128, 4096, 11008


def timeit(fn, *args, iters: int = 10) -> float:
    """Median seconds per call of an already-jitted fn."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def attention_cases(deadline: float, only_cases: list[str] | None) -> None:
    rng = np.random.default_rng(0)
    cases = {
        "1x700": (1, 1024, np.array([700])),
        "1x2400": (1, 4096, np.array([2400])),
        "64x700": (64, 1024, np.full(64, 700)),
        "64xmixed": (64, 1024, rng.integers(100, 1001, 64)),
        "16xmixed4k": (16, 4096, rng.integers(200, 4001, 16)),
    }
    tilings = [ragged_decode.default_tiling]
    for block_k, warps in itertools.product((32, 64, 128), (2, 4, 8)):
        tilings.append(ragged_decode.Tiling(block_k=block_k, chunk=256, num_warps=warps))
    for chunk in (128, 512, 1024):
        tilings.append(ragged_decode.Tiling(block_k=64, chunk=chunk, num_warps=4))
    tilings += [ragged_decode.Tiling(block_k=32, chunk=64, num_warps=2), ragged_decode.Tiling(block_k=64, chunk=64)]
    for name, (slots, t, lengths) in cases.items():
        if only_cases and name not in only_cases:
            continue
        key = jax.random.key(1)
        q = jax.random.normal(key, (slots, HEADS, HEAD_DIM), jnp.bfloat16)
        layer_bytes = 2 * slots * HEADS * t * HEAD_DIM * 2
        layers = min(LAYERS, max(4, -(-512 * 2**20 // layer_bytes)))  # >= 512 MiB in all: far past the L2
        caches = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (slots, HEADS, t, HEAD_DIM), jnp.bfloat16),
                   jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (slots, HEADS, t, HEAD_DIM), jnp.bfloat16))
                  for i in range(layers)]
        lens = jnp.asarray(lengths, jnp.int32)
        filled = 2 * HEADS * HEAD_DIM * 2 * int(lengths.sum())  # bytes a ragged read needs per layer
        kv_len = min(t, _length_bucket(int(lengths.max()), 64))
        ref = None
        for variant in ["xla", "cudnn", *tilings]:
            if time.perf_counter() > deadline:
                emit(case=name, skipped="budget")
                break
            if variant == "xla":
                f = jax.jit(lambda q, c, l: sum(attention.decode_attention(q, k, v, l, kv_len, impl="xla").astype(jnp.float32)
                                                for k, v in c))
                label = f"xla(kv_len={kv_len})"
            elif variant == "cudnn":  # cuDNN's flash attention, one query per slot, lengths as padding
                f = jax.jit(lambda q, c, l: sum(_cudnn_decode(q, k, v, l).astype(jnp.float32) for k, v in c))
                label = "cudnn (BNTH, kv lengths as padding)"
            else:
                tiling = variant(slots, HEADS, t) if callable(variant) else variant
                if t % tiling.chunk:
                    continue
                f = jax.jit(lambda q, c, l, tiling=tiling: sum(
                    ragged_decode.ragged_decode_attention(q, k, v, l, tiling=tiling).astype(jnp.float32) for k, v in c))
                label = ("default " if callable(variant) else "") + str(tiling)
            try:
                out = f(q, caches, lens)
                sec = timeit(f, q, caches, lens) / layers
            except Exception as e:  # a tiling Triton rejects (e.g. too many registers) is skipped
                emit(case=name, variant=label, error=str(e)[:200])
                continue
            if ref is None:
                ref = out
            err = float(jnp.max(jnp.abs(out - ref)))
            emit(case=name, variant=label, ms_per_layer=sec * 1e3, filled_gb_per_s=filled / sec / 1e9, max_err=err)
        del caches


def _cudnn_decode(q, k, v, lengths):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention  # private: a probe only
    out = dot_product_attention(q[:, :, None], k, v, q_seqlen=jnp.ones_like(lengths), kv_seqlen=lengths,
                                scale=HEAD_DIM**-0.5, mask_type=MaskType.PADDING, qkv_layout="BNTH")
    return out[:, :, 0]


def scatter_cases() -> None:
    slots, t = 64, 1024
    key = jax.random.key(3)
    caches = [jnp.zeros((slots, HEADS, t, HEAD_DIM), jnp.bfloat16) for _ in range(2 * LAYERS)]
    new = jax.random.normal(key, (slots, HEADS, HEAD_DIM), jnp.bfloat16)
    pos = jnp.asarray(np.random.default_rng(1).integers(0, t, slots), jnp.int32)
    slot = jnp.arange(slots)
    variants = {
        "at.set drop": lambda c: c.at[slot, :, pos].set(new, mode="drop"),
        "at.set unique sorted": lambda c: c.at[slot, :, pos].set(new, mode="drop", unique_indices=True,
                                                                 indices_are_sorted=True),
        "at.set promise": lambda c: c.at[slot, :, pos].set(new, mode="promise_in_bounds", unique_indices=True,
                                                           indices_are_sorted=True),
    }
    for label, op in variants.items():
        f = jax.jit(lambda cs, op=op: [op(c) for c in cs], donate_argnums=0)
        caches = f(caches)
        jax.block_until_ready(caches)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            caches = f(caches)
            jax.block_until_ready(caches)
            times.append(time.perf_counter() - t0)
        emit(case="kv write 64 slots", variant=label, ms_per_layer_kv=float(np.median(times)) / LAYERS * 1e3)


def matmul_cases() -> None:
    key = jax.random.key(4)
    w = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02
    sep = [dict(q=w(10 * i, (HIDDEN, HIDDEN)), k=w(10 * i + 1, (HIDDEN, HIDDEN)), v=w(10 * i + 2, (HIDDEN, HIDDEN)),
                o=w(10 * i + 3, (HIDDEN, HIDDEN)), g=w(10 * i + 4, (HIDDEN, MLP)), u=w(10 * i + 5, (HIDDEN, MLP)),
                d=w(10 * i + 6, (MLP, HIDDEN))) for i in range(LAYERS)]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(sep))

    def separate(x, ws):
        for p in ws:
            a = (x @ p["q"]) + (x @ p["k"]) + (x @ p["v"])
            x = x + a @ p["o"]
            x = x + (jax.nn.silu(x @ p["g"]) * (x @ p["u"])) @ p["d"]
        return x

    fused_ws = [dict(qkv=jnp.concatenate([p["q"], p["k"], p["v"]], 1), o=p["o"],
                     gu=jnp.concatenate([p["g"], p["u"]], 1), d=p["d"]) for p in sep]

    def fused(x, ws):
        for p in ws:
            qkv = x @ p["qkv"]
            x = x + (qkv[:, :HIDDEN] + qkv[:, HIDDEN:2 * HIDDEN] + qkv[:, 2 * HIDDEN:]) @ p["o"]
            gu = x @ p["gu"]
            x = x + (jax.nn.silu(gu[:, :MLP]) * gu[:, MLP:]) @ p["d"]
        return x

    for rows in (1, 64):
        x = jnp.ones((rows, HIDDEN), jnp.bfloat16)
        for label, fn, ws in (("separate", separate, sep), ("fused", fused, fused_ws)):
            sec = timeit(jax.jit(fn), x, ws)
            emit(case=f"layer matmuls, {rows} rows", variant=label, ms=sec * 1e3, gb_per_s=weight_bytes / sec / 1e9)
        del x
    del sep, fused_ws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--only", default="attention,scatter,matmul")
    ap.add_argument("--cases", default="", help="attention cases to run (default: all)")
    args = ap.parse_args()
    start = time.perf_counter()
    emit(devices=str(jax.devices()), jax=jax.__version__)
    only = args.only.split(",")
    if "scatter" in only:
        scatter_cases()
    if "matmul" in only:
        matmul_cases()
    if "attention" in only:
        attention_cases(start + args.budget_s, [c for c in args.cases.split(",") if c])


if __name__ == "__main__":
    main()
