"""LLaVA in Flax NNX: a CLIP vision tower, a projector and a LLaMA-family decoder with a KV cache.

Every parameter carries logical axis names (`axes` metadata) that `sharding.py` maps to mesh axes. Layers are
kept as separate modules (not stacked and scanned): on GPU a scan over stacked weights pays a copy per layer.
The decoder runs in two shapes: `prefill` (a padded batch of prompt chunks, causal: whole prompts, or with a
`PrefixContext` the rest of prompts whose start is already cached) and `decode` (one token per cache slot).
Weights are loaded by `params.py`; this file only computes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvlm.kernels.attention import context_attention, decode_attention, prefill_attention
from jaxvlm.kv_cache import KVCache, LayerCache
from jaxvlm.model_config import LlavaConfig, TextConfig, VisionTowerConfig

NEWLINE = -2  # feature_index value of the LLaVA-NeXT image_newline token


class PrefixContext(NamedTuple):
    """Prefill chunks that continue cached prefixes (prefix caching): the first `length` positions of slot
    sources[b] are copied into chunk b's own slot, then the chunk is written from position starts[b] on."""

    starts: jax.Array  # i32[B]
    sources: jax.Array  # i32[B]
    length: int  # cache columns copied and attended over (static; covers every chunk's end)


def param(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


# ----------------------------------------------------------------------------------------------- vision tower


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis_name: str):
        self.scale = param((dim,), dtype, (axis_name,))
        self.bias = param((dim,), dtype, (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unsupported activation {name!r}")


class Dense(nnx.Module):
    """x @ kernel + bias, with the kernel stored [in, out] as a matmul wants it."""

    def __init__(self, d_in: int, d_out: int, dtype, axes: tuple[str, str], bias: bool = True):
        self.kernel = param((d_in, d_out), dtype, axes)
        self.bias = param((d_out,), dtype, (axes[1],)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class ClipLayer(nnx.Module):
    def __init__(self, c: VisionTowerConfig, dtype):
        d, f = c.hidden_size, c.intermediate_size
        self.num_heads = c.num_heads
        self.act = c.hidden_act
        self.layer_norm1 = LayerNorm(d, c.layer_norm_eps, dtype, "vision_embed")
        self.q_proj = Dense(d, d, dtype, ("vision_embed", "vision_heads"))
        self.k_proj = Dense(d, d, dtype, ("vision_embed", "vision_heads"))
        self.v_proj = Dense(d, d, dtype, ("vision_embed", "vision_heads"))
        self.out_proj = Dense(d, d, dtype, ("vision_heads", "vision_embed"))
        self.layer_norm2 = LayerNorm(d, c.layer_norm_eps, dtype, "vision_embed")
        self.fc1 = Dense(d, f, dtype, ("vision_embed", "vision_mlp"))
        self.fc2 = Dense(f, d, dtype, ("vision_mlp", "vision_embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.layer_norm1(x)
        split = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        # cuDNN flash attention on GPU: XLA's softmax over [tiles, heads, 577, 577] f32 scores took a fifth of the
        # tower's time on an H100 (docs/benchmarks.md).
        attn = prefill_attention(q, k, v, causal=False).reshape(n, t, d)
        x = x + self.out_proj(attn)
        return x + self.fc2(_act(self.act, self.fc1(self.layer_norm2(x))))


class ClipVisionTower(nnx.Module):
    """CLIP ViT up to the deepest layer LLaVA reads; `post_layernorm` only feeds the pooled output, so it is
    absent, and so are the layers after the selected one."""

    def __init__(self, c: VisionTowerConfig, num_layers: int, dtype):
        d, p = c.hidden_size, c.patch_size
        self.patch_size = p
        self.class_embedding = param((d,), dtype, ("vision_embed",))
        # The conv stem as a matmul over flattened (channel, row, col) patches.
        self.patch_embedding = param((c.num_channels * p * p, d), dtype, (None, "vision_embed"))
        self.position_embedding = param((c.patches_per_side**2 + 1, d), dtype, (None, "vision_embed"))
        self.pre_layrnorm = LayerNorm(d, c.layer_norm_eps, dtype, "vision_embed")
        self.layers = nnx.List([ClipLayer(c, dtype) for _ in range(num_layers)])

    def __call__(self, pixels: jax.Array, feature_layers: tuple[int, ...]) -> jax.Array:
        """pixels [N, C, S, S] -> hidden states of `feature_layers` concatenated on the last axis."""
        n, c, s, _ = pixels.shape
        p, g = self.patch_size, s // self.patch_size
        patches = pixels.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        x = patches.astype(self.patch_embedding.dtype) @ self.patch_embedding[...]
        cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        hidden = [self.pre_layrnorm(x)]
        for layer in self.layers:
            hidden.append(layer(hidden[-1]))
        return jnp.concatenate([hidden[i] for i in feature_layers], axis=-1)


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, dtype):
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        self.act = cfg.projector_act
        self.linear_1 = Dense(d_in, d, dtype, ("vision_embed", "embed"), cfg.projector_bias)
        self.linear_2 = (
            Dense(d, d, dtype, ("embed", "embed_out"), cfg.projector_bias) if cfg.projector == "mlp2x_gelu" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(_act(self.act, x))


# ---------------------------------------------------------------------------------------------- text decoder


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = param((dim,), dtype, ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)  # LLaMA rounds to the input dtype before the weight


def rope_frequencies(c: TextConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2] with the config's scaling (transformers' rope_type semantics)."""
    inv = 1.0 / (c.rope_theta ** (jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim))
    scaling = dict(c.rope_scaling or ())
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > old / lo, inv / factor, jnp.where(wavelen < old / hi, inv, mid))
    return inv


Rope = tuple[jax.Array, jax.Array]


def rope_table(positions: jax.Array, inv_freq: jax.Array) -> Rope:
    """Full-width [cos, cos] and [-sin, sin] [..., T, 1, D] of positions [..., T], made once per forward and read
    by every layer."""
    angles = positions[..., None, None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """x [..., T, H, D] rotated in float32, in the rotate-half layout of HF LLaMA weights: the first half
    becomes x1 cos - x2 sin, the second x2 cos + x1 sin. Written as x * cos + (x with its halves swapped) * sin,
    one elementwise expression: halves joined by a concatenate made a kernel of their own in the decode step
    (0.04 ms of a 5.4 ms batch-1 step on an H100)."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    swapped = jnp.flip(xf.reshape(*x.shape[:-1], 2, x.shape[-1] // 2), axis=-2).reshape(x.shape)
    return (xf * cos + swapped * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention with q, k and v in one projection: for each KV head, its `group` query heads, then its key
    and its value head ([embed, kv_heads, group + 2, head_dim]). One matmul reads all three (fewer, larger
    kernels: measured 5% faster at batch 1 and 17% at 64 rows on an H100), and splitting the kv_heads axis under
    tp keeps each group's q, k and v on one device."""

    def __init__(self, c: TextConfig, dtype):
        d, h, kvh, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.group = h // kvh
        self.qkv_proj = param((d, kvh, self.group + 2, hd), dtype, ("embed", "kv_heads", None, "head_dim"))
        self.o_proj = param((h, hd, d), dtype, ("q_heads", "head_dim", "embed"))
        self.qkv_bias = (param((kvh, self.group + 2, hd), dtype, ("kv_heads", None, "head_dim"))
                         if c.attention_bias else None)

    def qkv(self, x: jax.Array, rope: Rope):
        qkv = jnp.einsum("...d,dkgh->...kgh", x, self.qkv_proj[...])
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        g = self.group
        q = qkv[..., :g, :].reshape(*qkv.shape[:-3], -1, qkv.shape[-1])  # query head i belongs to KV head i // g
        k, v = qkv[..., g, :], qkv[..., g + 1, :]
        return apply_rope(q, rope), apply_rope(k, rope), v

    def out(self, attn: jax.Array) -> jax.Array:
        return jnp.einsum("...hk,hkd->...d", attn, self.o_proj[...])


class MLP(nnx.Module):
    """SwiGLU with gate and up in one [embed, 2, mlp] projection (one matmul; the mlp axis splits under tp)."""

    def __init__(self, c: TextConfig, dtype):
        d, f = c.hidden_size, c.intermediate_size
        self.gate_up_proj = param((d, 2, f), dtype, ("embed", None, "mlp"))
        self.gate_up_bias = param((2, f), dtype, (None, "mlp")) if c.mlp_bias else None
        self.down_proj = Dense(f, d, dtype, ("mlp", "embed"), c.mlp_bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("...d,dtf->...tf", x, self.gate_up_proj[...])
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[...]
        return self.down_proj(jax.nn.silu(h[..., 0, :]) * h[..., 1, :])


class DecoderLayer(nnx.Module):
    def __init__(self, c: TextConfig, dtype):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = Attention(c, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c, dtype)

    def prefill(self, x, rope: Rope, cache: LayerCache, slots, last_index=None, context: PrefixContext | None = None):
        """x [B, L, D]; writes this chunk's k/v at cache rows `slots`, positions 0..L-1 (with a `context`: the
        cached prefix is copied in first, and the chunk goes after it). Given `last_index` [B] (the final layer,
        whose output matters at each prompt's last token only), attention output, o_proj and the MLP run for
        those B rows, not B x L (about 2.5% of a 32-layer prefill), and it returns [B, D]. Whole prompts attend
        to the chunk's own k/v, never the (possibly int8) cache; a continued chunk attends to its cache row."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), rope)
        k_rows, v_rows = k.swapaxes(1, 2), v.swapaxes(1, 2)  # the cache layout [B, KVH, L, D]
        if context is None:
            for b in range(x.shape[0]):  # B is small and static: one in-place slice update per prompt
                cache = cache.write_prompt(slots[b], k_rows[b : b + 1], v_rows[b : b + 1])
        else:  # continuation groups are wide (every question about an image seen): copy and write in one op each
            cache = cache.copy_prefix(context.sources, slots, context.length).write_chunks(slots, context.starts, k, v)
        pick = lambda a: jnp.take_along_axis(a, last_index.reshape(-1, *[1] * (a.ndim - 1)), axis=1)[:, 0]
        if context is not None:
            rows = cache.rows(slots, context.length)
            attend = lambda q, starts: context_attention(q, rows.k, rows.v, starts, k_scale=rows.k_scale,
                                                         v_scale=rows.v_scale)
            if last_index is None:
                x = x + self.self_attn.out(attend(q, context.starts))
            else:
                attn = attend(pick(q)[:, None], context.starts + last_index)[:, 0]
                x = pick(x) + self.self_attn.out(attn)
        elif last_index is None:
            x = x + self.self_attn.out(prefill_attention(q, k, v))
        else:
            # One query per prompt over its chunk: decode attention (its XLA path shards everywhere).
            attn = decode_attention(pick(q), k_rows, v_rows, last_index + 1, impl="xla")
            x = pick(x) + self.self_attn.out(attn)
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def decode(self, x, positions, lengths, rope: Rope, cache: LayerCache, kv_len: int, attention_impl: str | None):
        """x [S, D], one token per slot at `positions` [S]; slot s attends to its first `lengths[s]` cache
        entries (0: an idle slot), all within the first `kv_len`."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x)[:, None], rope)
        cache = cache.write_tokens(positions, k[:, 0], v[:, 0])
        attn = decode_attention(q[:, 0], cache.k, cache.v, lengths, kv_len, k_scale=cache.k_scale,
                                v_scale=cache.v_scale, impl=attention_impl)
        x = x + self.self_attn.out(attn)
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    def __init__(self, c: TextConfig, dtype):
        self.config = c
        self.embed_tokens = param((c.vocab_size, c.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(c, dtype) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = None if c.tie_word_embeddings else param((c.hidden_size, c.vocab_size), dtype, ("embed", "vocab"))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens[...][tokens]

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, w, preferred_element_type=jnp.float32)

    def _layers(self, x: jax.Array, cache: KVCache, step) -> tuple[jax.Array, KVCache]:
        """Runs `step(layer, x, layer_cache)` through the unrolled layers, collecting each layer's cache."""
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = step(layer, x, layer_cache)
            new_cache.append(layer_cache)
        return x, new_cache

    def prefill(self, x: jax.Array, cache: KVCache, slots: jax.Array, last_index: jax.Array | None = None,
                context: PrefixContext | None = None) -> tuple[jax.Array, KVCache]:
        """x [B, L, D] -> hidden [B, L, D]; or, given `last_index` [B] (within the chunk), only each prompt's last
        hidden [B, D]. With a `context`, chunk b sits at positions context.starts[b] + 0..L-1."""
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        if context is not None:
            positions = positions + context.starts[:, None]
        rope = rope_table(positions, rope_frequencies(self.config))
        final = self.layers[-1] if last_index is not None else None
        return self._layers(x, cache, lambda layer, h, c: layer.prefill(
            h, rope, c, slots, last_index if layer is final else None, context))

    def decode(self, x: jax.Array, positions: jax.Array, lengths: jax.Array, cache: KVCache, kv_len: int,
               attention_impl: str | None = None) -> tuple[jax.Array, KVCache]:
        rope = rope_table(positions[:, None], rope_frequencies(self.config))
        return self._layers(x, cache, lambda layer, h, c: layer.decode(h, positions, lengths, rope, c, kv_len,
                                                                        attention_impl))


# ------------------------------------------------------------------------------------------------------ LLaVA


class Llava(nnx.Module):
    """LLaVA-1.5 / LLaVA-NeXT. Image features enter the prompt through one gather: `feature_index[b, l]` names
    the row of the flat feature array that replaces token l of prompt b (-1: keep the token's embedding;
    NEWLINE: the image_newline vector). All
    NeXT tiling/unpadding is index math done on the host (`anyres.py`)."""

    def __init__(self, cfg: LlavaConfig, dtype=jnp.float32):
        self.config = cfg
        self.vision_tower = ClipVisionTower(cfg.vision, cfg.vision_layers_used, dtype)
        self.multi_modal_projector = Projector(cfg, dtype)
        self.image_newline = param((cfg.text.hidden_size,), dtype, ("embed",)) if cfg.anyres else None
        self.language_model = LlamaModel(cfg.text, dtype)

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """pixels [N, C, S, S] tiles -> flat features [N * tokens_per_tile, D], tile-major."""
        n = self.config.vision.num_layers + 1
        layers = tuple(i if i >= 0 else n + i for i in self.config.feature_layers)
        h = self.vision_tower(pixels, layers)
        if self.config.feature_strategy == "default":
            h = h[:, 1:]
        return self.multi_modal_projector(h).reshape(-1, self.config.text.hidden_size)

    def embed(self, tokens: jax.Array, features: jax.Array | None, feature_index: jax.Array | None) -> jax.Array:
        """Token embeddings with image features spliced in: feature_index >= 0 takes that feature row,
        NEWLINE takes `image_newline`, -1 keeps the token."""
        x = self.language_model.embed(jnp.maximum(tokens, 0))
        if features is None:
            return x
        image = features[jnp.maximum(feature_index, 0)].astype(x.dtype)
        x = jnp.where((feature_index >= 0)[..., None], image, x)
        if self.image_newline is not None:
            x = jnp.where((feature_index == NEWLINE)[..., None], self.image_newline[...].astype(x.dtype), x)
        return x

    def prefill_hidden(self, tokens, features, feature_index, cache: KVCache, slots, last_index=None,
                       context: PrefixContext | None = None) -> tuple[jax.Array, KVCache]:
        """Runs prompt chunks (right-padded [B, L]: whole prompts, or what follows a cached prefix given a
        `context`) into cache rows `slots`; returns the final hidden states [B, L, D], or only those at
        `last_index` [B] when given ([B, D])."""
        x = self.embed(tokens, features, feature_index)
        return self.language_model.prefill(x, cache, slots, last_index, context)

    def prefill(self, tokens, features, feature_index, cache: KVCache, slots, last_index,
                context: PrefixContext | None = None):
        """`prefill_hidden`, then the logits at `last_index` [B] (each prompt's last real token) only."""
        last, cache = self.prefill_hidden(tokens, features, feature_index, cache, slots, last_index, context)
        return self.language_model.logits(last), cache

    def decode(self, tokens, positions, lengths, cache: KVCache, kv_len: int, attention_impl: str | None = None):
        """One token per slot: `tokens` [S] at `positions` [S]; `lengths` [S] is positions + 1 for a running slot
        and 0 for an idle one, whose cache the GPU kernel then skips. `attention_impl` None lets
        `decode_attention` choose."""
        x = self.language_model.embed(tokens)
        h, cache = self.language_model.decode(x, positions, lengths, cache, kv_len, attention_impl)
        return self.language_model.logits(h), cache

