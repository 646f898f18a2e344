"""The batch-1 decode layer rewritten so that XLA has fewer or cheaper small kernels to launch: for each
variant, the step's kernels, milliseconds per step and logits against the model's own decode, in one process.

Measured here and adopted (2026-12-08, H100, `docs/benchmarks.md`): RoPE without a concatenate
(`modeling.apply_rope`) and the one-slot cache write as a slice update (`LayerCache.write_tokens`). Measured and
dropped: RMSNorm's row factor applied after the projection (with and without the norm weights folded into
it), the one-slot attention normalised after the value sum, and the same split over 8 chunks of keys.

- `current`: the model as it is.
- `before`: the model before those two changes (RoPE's halves joined by a concatenate, the write a scatter), for
  an A/B on whatever GPU is lent.
- `rope-once`: q and k rotated together and materialised (an optimization barrier) before the cache write and
  the scores: the model's step lets XLA recompute q's rotation inside the scores' reduction and k's inside
  its cache write.

On a GPU run it twice: with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` and `--profile` for the kernels of each
step (a CUDA graph hides them), and as is for the timing, which is with command buffers as the engine runs.
`--tiny` runs a small float32 model (CPU: checks that each variant computes the model's logits).

    python benchmarks/fusion_probe.py [--variants current,rope-once] [--rows 1,64] [--profile] [--hlo-dir DIR]
                                      [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decode_probe import LLAVA_15_7B, random_model  # sibling scripts: benchmarks/ is on sys.path
from flag_probe import per_call_ms
from jaxvlm import modeling
from jaxvlm.kernels.attention import decode_attention
from jaxvlm.kv_cache import LayerCache, init_cache
from jaxvlm.model_config import llava_config_from_hf
from jaxvlm.runner import ModelRunner

TINY = {**LLAVA_15_7B,
        "vision_config": {**LLAVA_15_7B["vision_config"], "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28},
        "text_config": {**LLAVA_15_7B["text_config"], "hidden_size": 64, "intermediate_size": 160,
                        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "vocab_size": 512}}
VARIANTS = ("current", "before", "rope-once")


# ------------------------------------------------------------------------------------------------ the variants


def decode_rope_once(self, x, positions, lengths, rope, cache, kv_len, attention_impl):
    """`DecoderLayer.decode` with q and k rotated as one array that XLA must write out before its readers."""
    att = self.self_attn
    qkv = jnp.einsum("sd,dkgh->skgh", self.input_layernorm(x), att.qkv_proj[...])
    if att.qkv_bias is not None:
        qkv = qkv + att.qkv_bias[...]
    s, kvh, g, hd = qkv.shape[0], qkv.shape[1], att.group, qkv.shape[-1]
    qk = modeling.apply_rope(qkv[:, :, : g + 1, :].reshape(s, 1, -1, hd), rope)
    qk = jax.lax.optimization_barrier(qk).reshape(s, kvh, g + 1, hd)
    q, k, v = qk[:, :, :g, :].reshape(s, -1, hd), qk[:, :, g, :], qkv[:, :, g + 1, :]
    cache = cache.write_tokens(positions, k, v)
    attn = decode_attention(q, cache.k, cache.v, lengths, kv_len, k_scale=cache.k_scale, v_scale=cache.v_scale,
                            impl=attention_impl)
    x = x + att.out(attn)
    return x + self.mlp(self.post_attention_layernorm(x)), cache


def rope_table_before(positions, inv_freq):
    angles = positions[..., None, None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_before(x, rope):
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_tokens_before(self, positions, k, v):
    slot = jnp.arange(k.shape[0])
    return self._write(lambda c, new: c.at[slot, :, positions].set(new.astype(c.dtype), mode="drop"), k, v)


@contextlib.contextmanager
def patched(variant: str):
    """The model's code as `variant` has it, while a step traces (compiled programs keep what they traced)."""
    saved = modeling.DecoderLayer.decode, modeling.rope_table, modeling.apply_rope, LayerCache.write_tokens
    try:
        if variant == "rope-once":
            modeling.DecoderLayer.decode = decode_rope_once
        elif variant == "before":
            modeling.rope_table, modeling.apply_rope = rope_table_before, apply_rope_before
            LayerCache.write_tokens = write_tokens_before
        elif variant != "current":
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        yield
    finally:
        modeling.DecoderLayer.decode, modeling.rope_table, modeling.apply_rope, LayerCache.write_tokens = saved


# ------------------------------------------------------------------------------------------------ measuring


def entry_ops(hlo: str) -> dict:
    """The compiled program's top-level ops (each fusion or custom call is a kernel launch or a library call),
    counted by kind."""
    entry = hlo[hlo.index("\nENTRY"):]
    counts = collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.search(r"= .*? ([\w-]+)\(", line)  # past the shape, a tuple's too (multi-output fusions)
        if not m or m[1] in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        kind = re.search(r"kind=(\w+)", line)
        counts[f"{m[1]}:{kind[1]}" if kind else m[1]] += 1
    return {"ops": sum(counts.values()), "by_kind": dict(counts.most_common())}


