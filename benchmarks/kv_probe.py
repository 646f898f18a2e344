"""Decode steps with a bf16 and an int8 KV cache (random 7B-shaped weights made on the device), across the ragged
kernel's tilings and the XLA path: every slot running at the same length, so the cache read is what changes.
Prints one JSON line per case: milliseconds per step (median of 5 runs of 30 back-to-back steps).

    python benchmarks/kv_probe.py [--slots 64] [--position 700] [--cases bf16,int8,int8:128:1024:4,int8-xla]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json

import jax
import jax.numpy as jnp

from decode_probe import LLAVA_15_7B, random_model  # sibling scripts: benchmarks/ is on sys.path
from flag_probe import per_call_ms
from jaxvlm.kernels import ragged_decode
from jaxvlm.model_config import llava_config_from_hf
from jaxvlm.runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--position", type=int, default=700)
    ap.add_argument("--cases", default="bf16,int8,int8-xla")
    args = ap.parse_args()
    model = random_model(llava_config_from_hf(LLAVA_15_7B))
    kernel = ragged_decode.ragged_decode_attention
    for case in args.cases.split(","):
        name, *tiling = case.split(":")  # "<cache>[-xla][:block_k:chunk:warps]"
        ragged_decode.ragged_decode_attention = kernel if not tiling else functools.partial(
            kernel, tiling=ragged_decode.Tiling(*(int(t) for t in tiling)))
        runner = None  # the previous case's cache is freed first (its jitted methods hold a reference cycle)
        gc.collect()
        runner = ModelRunner(model, num_slots=args.slots, max_len=1024,
                             cache_dtype=jnp.int8 if name.startswith("int8") else jnp.bfloat16)
        runner._attention_impl = "xla" if name.endswith("-xla") else None

        def reset():
            runner.state.positions = jnp.full((args.slots,), args.position, jnp.int32)
            runner.state.active = jnp.ones((args.slots,), bool)

        step = lambda: runner.decode(args.position + 1, args.slots, greedy_only=True, num_logprobs=0).tokens
        reset()
        jax.block_until_ready(step())
        print(json.dumps({"case": case, "slots": args.slots, "ms": round(per_call_ms(step, reset, 30), 3)}),
              flush=True)
    ragged_decode.ragged_decode_attention = kernel


if __name__ == "__main__":
    main()
