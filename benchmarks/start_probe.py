"""Where "process start to first answer" goes: fresh processes load the benchmark's llava-1.5-7b checkpoint and
answer one request (8 new tokens), as `run.py`'s latency step does, with a cold and then a warm compilation
cache. Each prints its stage stamps (seconds since the parent spawned it), how long the tokenizer
(`from_checkpoint`) and the weights (`load_model`) took, the programs it compiled or loaded from the cache, and, in
a run labelled "profile", the functions that took the most time (cProfile, cumulative, from the first import
on): one JSON line per process.

    python benchmarks/start_probe.py [--model-dir /tmp/jb] [--runs cold,warm,warm,warm-profile] [--smoke]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def settings(args: argparse.Namespace):
    import run

    return run.make_settings(run.parse_args(["--model-dir", args.model_dir] + ["--smoke"] * args.smoke))


def child(args: argparse.Namespace) -> None:
    spawned = float(os.environ["PROBE_SPAWN_TIME"])
    stamps = {"interpreter": time.time() - spawned}
    mark = lambda name: stamps.__setitem__(name, round(time.time() - spawned, 3))
    profile = cProfile.Profile()
    if "profile" in args.label:  # (cProfile slows Python-heavy stages, imports most: stamps come from other runs)
        profile.enable()
    import jax

    mark("import jax")
    jax.devices()
    mark("backend ready")
    compiles = {"programs": 0, "programs s": 0.0, "from the cache": 0}

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # compiled, or loaded from the persistent cache
            compiles["programs"] += 1
            compiles["programs s"] += duration
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
            compiles["from the cache"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    import jaxvlm
    from jaxvlm import EngineConfig, GenerationConfig

    import run

    mark("import jaxvlm")
    from jaxvlm import params, processor

    for owner, name in ((processor.InputProcessor, "from_checkpoint"), (params, "load_model")):
        stamps[name] = 0.0

        def timed(*a, _fn=getattr(owner, name), _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                stamps[_name] += round(time.perf_counter() - t, 3)

        setattr(owner, name, timed)
    s = settings(args)
    pipe = jaxvlm.pipeline(s.model_path("1.5"), backend_config=EngineConfig(
        session_len=s.session_len_15, max_batch_size=1, compilation_cache_dir=args.cache))
    mark("pipeline ready")
    prompt = (run.load_requests(s)[0], s.image("1.5"))
    out = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert out.generate_token_len == 8, out
    mark("first answer")
    stamps.update(compiles)
    top = []
    if "profile" in args.label:
        profile.disable()
        stats = pstats.Stats(profile).stats
        rows = sorted(((v[3], f"{Path(k[0]).name}:{k[1]}:{k[2]}") for k, v in stats.items()), reverse=True)
        top = [{"fn": name, "cum_s": round(cum, 3)} for cum, name in rows if cum > 0.2][:60]
    print(json.dumps({"run": args.label, "stamps": stamps, "top": top}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/jb")
    ap.add_argument("--runs", default="cold,warm,warm,warm-profile")
    ap.add_argument("--smoke", action="store_true", help="the benchmark's tiny model, on the CPU")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--cache")
    ap.add_argument("--label")
    args = ap.parse_args()
    if args.child:
        return child(args)
    import run  # checkpoint writer and request texts, as the benchmark makes them

    s = settings(args)
    tokenizer = run.build_tokenizer()
    run.write_checkpoint(Path(s.model_path("1.5")), "1.5", *s.shapes, tokenizer, s.device)
    run._write_json(Path(s.requests_file), {"texts": run.make_texts(tokenizer, 1, s.text_tokens)})
    cache = tempfile.mkdtemp(prefix="start-probe-cache-")
    here = Path(__file__).resolve().parent
    for label in args.runs.split(","):
        env = dict(os.environ, PROBE_SPAWN_TIME=repr(time.time()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.90",
                   PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
        if args.smoke:
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, __file__, "--child", "--cache", cache, "--label", label,
                        "--model-dir", args.model_dir] + ["--smoke"] * args.smoke, env=env, check=True)


if __name__ == "__main__":
    main()
