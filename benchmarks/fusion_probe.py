"""The batch-1 decode layer rewritten so that XLA has fewer small kernels to launch: for each variant, the step's
kernels, milliseconds per step and logits against the model's own decode, all in one process.

Batch-1 decode misses its target by ~0.15 ms a step on an H100 (5.41 against 5.26 ms). The profile puts the gap
in ~430 small kernels between the weight matmuls, ~1.4 us each (`docs/benchmarks.md`). Each variant here
removes a kind of them without a kernel of our own:

- `current`: the model as it is.
- `norm-after`: RMSNorm's per-row factor rsqrt(mean(x^2) + eps) is a scalar per row, so it commutes with the
  projection that follows: the q/k/v and gate/up matmuls read x * weight and their outputs are scaled, in
  whatever fusion already reads them (RoPE, SwiGLU). The normalised row, a kernel per norm, is never written.
  The final norm before the LM head likewise.
- `norm-folded`: as `norm-after`, with each norm's weight folded into the projection after it (a load-time
  transform): the matmul reads x itself, whatever XLA does with an operand's multiply.
- `rope-flip`: RoPE's half swap as a reshape and a flip of the halves inside one elementwise expression,
  instead of two halves joined by a concatenate (a fusion whose root is a concatenate).
- `lazy-attention`: the one-slot attention with its mask as an added bias, and the softmax's division applied
  to the [H, D] output instead of the [H, T] probabilities.
- `split-attention`: as `lazy-attention`, over 8 chunks of keys combined at the end (flash-decoding's split,
  in XLA): XLA's one-slot attention reads the cache at ~1 TB/s, and its reductions over 768 keys for 32 heads
  give the GPU few, long rows to work on.
- `write-slice`: the new token's k and v as in-place slice updates. The model's scatter drops out-of-range
  positions; for one row XLA lowers that as a slice update plus a read of the old values and a select (seen in
  the CPU program). The slice update clamps instead: the engine never writes past a running sequence's
  session, and a finished one's last column is never reused as a cached prefix (a prompt leaves room to answer).
- `rope-once`: q and k rotated together and materialised (an optimization barrier) before the cache write and
  the scores: the model's step lets XLA recompute q's rotation, sines included, inside the scores' reduction
  and k's inside its cache write.
- `+` joins parts: the last three variants combine them.

On a GPU run it twice: with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` and `--profile` for the kernels of each
step (a CUDA graph hides them), and as is for the timing, which is with command buffers as the engine runs.
`--tiny` runs a small float32 model (CPU: checks that each variant computes the model's logits).

    python benchmarks/fusion_probe.py [--variants current,norm-after,...] [--rows 1,64] [--profile] [--hlo-dir DIR]
                                      [--tiny]

`--rows 64` times 64 running slots too (the offline runs' steps), where only the norm and RoPE parts apply.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
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
VARIANTS = ("current", "norm-after", "norm-folded", "rope-flip", "lazy-attention", "split-attention", "write-slice",
            "rope-once", "rope-flip+write-slice", "rope-once+write-slice", "rope-once+rope-flip+write-slice",
            "norm-after+rope-flip+lazy-attention+write-slice", "norm-folded+rope-flip+lazy-attention+write-slice",
            "norm-folded+rope-flip+split-attention+write-slice")


# ------------------------------------------------------------------------------------------------ the variants


def inv_rms(norm: modeling.RMSNorm, x: jax.Array) -> jax.Array:
    """RMSNorm's per-row factor, float32 [..., 1]."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + norm.eps)


def project_normed(norm: modeling.RMSNorm, x: jax.Array, spec: str, w: jax.Array, folded: bool) -> jax.Array:
    """norm(x) @ w as (x * weight) @ w * inv_rms(x), or x @ w * inv_rms(x) where w already holds the weight.
    The float32 product is scaled, then rounded to x's dtype as the model's matmul output is."""
    scaled = x if folded else x * norm.scale[...]
    out = jnp.einsum(spec, scaled, w, preferred_element_type=jnp.float32)
    factor = inv_rms(norm, x)
    return (out * factor.reshape(factor.shape + (1,) * (out.ndim - factor.ndim))).astype(x.dtype)


