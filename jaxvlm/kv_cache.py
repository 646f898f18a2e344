"""The KV cache: its layout, its writes, and the int8 variant (LMDeploy's ``quant_policy=8``).

Each decoder layer holds k and v as [slots, kv_heads, max_len, head_dim]: heads-major, so attention reads each
head's keys contiguously (a token-major cache measured 1.5x slower decode on an H100: XLA relayouts it per step).

An int8 cache stores each (slot, head, token) vector as int8 values with one float32 scale (symmetric, the
vector's largest magnitude maps to 127): half the bytes of a bf16 cache plus 4 bytes per 128, so twice the
sequences fit and decode attention reads half as much. Attention never materialises dequantized keys: the key
scale multiplies the scores and the value scale the probabilities (`kernels/attention.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.model_config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [slots, kv_heads, max_len, head_dim]: the model's dtype, or int8
    v: jax.Array
    k_scale: jax.Array | None = None  # f32 [slots, kv_heads, max_len], int8 caches only
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write_prompt(self, slot: jax.Array, k: jax.Array, v: jax.Array) -> LayerCache:
        """k, v [1, kv_heads, L, head_dim]: a whole prompt into `slot`, positions 0..L-1 (in place)."""
        start = (slot, 0, 0, 0)
        put = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start[: cache.ndim])
        return self._write(put, k, v)

    def write_chunks(self, slots: jax.Array, starts: jax.Array, k: jax.Array, v: jax.Array) -> LayerCache:
        """k, v [B, L, kv_heads, head_dim]: chunk b into slot slots[b] at positions starts[b]..starts[b]+L-1, in
        one scatter for all rows (positions past the slot are dropped)."""
        positions = starts[:, None] + jnp.arange(k.shape[1])
        put = lambda cache, new: cache.at[slots[:, None], :, positions].set(new.astype(cache.dtype), mode="drop")
        return self._write(put, k, v)

    def copy_prefix(self, sources: jax.Array, slots: jax.Array, length: int) -> LayerCache:
        """Copies the first `length` positions of slot sources[b] into slot slots[b], for each b (one gather and
        one scatter). Every copy reads the cache as it was before any of them, so one slot may be both a source
        and a destination."""
        return jax.tree.map(lambda cache: cache.at[slots, :, :length].set(cache[sources, :, :length]), self)

    def rows(self, slots: jax.Array, length: int) -> LayerCache:
        """The first `length` positions of the given slots (a gathered copy, [B, kv_heads, length, ...])."""
        return jax.tree.map(lambda cache: cache[slots, :, :length], self)

    def write_tokens(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> LayerCache:
        """k, v [S, kv_heads, head_dim]: one token for each of slots 0..S-1, at `positions` [S]. Out-of-range
        positions are dropped, except for one slot, whose write is an in-place slice update that clamps them to
        the last column: XLA lowers a one-row scatter as that update plus a read and select of the old values
        (0.06 ms of a 5.4 ms batch-1 step on an H100). Only a finished sequence, still decoded as padding,
        runs past its slot, and its last column is never reused: a cached prefix is a prompt, which leaves room
        for an answer."""
        if k.shape[0] == 1:
            put = lambda cache, new: jax.lax.dynamic_update_slice(
                cache, new[:, :, None].astype(cache.dtype), (0, 0, positions[0], 0)[: cache.ndim])
        else:
            slot = jnp.arange(k.shape[0])
            put = lambda cache, new: cache.at[slot, :, positions].set(new.astype(cache.dtype), mode="drop")
        return self._write(put, k, v)

    def _write(self, put, k: jax.Array, v: jax.Array) -> LayerCache:
        """`put(array, new)` for each stored array: k and v, or (int8) their values and then their scales."""
        if not self.quantized:
            return LayerCache(put(self.k, k), put(self.v, v))
        (kq, ks), (vq, vs) = quantize(k), quantize(v)
        return LayerCache(put(self.k, kq), put(self.v, vq), put(self.k_scale, ks), put(self.v_scale, vs))


KVCache = list[LayerCache]


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] -> (int8 values, float32 scales [...]); x ~= values * scales[..., None]."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector stays zero
    return jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8), scale


def init_cache(cfg: TextConfig, num_slots: int, max_len: int, dtype) -> KVCache:
    """An empty cache; `dtype` int8 makes the quantized variant."""
    shape = (num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
    if jnp.dtype(dtype) != jnp.int8:
        return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
    return [LayerCache(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:3], jnp.float32),
                       jnp.zeros(shape[:3], jnp.float32)) for _ in range(cfg.num_layers)]


def bytes_per_token(cfg: TextConfig, dtype) -> int:
    """Cache bytes one token of one sequence takes, all layers (int8: values plus the float32 scales)."""
    per_head = cfg.head_dim * np.dtype(dtype).itemsize + (4 if np.dtype(dtype) == np.int8 else 0)
    return 2 * cfg.num_layers * cfg.num_kv_heads * per_head
