"""Decode steps with a bf16 and an int8 KV cache (random 7B-shaped weights made on the device), across the ragged
kernel's tilings and the XLA path: every slot running at 700 tokens (`flag_probe.decode_case`), so the cache
read is what changes. Prints one JSON line per case: milliseconds per step.

    python benchmarks/kv_probe.py [--slots 64] [--cases bf16,int8,int8:128:1024:4,int8-xla]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json

import jax.numpy as jnp

from decode_probe import LLAVA_15_7B, random_model  # sibling scripts: benchmarks/ is on sys.path
from flag_probe import decode_case
from jaxvlm.kernels import ragged_decode
from jaxvlm.model_config import llava_config_from_hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--cases", default="bf16,int8,int8-xla")
    args = ap.parse_args()
    model = random_model(llava_config_from_hf(LLAVA_15_7B))
    kernel = ragged_decode.ragged_decode_attention
    for case in args.cases.split(","):
        name, *tiling = case.split(":")  # "<cache>[-xla][:block_k:chunk:warps[:stages]]"
        ragged_decode.ragged_decode_attention = kernel if not tiling else functools.partial(
            kernel, tiling=ragged_decode.Tiling(*(int(t) for t in tiling)))
        gc.collect()  # the previous case's runner (its jitted methods hold a reference cycle) and its cache
        _, ms = decode_case(model, args.slots, args.slots, {},
                            cache_dtype=jnp.int8 if name.startswith("int8") else jnp.bfloat16,
                            attention_impl="xla" if name.endswith("-xla") else None)
        print(json.dumps({"case": case, "slots": args.slots, "ms": round(ms, 3)}), flush=True)
    ragged_decode.ragged_decode_attention = kernel


if __name__ == "__main__":
    main()
