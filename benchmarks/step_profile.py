"""Where a jitted step's device time goes: profiles a few calls and lists the GPU kernels by total time.

Runs on random 7B-shaped weights made on the device (as `decode_probe.py`). For each step it prints one JSON
line: kernels per call, the summed kernel time and the span from the first kernel's start to the last one's
end (the difference is idle gaps between kernels), and the ops that take the most time.

    python benchmarks/step_profile.py [--cases decode1,decode64,decode64xla,decode64-full-int8,prefill2560,engineprefill8x704-int8,vision5]
"""

from __future__ import annotations

import argparse
import collections
import gc
import glob
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from decode_probe import LLAVA_15_7B, bare_steps, random_model  # sibling scripts: benchmarks/ is on sys.path
from jaxvlm.model_config import llava_config_from_hf
from jaxvlm.kv_cache import init_cache
from jaxvlm import sampling
from jaxvlm.config import GenerationConfig
from jaxvlm.engine import _stack_params
from jaxvlm.runner import ModelRunner, PrefillBatch


def kernel_breakdown(call, calls: int = 5, top: int = 30, device_plane: str = "/device:GPU",
                     line_filter=lambda name: "stream" in name.lower()) -> dict:
    """Profiles `calls` blocking calls of `call()` (already compiled) and sums the device kernels by op."""
    call()
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        for _ in range(calls):
            jax.block_until_ready(call())
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    count, busy, intervals = 0, 0.0, []
    planes = [p for p in data.planes if p.name.startswith(device_plane)]
    line_names = sorted({line.name for p in planes for line in p.lines})
    for plane in planes:
        for line in plane.lines:
            if not line_filter(line.name):
                continue
            for event in line.events:
                stats = dict(event.stats)
                # One row per kind of op (numbered instances pooled), with the kernel it ran.
                op = re.sub(r"\.\d+$", "", str(stats.get("hlo_op") or "?"))
                key = f"{op} | {event.name[:70]}"
                by_op[key][0] += event.duration_ns
                by_op[key][1] += 1
                count += 1
                busy += event.duration_ns
                intervals.append((event.start_ns, event.start_ns + event.duration_ns))
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    # A call's span runs from its first kernel's start to its last one's end; calls are told apart by the host's
    # gap between them (each call blocks), far longer than any gap inside one jitted step.
    spans, call_start, call_end = [], None, None
    for start, end in sorted(intervals):
        if call_end is not None and start - call_end > 100_000:
            spans.append(call_end - call_start)
            call_start = None
        call_start = start if call_start is None else call_start
        call_end = end if call_end is None else max(call_end, end)
    spans.append((call_end or 0) - (call_start or 0))
    return {
        "kernels_per_call": count / calls,
        "kernel_ms_per_call": busy / calls / 1e6,
        "span_ms_per_call": float(np.median(spans)) / 1e6,
        "lines": line_names,
        "top_ops": [{"op": op, "us_per_call": round(ns / calls / 1e3, 1), "kernels_per_call": n / calls}
                    for op, (ns, n) in ranked],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="decode1,decode64,decode64xla,prefill2560,vision5")
    args = ap.parse_args()
    cases = args.cases.split(",")
    model = random_model(llava_config_from_hf(LLAVA_15_7B))
    encode, prefill = bare_steps(model)
    tc = model.config.text
    rng = np.random.default_rng(0)
    for case in cases:
        if case.startswith("decode"):
            # "decode<slots>[-xla][-full][-int8]": XLA's decode attention; every slot running (else only slot 0,
            # while the step still computes all `slots` rows); an int8 cache. Sequences are 700 tokens long.
            size, *flags = case.removeprefix("decode").split("-")
            slots = int(size.removesuffix("xla"))
            runner = call = None  # the previous case's cache is freed before this one's is made
            gc.collect()  # (the runner's jitted methods hold a reference cycle)
            runner = ModelRunner(model, num_slots=slots, max_len=1024,
                                 cache_dtype=jnp.int8 if "int8" in flags else jnp.bfloat16)
            if size.endswith("xla") or "xla" in flags:
                runner._attention_impl = "xla"
            running = slots if "full" in flags else 1
            runner.state.positions = jnp.where(jnp.arange(slots) < running, 700, 0).astype(jnp.int32)
            runner.state.active = jnp.arange(slots) < running
            call = lambda: runner.decode(701, slots, greedy_only=True, num_logprobs=0).tokens
        elif case.startswith("engineprefill"):
            # "engineprefill<rows>x<length>[-int8]": the runner's prefill (sampling, cache writes) of `rows`
            # text prompts, as the offline run's groups (8 x 704 for llava-1.5's 655-token prompts)
            shape, *flags = case.removeprefix("engineprefill").split("-")
            rows, length = map(int, shape.split("x"))
            runner = call = None
            gc.collect()
            runner = ModelRunner(model, num_slots=rows, max_len=1024,
                                 cache_dtype=jnp.int8 if "int8" in flags else jnp.bfloat16)
            params = sampling.SlotParams.from_generation_config(GenerationConfig(), stop_ids=[], bad_ids=[])
            batch = PrefillBatch(
                tokens=rng.integers(3, 32000, (rows, length)).astype(np.int32),
                feature_index=np.full((rows, length), -1, np.int32), slots=np.arange(rows, dtype=np.int32),
                lengths=np.full(rows, length - 49, np.int32), min_new=np.zeros(rows, np.int32),
                params=_stack_params([params], rows),
                seen_ids=np.full((rows, length), -1, np.int32))
            call = lambda: runner.prefill(batch, None, 0).tokens
        elif case.startswith("prefill"):
            length = int(case.removeprefix("prefill"))
            cache = init_cache(tc, 1, length, jnp.bfloat16)
            tokens = jnp.asarray(rng.integers(3, 32000, (1, length)), jnp.int32)

            def call():
                logits, cache[:] = prefill(cache, tokens)
                return logits
        elif case.startswith("vision"):
            tiles = int(case.removeprefix("vision"))
            pixels = jnp.asarray(rng.standard_normal((tiles, 3, 336, 336)), jnp.float32)
            call = lambda: encode(pixels)
        else:
            raise SystemExit(f"unknown case {case}")
        print(json.dumps({"case": case, **kernel_breakdown(call)}), flush=True)


if __name__ == "__main__":
    main()
