"""Where an offline run's time goes: the benchmark's offline requests through the real pipeline, once to compile
and once under the profiler. Prints one JSON line per request count: wall time, device time per jitted program
(vision, prefill, decode), how long the device sat idle and in what gaps, and the host's time in each engine
call.

    python benchmarks/offline_probe.py [--model-dir /tmp/jb] [--requests 64,256] [--quant-policy 8]

It writes the llava-1.5 checkpoint as `run.py` does (transformers + torch on the GPU, in a child process) unless
one is there.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import run as bench  # a sibling script: benchmarks/ is on sys.path when this one runs
from jaxvlm import api


def ensure_checkpoint(s: bench.Settings) -> None:
    tok = bench.build_tokenizer()
    bench.write_checkpoint(Path(s.model_path("1.5")), "1.5", *s.shapes, tok, s.device)
    texts = bench.make_texts(tok, max(s.counts), s.text_tokens)
    bench._write_json(Path(s.requests_file), {"text_tokens": s.text_tokens, "texts": texts})


class HostClock:
    """Wall time the host spends inside chosen methods (dispatch, or waiting on results)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.first: dict[str, float] = {}
        self.wrapped: list[tuple[object, str]] = []
        self.log: list[tuple[str, float, float]] = []  # (method, start, end)

    def wrap(self, obj, name: str) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            self.first.setdefault(name, t)
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1
                self.log.append((name, t, time.perf_counter()))

        setattr(obj, name, timed)
        self.wrapped.append((obj, name))

    def unwrap(self) -> None:
        for obj, name in self.wrapped:
            delattr(obj, name)  # the instance attribute that shadowed the method


def device_timeline(logdir: str) -> dict:
    """Per XLA module: executions and summed span; kernels' busy time and the idle gaps between them."""
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    modules: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    kernels = []
    by_module: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # kernels, ms
    stat_names: set[str] = set()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name == "XLA Modules":
                for ev in line.events:
                    name = ev.name.split("(")[0]
                    modules[name][0] += 1
                    modules[name][1] += ev.duration_ns / 1e6
            elif "stream" in line.name.lower():
                for ev in line.events:
                    kernels.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    stats = dict(ev.stats)
                    stat_names.update(stats)
                    module = str(stats.get("hlo_module", "?")).split("(")[0]
                    by_module[module][0] += 1
                    by_module[module][1] += ev.duration_ns / 1e6
    kernels.sort()
    busy, gaps, end = 0.0, [], None
    for s, e in kernels:
        if end is not None and s > end:
            gaps.append((s - end) / 1e6)
        busy += max(0, e - max(s, end or s))
        end = e if end is None else max(end, e)
    gaps = np.asarray(gaps or [0.0])
    span = (end - kernels[0][0]) / 1e6 if kernels else 0.0
    return {
        "device_span_ms": span,
        "device_busy_ms": busy / 1e6,
        "idle_ms": {f"gaps>{t}ms": round(float(gaps[gaps > t].sum()), 1) for t in (0.05, 0.5, 2, 10)},
        "largest_gaps_ms": [round(float(g), 2) for g in np.sort(gaps)[-8:][::-1]],
        "modules": {k: {"runs": n, "ms": round(ms, 1)} for k, (n, ms) in sorted(modules.items(), key=lambda kv: -kv[1][1])},
        "kernel_ms_by_module": {k: {"kernels": n, "ms": round(ms, 1)}
                                for k, (n, ms) in sorted(by_module.items(), key=lambda kv: -kv[1][1])},
        "kernel_stats": sorted(stat_names),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/jb")
    ap.add_argument("--requests", default="64,256")
    ap.add_argument("--quant-policy", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="the tiny CPU model of run.py --smoke")
    ap.add_argument("--prep", default=f"{api._PREFETCH}x{api._PREP_WORKERS}",
                    help="comma-separated <requests prepared ahead>x<threads preparing them> to compare")
    ap.add_argument("--checkpoint-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import jaxvlm
    from jaxvlm import EngineConfig, GenerationConfig

    s = bench.make_settings(bench.parse_args(
        ["--model-dir", args.model_dir, "--requests", args.requests] + ["--smoke"] * args.smoke))
    if args.checkpoint_only:
        return ensure_checkpoint(s)
    # In a child process: torch's CUDA memory would otherwise shrink the KV cache this process plans.
    subprocess.run([sys.executable, __file__, "--checkpoint-only", *sys.argv[1:]], check=True)
    texts = bench.load_requests(s)
    pipe = jaxvlm.pipeline(s.model_path("1.5"), backend_config=EngineConfig(
        session_len=s.session_len_15, max_batch_size=max(s.counts), quant_policy=args.quant_policy))
    engine, runner = pipe.engine, pipe.engine.runner
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, do_sample=False)
    settings = [tuple(map(int, p.split("x"))) for p in args.prep.split(",")]
    for n, (prefetch, workers) in itertools.product(s.counts, settings):
        api._PREFETCH, api._PREP_WORKERS = prefetch, workers
        prompts = [(texts[i], s.image("1.5", seed=i % 8)) for i in range(n)]
        pipe(prompts, gen_config=gen)  # compiles every program the measured run needs
        # A plain timed run with the host clock, then one under the profiler (which slows the host a little).
        clock = HostClock()
        for name in ("encode_images", "prefill", "decode", "release"):
            clock.wrap(runner, name)
        clock.wrap(engine, "_process")
        pulls = []
        prepare = pipe._requests
        pipe._requests = lambda *a: (pulls.append(time.perf_counter()) or r for r in prepare(*a))
        t0 = time.perf_counter()
        out = pipe(prompts, gen_config=gen)
        wall = time.perf_counter() - t0
        clock.unwrap()
        del pipe._requests
        with tempfile.TemporaryDirectory() as logdir:
            jax.profiler.start_trace(logdir)
            t = time.perf_counter()
            pipe(prompts, gen_config=gen)
            profiled_wall = time.perf_counter() - t
            jax.profiler.stop_trace()
            timeline = device_timeline(logdir)
        tokens = sum(r.generate_token_len for r in out)
        print(json.dumps({
            "requests": n, "prefetch": prefetch, "prep_workers": workers, "quant_policy": args.quant_policy, "slots": runner.buckets.num_slots,
            "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1), "profiled_wall_s": round(profiled_wall, 3),
            "host_s": {k: round(v, 3) for k, v in clock.seconds.items()}, "host_calls": dict(clock.calls),
            "first_prefill_after_ms": round((clock.first["prefill"] - t0) * 1e3, 1),
            "first_pulls_ms": [round((p - t0) * 1e3, 1) for p in pulls[:12]],
            # the first host calls: method, start and duration in ms
            "first_calls": [(name, round((a - t0) * 1e3, 1), round((b - a) * 1e3, 1)) for name, a, b in clock.log[:40]],
            **timeline,
        }), flush=True)


if __name__ == "__main__":
    main()
