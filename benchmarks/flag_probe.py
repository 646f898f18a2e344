"""XLA compiler options against the steps that set the figures: batch-1 decode, 64-slot decode and a long
prefill, each compiled once per option set (`jax.jit(..., compiler_options=...)`, so one process covers all).

Runs on random 7B-shaped weights made on the device (as `decode_probe.py`). Prints one JSON line per (options,
step): compile seconds and milliseconds per call; an option XLA rejects is reported and skipped.

    python benchmarks/flag_probe.py [--sets default,exhaustive] [--steps decode1,decode1of93,decode64,prefill2432]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from decode_probe import LLAVA_15_7B, bare_steps, random_model  # sibling scripts: benchmarks/ is on sys.path
from jaxvlm.model_config import llava_config_from_hf
from jaxvlm.kv_cache import init_cache
from jaxvlm.runner import ModelRunner

OPTION_SETS: dict[str, dict] = {
    "default": {},
    "exhaustive": {"xla_gpu_exhaustive_tiling_search": True},
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
    "no_split_k": {"xla_gpu_enable_split_k_autotuning": False},
    "block_rewriter": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
    "generic_triton": {"xla_gpu_unsupported_enable_generic_triton_emitter_for_gemms": True},
    "heroless": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    "pdl": {"xla_gpu_enable_pdl": True},
    "pdl_launch": {"xla_gpu_enable_pdl": True, "xla_gpu_enable_pdl_launch": True},
}


def per_call_ms(call, reset, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of (time for `calls` back-to-back calls) / calls; `reset()` runs before each."""
    times = []
    for _ in range(repeats):
        reset()
        t = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return float(np.median(times)) * 1e3


def decode_case(model, used: int, slots: int, options: dict, cache_dtype=jnp.bfloat16,
                attention_impl: str | None = None) -> tuple[float, float]:
    """`used` running sequences in the first slots of a `slots`-slot engine (`attention_impl` None: the
    runner's choice)."""
    runner = ModelRunner(model, num_slots=slots, max_len=1024, cache_dtype=cache_dtype)
    runner._attention_impl = attention_impl or runner._attention_impl
    runner._decode = jax.jit(runner._decode_fn, static_argnames=("rows", "kv_len", "greedy_only", "num_logprobs"),
                             donate_argnames=("cache", "state"), compiler_options=options)
    active = np.arange(slots) < used

    def reset():  # every slot at 700 tokens: 60 more steps stay inside the 768-column bucket
        runner.state.positions = jnp.where(jnp.asarray(active), 700, 0).astype(jnp.int32)
        runner.state.active = jnp.asarray(active)

    reset()
    t = time.perf_counter()
    jax.block_until_ready(runner.decode(701, used, greedy_only=True, num_logprobs=0).tokens)
    compile_s = time.perf_counter() - t
    ms = per_call_ms(lambda: runner.decode(701, used, greedy_only=True, num_logprobs=0).tokens, reset, calls=60)
    return compile_s, ms


def prefill_case(model, length: int, options: dict) -> tuple[float, float]:
    _, prefill = bare_steps(model, options)
    cache = [init_cache(model.config.text, 1, length, jnp.bfloat16)]
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 32000, (1, length)), jnp.int32)

    def call():
        logits, cache[0] = prefill(cache[0], tokens)
        return logits

    t = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - t
    return compile_s, per_call_ms(call, lambda: None, calls=3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=",".join(OPTION_SETS))
    ap.add_argument("--steps", default="decode1,decode64,prefill2432")
    args = ap.parse_args()
    model = random_model(llava_config_from_hf(LLAVA_15_7B))
    for name in args.sets.split(","):
        for step in args.steps.split(","):
            options = OPTION_SETS[name]
            try:
                if step.startswith("decode"):  # "decode<used>" or "decode<used>of<slots>"
                    used, _, slots = step.removeprefix("decode").partition("of")
                    compile_s, ms = decode_case(model, int(used), int(slots or used), options)
                else:
                    compile_s, ms = prefill_case(model, int(step.removeprefix("prefill")), options)
                row = {"set": name, "step": step, "compile_s": round(compile_s, 2), "ms": round(ms, 4)}
            except Exception as e:  # an option this XLA does not know, or cannot honour
                row = {"set": name, "step": step, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
