"""Engine-level decode/prefill probe on random 7B-shaped weights made on the device (no checkpoint, no torch).

Times the jitted steps directly (no tokenizer or images), to find where decode time goes before the full
side-by-side benchmark (`run.py`). Prints JSON lines.

    python benchmarks/decode_probe.py [--slots 1,64] [--steps 64]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.config import GenerationConfig
from jaxvlm.engine import Engine
from jaxvlm.model_config import llava_config_from_hf
from jaxvlm.kv_cache import init_cache
from jaxvlm.modeling import Llava
from jaxvlm.runner import ModelRunner
from jaxvlm.scheduler import EngineRequest
from kernel_probe import timeit  # a sibling script: benchmarks/ is on sys.path when this one runs

LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
}


def random_model(cfg, dtype=jnp.bfloat16) -> Llava:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, dtype)))
    key = jax.random.key(0)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        value = (jax.random.normal(jax.random.fold_in(key, i), var.shape, jnp.float32) * 0.02).astype(dtype)
        flat.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def bandwidth_gbs() -> float:
    x = jnp.ones((2 * 1024**3 // 2,), jnp.bfloat16)  # 2 GiB
    copy = jax.jit(lambda a: a * 1)
    copy(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        y = copy(x)
    y.block_until_ready()
    return 2 * x.nbytes * 10 / (time.perf_counter() - t) / 1e9


def bare_steps(model: Llava, compiler_options: dict | None = None):
    """The vision tower and the decoder prefill as bare jitted calls, without the engine or sampling:
    `encode(pixels)` and `prefill(cache, tokens) -> (last logits, cache)`, the cache donated, prompts in rows
    0..B-1 filling their whole padded length; both compiled with `compiler_options` (XLA's, per jit)."""
    graphdef, params = nnx.split(model)
    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_images(x), compiler_options=compiler_options)
    prefill = jax.jit(lambda p, c, t: nnx.merge(graphdef, p).prefill(
        t, None, None, c, jnp.arange(t.shape[0]), jnp.full((t.shape[0],), t.shape[1] - 1)), donate_argnums=1,
        compiler_options=compiler_options)
    return (lambda pixels: encode(params, pixels)), (lambda cache, tokens: prefill(params, cache, tokens))


def phases(model: Llava) -> None:
    """Device time of the time-to-first-token stages: the vision tower per tile count, and the decoder prefill
    per (rows, padded length), each as a bare jitted call."""
    encode, prefill = bare_steps(model)
    for tiles in (1, 5, 8):
        pixels = jnp.asarray(np.random.default_rng(0).standard_normal((tiles, 3, 336, 336)), jnp.float32)
        ms = timeit(lambda: encode(pixels), iters=5) * 1e3
        print(json.dumps({"phase": "vision", "tiles": tiles, "ms": ms}))
    tc = model.config.text
    for rows, length in ((1, 640), (1, 768), (1, 2432), (1, 2560), (8, 768)):
        cache = init_cache(tc, rows, length, jnp.bfloat16)
        tokens = jnp.asarray(np.random.default_rng(1).integers(3, 32000, (rows, length)), jnp.int32)
        _, cache = prefill(cache, tokens)

        def run():
            nonlocal cache
            logits, cache = prefill(cache, tokens)
            return logits

        sec = timeit(run, iters=5)
        flops = 2 * rows * length * sum(x.size for x in jax.tree.leaves(nnx.state(model.language_model.layers)))
        print(json.dumps({"phase": "prefill", "rows": rows, "length": length, "ms": sec * 1e3,
                          "matmul_tflops": flops / sec / 1e12}))
        del cache


def engine_ttft(model: Llava) -> None:
    """Time to first token through the engine (no tokenizer or image preprocessing) for one 336-px tile with a
    655-token prompt and five tiles with 2,399 tokens, against the bare vision and prefill calls of `phases`:
    the difference is the engine's own cost."""
    from jaxvlm.scheduler import ImageInput
    rng = np.random.default_rng(2)
    per_tile = model.config.tokens_per_tile
    for tiles, prompt, max_len in ((1, 655, 1024), (5, 2399, 2560)):
        runner = ModelRunner(model, num_slots=1, max_len=max_len, cache_dtype=jnp.bfloat16)
        engine = Engine(runner, max_vision_tiles=16)
        features = min(tiles * per_tile, prompt - 40)
        pixels = rng.standard_normal((tiles, 3, 336, 336)).astype(np.float32)
        request = lambda: EngineRequest(0, rng.integers(3, 32000, size=prompt).astype(np.int32),
                                        [ImageInput(pixels, np.arange(features, dtype=np.int32), 5)],
                                        GenerationConfig(max_new_tokens=1, ignore_eos=True))

        def first() -> float:
            t = time.perf_counter()
            for _ in engine.generate([request()]):
                pass
            return time.perf_counter() - t

        first(), first()
        ms = float(np.median([first() for _ in range(7)])) * 1e3
        print(json.dumps({"phase": "engine ttft", "tiles": tiles, "prompt": prompt, "ms": ms,
                          "compiled": sorted(map(str, runner.compiled))}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="1,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=600)
    ap.add_argument("--phases", action="store_true", help="time vision and prefill stages only")
    ap.add_argument("--ttft", action="store_true", help="time to first token through the engine, then --phases")
    args = ap.parse_args()
    cfg = llava_config_from_hf(LLAVA_15_7B)
    t = time.perf_counter()
    model = random_model(cfg)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    print(json.dumps({"phase": "init", "seconds": time.perf_counter() - t, "weight_gb": weight_bytes / 1e9}))
    if args.ttft:
        engine_ttft(model)
    if args.phases or args.ttft:
        return phases(model)
    bw = bandwidth_gbs()
    print(json.dumps({"phase": "bandwidth", "gb_per_s": bw}))
    rng = np.random.default_rng(0)
    for slots in [int(s) for s in args.slots.split(",")]:
        runner = ModelRunner(model, num_slots=slots, max_len=1024, cache_dtype=jnp.bfloat16)
        engine = Engine(runner, max_vision_tiles=16)
        reqs = lambda n: [EngineRequest(i, rng.integers(3, 32000, size=args.prompt).astype(np.int32), [],
                                        GenerationConfig(max_new_tokens=n, ignore_eos=True)) for i in range(slots)]

        def run(n: int) -> float:
            t = time.perf_counter()
            for _ in engine.generate(reqs(n)):
                pass
            return time.perf_counter() - t

        warm = run(args.steps) + run(1)
        # As the benchmark does: the n-token run minus the 1-token run is n - 1 decode steps, whatever the
        # engine's read-ahead (its first event comes a couple of steps after the prefill).
        first, total = run(1), run(args.steps)
        steps = args.steps - 1
        decode_s = total - first
        per_step = decode_s / steps
        kv_bytes = 2 * 32 * 4096 * 2 * (args.prompt + args.steps / 2) * slots
        print(json.dumps({
            "phase": "decode", "slots": slots, "warmup_s": warm, "ttft_s": first, "ms_per_step": per_step * 1e3,
            "tokens_per_s": slots * steps / decode_s, "roofline_fraction": (weight_bytes + kv_bytes) / (bw * 1e9) / per_step,
            "compiled": sorted(map(str, runner.compiled)),
        }))


if __name__ == "__main__":
    main()