def rope_flip(x: jax.Array, rope: modeling.Rope) -> jax.Array:
    """`modeling.apply_rope` as one expression: x * [cos, cos] + swap(x) * [-sin, sin], swap exchanging the halves."""
    cos, sin = rope
    cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
    xf = x.astype(jnp.float32)
    swapped = jnp.flip(xf.reshape(*x.shape[:-1], 2, x.shape[-1] // 2), axis=-2).reshape(x.shape)
    return (xf * cos2 + swapped * sin2).astype(x.dtype)


def lazy_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, kv_len: int,
                   chunks: int = 1) -> jax.Array:
    """`decode_attention`'s XLA path for a bf16 cache, with the mask added as a bias and the softmax's division
    moved after the value sum (onto [S, H, D] rather than the [S, H, T] probabilities). With `chunks` > 1 the
    keys are split as flash-decoding splits them: each chunk's softmax and value sum on its own, then the
    chunks combined by their maxima, so that each reduction is `chunks` times shorter and wider."""
    s, h, d = q.shape
    kvh = k_cache.shape[1]
    k_cache, v_cache = (c[:s, :, :kv_len].reshape(s, kvh, chunks, kv_len // chunks, d) for c in (k_cache, v_cache))
    qg = q.reshape(s, kvh, h // kvh, d)
    # A finite mask: a chunk that is all padding then has a finite maximum and a weight of exp(-1e30) = 0.
    bias = jnp.where(jnp.arange(kv_len)[None, :] < jnp.maximum(lengths, 1)[:, None], 0.0, -1e30)
    scores = jnp.einsum("skgd,skctd->skgct", qg, k_cache, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = scores + bias.reshape(s, 1, 1, chunks, -1)
    peak = scores.max(-1)
    p = jnp.exp(scores - peak[..., None])
    out = jnp.einsum("skgct,skctd->skgcd", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    weight = jnp.exp(peak - peak.max(-1, keepdims=True))
    out = jnp.einsum("skgc,skgcd->skgd", weight, out) / jnp.einsum("skgc,skgc->skg", weight, p.sum(-1))[..., None]
    return out.reshape(s, h, d).astype(q.dtype)


def write_by_slice(cache: LayerCache, positions: jax.Array, k: jax.Array, v: jax.Array) -> LayerCache:
    """One slot's token as an in-place slice update (positions clamp, where the model's scatter drops)."""
    put = lambda a, new: jax.lax.dynamic_update_slice(a, new[:, :, None].astype(a.dtype), (0, 0, positions[0], 0))
    return LayerCache(put(cache.k, k), put(cache.v, v))


def layer_decode(parts: set[str]):
    """`DecoderLayer.decode` with the variant's parts: each norm applied after its projection (`norm-after`,
    `norm-folded`), and for one slot (bf16 cache) `lazy-attention` or `split-attention`, and `write-slice`."""
    norm = "norm-folded" if "norm-folded" in parts else "norm-after" if "norm-after" in parts else None

    def project(layer_norm, x, spec, w):
        if norm is None:
            return jnp.einsum(spec, layer_norm(x), w)
        return project_normed(layer_norm, x, spec, w, folded=norm == "norm-folded")

    def decode(self, x, positions, lengths, rope, cache, kv_len, attention_impl):
        att, mlp = self.self_attn, self.mlp
        qkv = project(self.input_layernorm, x, "sd,dkgh->skgh", att.qkv_proj[...])
        if att.qkv_bias is not None:
            qkv = qkv + att.qkv_bias[...]
        g = att.group
        v = qkv[:, :, g + 1, :]
        if "rope-once" in parts:
            s_, kvh, _, hd = qkv.shape
            qk = modeling.apply_rope(qkv[:, :, : g + 1, :].reshape(s_, 1, -1, hd), rope)
            qk = jax.lax.optimization_barrier(qk).reshape(s_, kvh, g + 1, hd)
            q, k = qk[:, :, :g, :].reshape(s_, 1, -1, hd), qk[:, None, :, g, :]
        else:
            q = qkv[:, :, :g, :].reshape(qkv.shape[0], 1, -1, qkv.shape[-1])
            k = qkv[:, None, :, g, :]
            q, k = modeling.apply_rope(q, rope), modeling.apply_rope(k, rope)
        one = x.shape[0] == 1  # the write and attention parts are for one slot; more keep the model's
        if "write-slice" in parts and one:
            cache = write_by_slice(cache, positions, k[:, 0], v)
        else:
            cache = cache.write_tokens(positions, k[:, 0], v)
        if parts & {"lazy-attention", "split-attention"} and one:
            attn = lazy_attention(q[:, 0], cache.k, cache.v, lengths, kv_len, 8 if "split-attention" in parts else 1)
        else:
            attn = decode_attention(q[:, 0], cache.k, cache.v, lengths, kv_len, k_scale=cache.k_scale,
                                    v_scale=cache.v_scale, impl=attention_impl)
        x = x + att.out(attn)
        h = project(self.post_attention_layernorm, x, "sd,dtf->stf", mlp.gate_up_proj[...])
        if mlp.gate_up_bias is not None:
            h = h + mlp.gate_up_bias[...]
        return x + mlp.down_proj(jax.nn.silu(h[:, 0, :]) * h[:, 1, :]), cache

    return decode


def final_logits(folded: bool):
    def logits(self, h):
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        scaled = h if folded else h * self.norm.scale[...]
        return jnp.dot(scaled, w, preferred_element_type=jnp.float32) * inv_rms(self.norm, h)

    return logits


def fold_norms(model: modeling.Llava) -> modeling.Llava:
    """A copy with each RMSNorm's weight multiplied into the projection after it (the norms keep theirs)."""
    model = nnx.clone(model)
    lm = model.language_model
    for layer in lm.layers:
        gamma = layer.input_layernorm.scale[...]
        layer.self_attn.qkv_proj[...] = layer.self_attn.qkv_proj[...] * gamma[:, None, None, None]
        gamma = layer.post_attention_layernorm.scale[...]
        layer.mlp.gate_up_proj[...] = layer.mlp.gate_up_proj[...] * gamma[:, None, None]
    if lm.lm_head is None:
        raise SystemExit("norm-folded needs an untied lm_head")
    lm.lm_head[...] = lm.lm_head[...] * lm.norm.scale[...][:, None]
    return model


@contextlib.contextmanager
def patched(variant: str):
    """The model's code as `variant` has it, while a step traces (compiled programs keep what they traced)."""
    saved = modeling.DecoderLayer.decode, modeling.LlamaModel.logits, modeling.apply_rope
    parts = set(variant.split("+"))
    try:
        if parts - {"current", "rope-flip"}:
            modeling.DecoderLayer.decode = layer_decode(parts)
        if parts & {"norm-after", "norm-folded"}:
            modeling.LlamaModel.logits = final_logits("norm-folded" in parts)
        if "rope-flip" in parts:
            modeling.apply_rope = rope_flip
        yield
    finally:
        modeling.DecoderLayer.decode, modeling.LlamaModel.logits, modeling.apply_rope = saved


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


def check_logits(model, folded, variants: list[str], max_len: int, position: int) -> None:
    """One decode step's logits over a random cache, each variant against `current` (folding the norm weights
    moves them, so the function stays the model's)."""
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
        got = logits_of(folded if "norm-folded" in variant else model, variant, cache, positions, max_len)
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
    folded = fold_norms(model) if any("norm-folded" in v for v in variants) else None
    max_len, position = (64, 40) if args.tiny else (768, 700)  # 60 steps from 700 stay in the 768 bucket

    if not args.no_check:
        check_logits(model, folded, variants, max_len, position)
    for rows in map(int, args.rows.split(",")):
        measure(model, folded, variants, rows, max_len, position, args, deadline)


def measure(model, folded, variants: list[str], rows: int, max_len: int, position: int, args, deadline: float) -> None:
    """Compiles each variant's decode step for `rows` running slots in one runner (one cache, whichever the
    variant), then times the variants in turn."""
    from step_profile import kernel_breakdown

    runner = ModelRunner(model, num_slots=rows, max_len=max_len, cache_dtype=model.language_model.embed_tokens.dtype)
    leaves = {False: runner._leaves, True: folded and jax.tree.leaves(nnx.state(folded))}
    programs = {}

    def use(variant: str) -> None:
        compiled, runner._leaves = programs[variant]
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
        weights = leaves["norm-folded" in variant]
        # A jit of its own per variant: one jit would reuse its first trace, whatever is patched since.
        step = jax.jit(functools.partial(ModelRunner._decode_fn, runner), donate_argnames=("cache", "state"),
                       static_argnames=("rows", "kv_len", "greedy_only", "num_logprobs"))
        with patched(variant):
            t = time.perf_counter()
            compiled = step.lower(weights, runner.cache, runner.state, rows=rows,
                                  kv_len=runner.buckets.kv_length(position + 1), greedy_only=True,
                                  num_logprobs=0).compile()
            compile_s = time.perf_counter() - t
        programs[variant] = compiled, weights
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
