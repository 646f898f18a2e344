"""The model runner: device-resident state and the jitted steps (vision, prefill, decode).

Everything that changes per step lives on the device: the KV cache, each slot's last token, position, step
count and sampling settings. The host only chooses shapes (buckets) and reads back the sampled tokens, so a
decode step sends nothing to the device. The NNX model is split once into a graph definition and a state
pytree; the jitted functions are pure and merge it back while tracing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxvlm import sampling, sharding
from jaxvlm.kv_cache import KVCache, init_cache
from jaxvlm.modeling import Llava, PrefixContext

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    tokens: jax.Array  # i32[S] last token of each slot: the next decode input
    positions: jax.Array  # i32[S] where that token goes in the cache
    steps: jax.Array  # i32[S] tokens generated so far (the RNG step of a seeded request)
    min_new: jax.Array  # i32[S] stop ids are banned while steps < min_new
    active: jax.Array  # bool[S] the slot holds a running sequence (idle slots' caches are not read)
    sampling: sampling.SamplingState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillBatch:
    """A padded batch of prompts; rows past the real ones repeat row 0, so they rewrite identical values."""

    tokens: jax.Array  # i32[B, L]
    feature_index: jax.Array  # i32[B, L] row of the image features replacing each token, -1 for text
    slots: jax.Array  # i32[B]
    lengths: jax.Array  # i32[B]
    min_new: jax.Array  # i32[B]
    params: sampling.SlotParams  # per row, leading dim B
    seen_ids: jax.Array  # i32[B, W] the whole prompt's text ids, for the repetition penalty (-1 padding)
    # Prefix caching: each row's chunk continues the first starts[b] positions of slot sources[b] (None: whole
    # prompts). tokens and feature_index then hold the chunk only; lengths stay the whole prompts' lengths.
    starts: jax.Array | None = None  # i32[B]
    sources: jax.Array | None = None  # i32[B]


def _full_precision_dots(fn):
    """`fn` traced with float32 dots at full precision. XLA's default is TF32 on a GPU (10 mantissa bits) and one
    bf16 pass on a TPU, where a float32 checkpoint is expected to compute as transformers' float32 does."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return traced


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _length_bucket(n: int, floor: int) -> int:
    """Decode's cache-read buckets: powers of two up to 512, then multiples of 256. Padding stays under 1/3 for
    long sequences while few programs exist, since each new one compiles mid-generation (prefill, which is
    compute-bound, uses finer ones: `Buckets.prefill_length`)."""
    return _pow2_at_least(n, floor) if n <= 512 else -(-n // 256) * 256


@dataclasses.dataclass
class Buckets:
    """The shapes programs are compiled for; every request is padded up to one of them."""

    max_len: int  # cache length per slot (session_len)
    max_prefill_tokens: int
    num_slots: int
    prefill_lengths: tuple[int, ...] = ()  # explicit buckets (EngineConfig.prefill_buckets), else the rule
    dp: int = 1  # data-parallel replicas splitting the slots

    def prefill_length(self, n: int) -> int:
        """Prefill is compute-bound, so its padding costs in full: past 512 tokens its buckets are sixteen per
        octave in steps of at least 64 tokens (576, 640, ..., 1024, 1088, ..., 2048, 2176, ...), padding under
        1/8 up to 1024 and under 1/16 past it. A 655-token llava-1.5 prompt pads to 704, not 768; a 2,399-token
        llava-1.6 one to 2,432, not 2,560 (1.7 ms of a 7B prefill on an H100). Decode keeps the coarser rule: it
        is bandwidth-bound, and each new bucket there is a program compiled mid-generation."""
        if self.prefill_lengths:
            return next((b for b in self.prefill_lengths if b >= n), self.max_len)
        if n <= 512:
            return min(self.max_len, _pow2_at_least(n, 32))
        step = max(64, 1 << (n.bit_length() - 5))  # a sixteenth of n's octave, but never under 64 tokens
        return min(self.max_len, -(-n // step) * step)

    def prefill_batch(self, n: int, length: int) -> int:
        """Rows of a prefill of n prompts padded to `length`: a power of two within the token budget."""
        cap = max(1, self.max_prefill_tokens // length)
        return min(_pow2_at_least(n), 1 << (cap.bit_length() - 1))

    def decode_rows(self, used: int) -> int:
        """Rows a decode step computes: the first `used` slots (the highest running slot + 1), padded to a power
        of four (1, 4, 16, 64, ...) up to all slots. A lone request in a many-slot engine then decodes one row,
        not every slot's; the scheduler hands out the lowest free slot, so running sequences stay packed low.
        dp replicas split the slots, so there every step covers them all."""
        if self.dp > 1:
            return self.num_slots
        rows = 1
        while rows < used:
            rows *= 4
        return min(rows, self.num_slots)

    def kv_length(self, longest: int) -> int:
        """Cache columns a decode step reads (the longest running sequence, bucketed)."""
        return min(self.max_len, _length_bucket(longest, 64))

    def tiles(self, n: int) -> int:
        """Vision batch: exact up to 8 tiles (a NeXT image is 3 or 5), then powers of two."""
        return n if n <= 8 else _pow2_at_least(n)


class ModelRunner:
    def __init__(self, model: Llava, num_slots: int, max_len: int, cache_dtype, max_prefill_tokens: int = 8192,
                 prefill_lengths: Sequence[int] = (), mesh: Mesh | None = None):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        # Flattened once: the jitted steps take the leaf list, because flattening the nnx State on every call
        # costs ~0.7 ms of host time per step for a 7B tree (a plain list: ~0.1 ms).
        self._leaves, self._treedef = jax.tree.flatten(self.params)
        dp = mesh.shape[sharding.DP] if mesh is not None else 1
        self.buckets = Buckets(max_len, max_prefill_tokens, num_slots, tuple(prefill_lengths), dp)
        vocab = self.config.text.vocab_size
        self.cache: KVCache = init_cache(self.config.text, num_slots, max_len, cache_dtype)
        zeros = lambda: jnp.zeros((num_slots,), jnp.int32)  # distinct buffers: each is donated
        self.state = DecodeState(zeros(), zeros(), zeros(), zeros(), jnp.zeros((num_slots,), bool),
                                 sampling.init_state(num_slots, vocab))
        self._constrain = lambda cache, state, out: (cache, state, out)
        # The Pallas decode kernel is a custom call XLA cannot split across devices: under tp/dp it would gather
        # the sharded cache onto each device. Sharded programs keep the XLA path (splitting the kernel with
        # shard_map needs a multi-GPU machine to measure).
        self._attention_impl = "xla" if mesh is not None and mesh.size > 1 else None
        if mesh is not None:
            shardings = sharding.state_shardings(mesh, self.config.text.num_kv_heads, self.cache, self.state)
            self.cache, self.state = jax.device_put((self.cache, self.state), shardings)
            # Pin cache and state to the inputs' layout so donation reuses the buffers in place. The sampled
            # tokens are replicated (a few bytes): every process can then read them, also when dp splits the
            # slots across hosts (a dp-sharded output would span devices that another process owns).
            replicated = NamedSharding(mesh, PartitionSpec())
            self._constrain = lambda cache, state, out: (
                *jax.lax.with_sharding_constraint((cache, state), shardings),
                jax.lax.with_sharding_constraint(out, replicated),
            )
        self.compiled: set[tuple] = set()
        exact = _full_precision_dots if model.language_model.embed_tokens.dtype == jnp.float32 else lambda f: f
        self._encode = jax.jit(exact(self._encode_fn))
        self._prefill = jax.jit(exact(self._prefill_fn), static_argnames=("num_logprobs", "context_len"),
                                donate_argnames=("cache", "state"))
        self._release = jax.jit(
            lambda state, idle: dataclasses.replace(state, active=state.active & ~idle), donate_argnums=0)
        self._decode = jax.jit(exact(self._decode_fn),
                               static_argnames=("rows", "kv_len", "greedy_only", "num_logprobs"),
                               donate_argnames=("cache", "state"))

    # ------------------------------------------------------------------------------------------ pure steps

    def _model(self, leaves) -> Llava:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))

    def _encode_fn(self, leaves, pixels, value_table):
        if value_table is not None:  # uint8 [N, S, S, C] tiles: the processor's rescale + normalize as a gather
            pixels = value_table[jnp.arange(pixels.shape[-1]), pixels.astype(jnp.int32)].transpose(0, 3, 1, 2)
        return self._model(leaves).encode_images(pixels)

    def _prefill_fn(self, leaves, cache, state: DecodeState, batch: PrefillBatch, features, *, num_logprobs: int,
                    context_len: int | None):
        model = self._model(leaves)
        last_index, context = batch.lengths - 1, None
        if batch.starts is not None:
            last_index = last_index - batch.starts
            context = PrefixContext(batch.starts, batch.sources, context_len)
        logits, cache = model.prefill(batch.tokens, features, batch.feature_index, cache, batch.slots, last_index,
                                      context)
        sstate = state.sampling
        for b in range(batch.tokens.shape[0]):
            row = jax.tree.map(lambda a: a[b], batch.params)
            sstate = sampling.set_slot(sstate, batch.slots[b], row, batch.seen_ids[b])
        rows = jax.tree.map(lambda a: a[batch.slots], sstate)
        zeros = jnp.zeros_like(batch.slots)
        out, rows = sampling.sample(logits, rows, zeros, batch.min_new > 0, greedy_only=False, num_logprobs=num_logprobs)
        sstate = jax.tree.map(lambda a, r: a.at[batch.slots].set(r), sstate, rows)
        state = DecodeState(
            tokens=state.tokens.at[batch.slots].set(out.tokens),
            positions=state.positions.at[batch.slots].set(batch.lengths),
            steps=state.steps.at[batch.slots].set(1),
            min_new=state.min_new.at[batch.slots].set(batch.min_new),
            active=state.active.at[batch.slots].set(True),
            sampling=sstate,
        )
        cache, state, out = self._constrain(cache, state, out)
        return cache, state, out

    def _decode_fn(self, leaves, cache, state: DecodeState, *, rows: int, kv_len: int, greedy_only: bool,
                   num_logprobs: int):
        """One token for each of the first `rows` slots (the cache keeps all slots; the others are untouched)."""
        model = self._model(leaves)
        head = jax.tree.map(lambda a: a[:rows], state)
        lengths = jnp.where(head.active, head.positions + 1, 0)
        logits, cache = model.decode(head.tokens, head.positions, lengths, cache, kv_len, self._attention_impl)
        ban_stop = head.steps < head.min_new
        out, sstate = sampling.sample(logits, head.sampling, head.steps, ban_stop, greedy_only=greedy_only,
                                      num_logprobs=num_logprobs)
        head = DecodeState(out.tokens, head.positions + 1, head.steps + 1, head.min_new, head.active, sstate)
        state = jax.tree.map(lambda a, h: a.at[:rows].set(h), state, head)
        cache, state, out = self._constrain(cache, state, out)
        return cache, state, out

    # ------------------------------------------------------------------------------------------ host side

    def _note_compile(self, key: tuple) -> None:
        if key not in self.compiled:
            self.compiled.add(key)
            log.info("compiling %s (%d programs so far)", key, len(self.compiled))

    def encode_images(self, pixels: np.ndarray | jax.Array, value_table: np.ndarray | None = None) -> jax.Array:
        """Tiles -> flat features, padded to a tile bucket; returns the padded feature rows. Tiles are f32 [N, C,
        S, S] normalized pixels, or uint8 [N, S, S, C] with the [C, 256] table that normalizes them (a quarter of
        the bytes to transfer, and no host pass over the pixels)."""
        n = pixels.shape[0]
        padded = self.buckets.tiles(n)
        if padded > n:
            xp = jnp if isinstance(pixels, jax.Array) else np
            pixels = xp.concatenate([pixels, xp.zeros((padded - n, *pixels.shape[1:]), pixels.dtype)])
        self._note_compile(("vision", padded, pixels.dtype.name))
        return self._encode(self._leaves, pixels, value_table)

    def prefill(self, batch: PrefillBatch, features: jax.Array | None, num_logprobs: int,
                context_len: int | None = None) -> sampling.SampleOutput:
        """Prompt chunks into their slots; `context_len` (with batch.starts): the cache columns that chunks
        continuing a cached prefix copy and attend over, covering every chunk's end."""
        self._note_compile(("prefill", *batch.tokens.shape, features is not None and features.shape[0], num_logprobs,
                            context_len))
        self.cache, self.state, out = self._prefill(self._leaves, self.cache, self.state, batch, features,
                                                    num_logprobs=num_logprobs, context_len=context_len)
        return out

    def release(self, slots: Sequence[int]) -> None:
        """Marks finished sequences' slots idle, so that decode attention stops reading their caches."""
        idle = np.zeros(self.buckets.num_slots, bool)
        idle[list(slots)] = True
        self.state = self._release(self.state, idle)

    def decode(self, longest: int, used: int, greedy_only: bool, num_logprobs: int) -> sampling.SampleOutput:
        """One decode step for slots 0..used-1 (`used`: the highest running slot + 1; `longest`: the longest
        running sequence). The output's rows are slots 0..decode_rows(used)-1."""
        rows, kv_len = self.buckets.decode_rows(used), self.buckets.kv_length(longest)
        self._note_compile(("decode", rows, kv_len, greedy_only, num_logprobs))
        self.cache, self.state, out = self._decode(self._leaves, self.cache, self.state, rows=rows, kv_len=kv_len,
                                                   greedy_only=greedy_only, num_logprobs=num_logprobs)
        return out