def logits_of(model: modeling.Llava, variant: str, cache, positions, kv_len: int) -> np.ndarray:
    """One decode step's logits for slot 0 over the given cache, as `variant` computes them."""
    graphdef, state = nnx.split(model)
    with patched(variant):
        step = jax.jit(lambda s, c: nnx.merge(graphdef, s).decode(
            jnp.array([7]), positions, positions + 1, c, kv_len, "xla")[0])
        return np.asarray(step(state, cache), np.float32)


def check_logits(model, variants: list[str], max_len: int, position: int) -> None:
    """One decode step's logits over a random cache, each variant against `current`."""
    tc = model.config.text
    dtype = model.language_model.embed_tokens.dtype
    keys = jax.random.split(jax.random.key(3), 2 * tc.num_layers)
    cache = init_cache(tc, 1, max_len, dtype)
    for i, layer in enumerate(cache):
        layer.k = jax.random.normal(keys[2 * i], layer.k.shape, dtype)
        layer.v = jax.random.normal(keys[2 * i + 1], layer.v.shape, dtype)
    positions = jnp.array([position])
    reference = logits_of(model, "current", cache, positions, max_len)
    for variant in variants:
        got = logits_of(model, variant, cache, positions, max_len)
        print(json.dumps({"variant": variant, "check": "logits", "max_abs_diff": float(np.abs(got - reference).max()),
                          "max_abs_logit": float(np.abs(reference).max()),
                          "same_argmax": bool(got.argmax() == reference.argmax())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="kernels per step (run with command buffers off)")
    ap.add_argument("--hlo-dir", help="write each variant's optimised program here")
    ap.add_argument("--tiny", action="store_true", help="a small float32 model (a CPU check of the variants)")
    ap.add_argument("--rows", default="1", help="running slots of the timed steps, e.g. 1,64")
    ap.add_argument("--no-check", action="store_true", help="skip the logits check (one more compile per variant)")
    ap.add_argument("--budget-s", type=float, default=540, help="no variant starts compiling after this")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    variants = args.variants.split(",")
    cfg = llava_config_from_hf(TINY if args.tiny else LLAVA_15_7B)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = random_model(cfg, dtype)
    max_len, position = (64, 40) if args.tiny else (768, 700)  # 60 steps from 700 stay in the 768 bucket

    if not args.no_check:
        check_logits(model, variants, max_len, position)
    for rows in map(int, args.rows.split(",")):
        measure(model, variants, rows, max_len, position, args, deadline)


def measure(model, variants: list[str], rows: int, max_len: int, position: int, args, deadline: float) -> None:
    """Compiles each variant's decode step for `rows` running slots in one runner (one cache, whichever the
    variant), then times the variants in turn."""
    from step_profile import kernel_breakdown

    runner = ModelRunner(model, num_slots=rows, max_len=max_len, cache_dtype=model.language_model.embed_tokens.dtype)
    programs = {}

    def use(variant: str) -> None:
        compiled = programs[variant]
        runner._decode = lambda leaves, cache, state, **static: compiled(leaves, cache, state)

    def reset():  # every slot running at `position`: 60 steps from there stay inside one cache-read bucket
        runner.state.positions = jnp.full((rows,), position, jnp.int32)
        runner.state.active = jnp.ones((rows,), bool)

    call = lambda: runner.decode(position + 1, rows, greedy_only=True, num_logprobs=0).tokens
    reset()
    for variant in variants:
        if time.time() > deadline:
            print(json.dumps({"variant": variant, "rows": rows, "skipped": "budget"}), flush=True)
            continue
        # A jit of its own per variant: one jit would reuse its first trace, whatever is patched since.
        step = jax.jit(functools.partial(ModelRunner._decode_fn, runner), donate_argnames=("cache", "state"),
                       static_argnames=("rows", "kv_len", "greedy_only", "num_logprobs"))
        with patched(variant):
            t = time.perf_counter()
            compiled = step.lower(runner._leaves, runner.cache, runner.state, rows=rows,
                                  kv_len=runner.buckets.kv_length(position + 1), greedy_only=True,
                                  num_logprobs=0).compile()
            compile_s = time.perf_counter() - t
        programs[variant] = compiled
        hlo = compiled.as_text()
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"{variant}-{rows}.hlo.txt"), "w") as f:
                f.write(hlo)
        row = {"variant": variant, "rows": rows, "compile_s": round(compile_s, 1), "program": entry_ops(hlo)}
        if args.profile:
            use(variant)
            row.update(kernel_breakdown(call, top=40))
        print(json.dumps(row), flush=True)
    if args.profile:
        return  # without command buffers, times are not the engine's
    # Rounds over the variants in turn, so that drift on the machine spreads evenly over them.
    times = collections.defaultdict(list)
    for _ in range(3):
        for variant in programs:
            use(variant)
            times[variant].append(per_call_ms(call, reset, calls=60))
    for variant, ms in times.items():
        print(json.dumps({"variant": variant, "rows": rows, "ms_per_step": float(np.median(ms)), "rounds": ms,
                          "tok_s": rows * 1e3 / float(np.median(ms))}), flush=True)


if __name__ == "__main__":
    main()
