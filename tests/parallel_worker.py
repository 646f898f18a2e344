"""Runs jaxvlm in a fresh process for tests/test_parallel.py, which needs several (virtual) devices.

The device count must be fixed before jax is imported, so the test starts this script with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` in its environment; the script checks that it got them.
It prints one line `RESULT <json>` on stdout; everything else (logs, warnings) may go anywhere.

Modes:
  tokens MODEL --devices N --configs '[[tp, dp], ...]'
      greedy tokens of PROMPTS for each (tp, dp), (tp, dp, quant_policy) or (tp, dp, quant_policy, prefix
      caching) -> {"tp,dp[,q[,p]]": [[ids], ...]}; with prefix caching, the batch runs twice and the second
      run, which must reuse the first one's cache, gives the tokens
  inspect MODEL --devices N --configs '[[tp, dp], ...]'
      sharding of the big weights and of the KV cache per config, or the ValueError a config raises
  multihost MODEL --devices N --configs '[[tp, dp], ...]' --coordinator HOST:PORT --num-processes P --process-id I
      joins a jax.distributed job of P processes (N local devices each), then does what `tokens` does
"""

from __future__ import annotations

import argparse
import json
import os
import sys

NEW_TOKENS = 10
SESSION_LEN = 256
MAX_BATCH = 2


def cpu_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a fresh interpreter that sees the CPU as `devices` JAX devices (any XLA
    flags already set are kept)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def prompts() -> list:
    """Two prompts, identical in every process: one image, and two images of other shapes (one prefill batch
    and one compiled program per step: compiling dominates these runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    image = lambda w, h: Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
    return [
        ("What is shown in this image?", image(48, 40)),
        ("Compare the two pictures.", [image(30, 60), image(64, 32)]),
    ]


def make_pipeline(model: str, tp: int, dp: int, **extra):
    from jaxvlm import EngineConfig, pipeline

    return pipeline(model, backend_config=EngineConfig(tp=tp, dp=dp, max_batch_size=MAX_BATCH,
                                                        session_len=SESSION_LEN, **extra))


def run_tokens(model: str, configs: list, **extra) -> dict:
    from jaxvlm import GenerationConfig

    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    batch = prompts()
    out = {}
    for config in configs:  # [tp, dp], [tp, dp, quant_policy] or [tp, dp, quant_policy, prefix caching]
        tp, dp, quant, prefix = (*config, 0, 0)[:4]
        with make_pipeline(model, tp, dp, quant_policy=quant, enable_prefix_caching=bool(prefix), **extra) as pipe:
            responses = pipe(batch, gen_config=gen)
            if prefix:
                responses = pipe(batch, gen_config=gen)
                if not pipe.engine.prefix.reused_tokens:
                    sys.exit(f"layout {config}: the second run reused nothing from the cache")
        out[",".join(map(str, config))] = [r.token_ids for r in responses]
    return out


def _describe(array) -> dict:
    """Spec and per-device shards of one array; `slices` counts the distinct parts of the whole it holds."""
    spec = [None if a is None else str(a) for a in array.sharding.spec]
    spec += [None] * (array.ndim - len(spec))  # a PartitionSpec may omit trailing replicated axes
    shards = array.addressable_shards
    slices = {tuple((s.start, s.stop) for s in shard.index) for shard in shards}
    return {"shape": list(array.shape), "spec": spec, "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "devices": len(shards), "slices": len(slices)}


# Parameters inspected, by their path in the model state (layer 0 stands for every layer).
PARAMS = {
    "qkv_proj": ("language_model", "layers", 0, "self_attn", "qkv_proj"),
    "o_proj": ("language_model", "layers", 0, "self_attn", "o_proj"),
    "gate_up_proj": ("language_model", "layers", 0, "mlp", "gate_up_proj"),
    "down_proj": ("language_model", "layers", 0, "mlp", "down_proj", "kernel"),
    "embed_tokens": ("language_model", "embed_tokens"),
    "lm_head": ("language_model", "lm_head"),
    "vision_q_proj": ("vision_tower", "layers", 0, "q_proj", "kernel"),
    "vision_fc1": ("vision_tower", "layers", 0, "fc1", "kernel"),
    "vision_patch_embedding": ("vision_tower", "patch_embedding"),
    "projector": ("multi_modal_projector", "linear_1", "kernel"),
}


def run_inspect(model: str, configs: list) -> dict:
    from flax import nnx

    out = {}
    for tp, dp in configs:
        try:
            pipe = make_pipeline(model, tp, dp)
        except ValueError as e:
            out[f"{tp},{dp}"] = {"error": str(e)}
            continue
        runner = pipe.model.runner
        flat = {path: var for path, var in nnx.to_flat_state(runner.params)}
        info = {name: _describe(flat[path].get_value()) for name, path in PARAMS.items()}
        info["k_cache"] = _describe(runner.cache[0].k)
        info["v_cache"] = _describe(runner.cache[-1].v)
        if tp * dp > 1:  # an int8 cache's scales split like the cache
            with make_pipeline(model, tp, dp, quant_policy=8) as quantized:
                info["k_scale"] = _describe(quantized.model.runner.cache[0].k_scale)
        # Every parameter of the vision tower, not only the sampled ones: none may be split.
        info["vision_tower_split"] = sorted(
            ".".join(map(str, path)) for path, var in flat.items()
            if path[0] == "vision_tower" and any(a is not None for a in var.get_value().sharding.spec)
        )
        out[f"{tp},{dp}"] = info
        pipe.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("tokens", "inspect", "multihost"))
    ap.add_argument("model")
    ap.add_argument("--devices", type=int, required=True, help="local devices this process must see")
    ap.add_argument("--configs", required=True, help="JSON list of [tp, dp]")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    args = ap.parse_args(argv)

    import jax

    if args.mode == "multihost":
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=120)
    if len(jax.local_devices()) != args.devices:
        sys.exit(f"expected {args.devices} local devices, got {jax.local_devices()} (XLA_FLAGS not applied?)")
    configs = json.loads(args.configs)
    if args.mode == "inspect":
        result = run_inspect(args.model, configs)
    elif args.mode == "tokens":
        result = run_tokens(args.model, configs)
    else:
        # Each process would write the same entries into a shared persistent cache: keep this run self-contained.
        result = run_tokens(args.model, configs, compilation_cache_dir=None)
        result["process_index"] = jax.process_index()
        result["global_devices"] = jax.device_count()
    print("RESULT " + json.dumps(result), flush=True)
    if args.mode == "multihost":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
