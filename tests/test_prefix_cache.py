"""Prefix caching (`EngineConfig(enable_prefix_caching=True)`): a prompt that starts like content still in the KV
cache is prefilled only from there on, and gets exactly what it gets without the cache (and what transformers
gives). Also the pieces: block keys, the index, the hit rule, prefix copies and the attention of a continued
chunk."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxvlm import EngineConfig, GenerationConfig, pipeline
from jaxvlm.kernels.attention import context_attention, prefill_attention
from jaxvlm.kv_cache import LayerCache, quantize
from jaxvlm.prefix_cache import BLOCK, MAX_SUFFIX, PrefixIndex, prompt_keys, usable
from jaxvlm.prompts import Conversation, normalize_prompt
from jaxvlm.runner import Buckets
from jaxvlm.scheduler import CONTEXT_BUDGETS, EngineRequest, ImageInput, Scheduler
from test_engine import _reference_tokens  # tests/ is on sys.path (conftest.py)


def _image(seed: int, w: int = 60, h: int = 48) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _make(tiny, **kw):
    return pipeline(str(tiny.path), backend_config=EngineConfig(session_len=512, **kw))


# The engine's prefill lengths (powers of two from 32 up to 512 tokens).
_bucket = Buckets(max_len=4096, max_prefill_tokens=8192, num_slots=8).prefill_length


def _reused(pipe) -> int:
    return pipe.engine.prefix.reused_tokens


# A continued chunk and a whole prompt are different dot shapes; their float32 results agree to ~1e-6 (the runner
# asks for full float32 dots, which a GPU would otherwise run in TF32).
LOGPROB_TOLERANCE = 1e-4


def _assert_same(cached, plain, tolerance: float = LOGPROB_TOLERANCE):
    for a, b in zip(cached, plain, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        for top_a, top_b in zip(a.logprobs or (), b.logprobs or (), strict=True):
            assert top_a.keys() == top_b.keys()
            assert max(abs(top_a[t] - top_b[t]) for t in top_a) < tolerance, (top_a, top_b)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", ["llava15_hf_gqa", "llava_next_hf", "llava16_original"])
def test_repeated_images_reuse_the_cache_and_change_nothing(request, name):
    """Ten questions about three pictures (and a text prompt) in a four-slot engine: the later questions about
    a picture continue a slot's cached prefix (copied from a running slot or a freed one), every answer and
    its log-probabilities are those of the engine without the cache, and the first one is transformers'."""
    tiny = request.getfixturevalue(name)
    images = [_image(s) for s in range(3)]
    # short questions: the rest after a reused prefix may not exceed it, and the tiny tower's image is 16 tokens
    prompts = [(f"question {i}: what is it{' now' * (i % 3)}?", images[i % 3]) for i in range(10)]
    prompts.append("a prompt without any image about a red bus")
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=3)
    plain = _make(tiny, max_batch_size=4)(prompts, gen_config=gen)
    pipe = _make(tiny, max_batch_size=4, enable_prefix_caching=True)
    cached = pipe(prompts, gen_config=gen)
    _assert_same(cached, plain)
    # The first four fill the slots in one group (no copy within a group); the other six questions about a
    # picture then continue at least up to the block that holds its last feature.
    image = _ids_and_images(pipe, prompts[0])[1][0]
    assert _reused(pipe) >= 6 * ((image.start + len(image.layout)) // BLOCK * BLOCK)
    assert any(key[0] == "prefill" and key[-1] is not None for key in pipe.model.runner.compiled)
    assert cached[3].token_ids == _reference_tokens(pipe, tiny, prompts[3], 8)


def test_images_resized_on_the_device_reuse_the_cache(llava15_hf):
    """Device tiles are named by their host source (no read back); the same picture still finds its prefix."""
    images = [_image(s) for s in range(2)]
    prompts = [(f"question {i}: what is it?", images[i % 2]) for i in range(6)]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=3)
    plain = _make(llava15_hf, max_batch_size=2)(prompts, gen_config=gen)
    pipe = _make(llava15_hf, max_batch_size=2, enable_prefix_caching=True)
    pipe.processor.image_processor = dataclasses.replace(pipe.processor.image_processor, on_device=True)
    assert isinstance(_ids_and_images(pipe, prompts[0])[1][0].tiles, jax.Array)
    _assert_same(pipe(prompts, gen_config=gen), plain)
    assert _reused(pipe) > 0


def test_next_chat_turn_reuses_the_whole_first_turn(llava_next_hf):
    """The second turn of a chat about an image re-sends the first turn; its prefill starts after it (the image
    is not encoded again), and the answer is the one without the cache, and transformers'."""
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    turns = [("describe this picture", _image(5, 90, 40)), "and what colour is it?"]
    answers, sessions = {}, {}
    for caching in (False, True):
        pipe = _make(llava_next_hf, max_batch_size=2, enable_prefix_caching=caching)
        session = pipe.chat(turns[0], gen_config=gen)
        first_prompt = session.response.input_token_len
        before = _reused(pipe) if caching else 0
        session = pipe.chat(turns[1], session, gen_config=gen)
        answers[caching], sessions[caching] = session.response.token_ids, session
        if caching:
            assert _reused(pipe) - before >= first_prompt // BLOCK * BLOCK
            conversation = Conversation(messages=session.messages[:-1], images=session.images)  # the second turn
            assert answers[True] == _reference_tokens(pipe, llava_next_hf, conversation, 6)
    assert answers[True] == answers[False]


def test_a_slot_given_to_another_prompt_stops_serving_the_old_one(llava15_hf):
    """One slot: after a second picture's prompt takes it, a question about the first picture finds nothing
    cached; a further question about the same picture then continues the slot's own prefix in place."""
    x, y = _image(1), _image(2)
    prompts = [("what is this?", x), ("what is that?", y), ("and this one?", x), ("is it red?", x)]
    gen = GenerationConfig(max_new_tokens=5, ignore_eos=True, logprobs=2)
    plain = _make(llava15_hf, max_batch_size=1)
    pipe = _make(llava15_hf, max_batch_size=1, enable_prefix_caching=True)
    reused = []
    for prompt in prompts:
        _assert_same([pipe(prompt, gen_config=gen)], [plain(prompt, gen_config=gen)])
        reused.append(_reused(pipe))
    assert reused[:3] == [0, 0, 0] and reused[3] > 0


def test_int8_cache_continuations_track_the_full_prefill(llava_next_hf):
    """With quant_policy=8 a continued chunk reads its prefix quantized, as decode does: log-probabilities stay
    within the int8 cache's own tolerance (tests/test_engine.py) of those without prefix caching."""
    images = [_image(s) for s in range(2)]
    prompts = [(f"question {i} about it", images[i % 2]) for i in range(6)]
    gen = GenerationConfig(max_new_tokens=6, logprobs=4, ignore_eos=True)
    plain = _make(llava_next_hf, max_batch_size=2, quant_policy=8)(prompts, gen_config=gen)
    pipe = _make(llava_next_hf, max_batch_size=2, quant_policy=8, enable_prefix_caching=True)
    cached = pipe(prompts, gen_config=gen)
    assert _reused(pipe) > 0
    agree = 0
    for a, b in zip(cached, plain, strict=True):
        for token_a, token_b, top_a, top_b in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            if token_a != token_b:
                break
            agree += 1
            assert abs(top_a[token_a] - top_b[token_b]) < 0.08, (top_a, top_b)
    assert agree >= 0.8 * 6 * len(prompts)


def test_a_failed_prefill_leaves_nothing_recorded(llava15_hf):
    """If a prefill never reaches the device, its slots' content is not recorded, so no later prompt copies it."""
    pipe = _make(llava15_hf, max_batch_size=2, enable_prefix_caching=True)
    prompt, gen = ("what is this?", _image(3)), GenerationConfig(max_new_tokens=3, ignore_eos=True)
    runner = pipe.model.runner

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    runner.prefill = broken
    with pytest.raises(RuntimeError, match="device lost"):
        pipe(prompt, gen_config=gen)
    del runner.prefill
    keys = prompt_keys(*_ids_and_images(pipe, prompt)).keys
    assert pipe.engine.prefix.lookup(keys) == (0, -1)
    plain = _make(llava15_hf, max_batch_size=2)
    assert pipe(prompt, gen_config=gen).token_ids == plain(prompt, gen_config=gen).token_ids
    assert _reused(pipe) == 0


def _ids_and_images(pipe, prompt):
    request = pipe.processor.make_request(0, normalize_prompt(prompt), GenerationConfig())
    return request.token_ids, request.images


# ------------------------------------------------------------------------------------------------ keys, index


def _tile(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)


def test_keys_follow_tokens_and_image_content_not_placeholder_ids():
    layout = np.arange(40, dtype=np.int32)
    text = np.arange(100, dtype=np.int32) + 3
    ids = lambda placeholder: np.concatenate([text[:20], np.full(40, placeholder, np.int32), text[20:]])
    picture = lambda seed: [ImageInput(_tile(seed), layout, 20)]
    a = prompt_keys(ids(32000), picture(0))
    assert len(a.keys) == 140 // BLOCK  # full blocks only
    assert prompt_keys(ids(0), picture(0)).keys == a.keys  # original LLaVA's zeros: the pixels name the image
    other = prompt_keys(ids(32000), picture(1)).keys
    assert other[0] == a.keys[0] and other[1] != a.keys[1]  # diverges at the block holding the first image token
    changed = ids(32000)
    changed[120] += 1  # a later token (block 7): keys match until its block
    assert prompt_keys(changed, picture(0)).keys[:7] == a.keys[:7]
    assert prompt_keys(changed, picture(0)).keys[7] != a.keys[7]
    # generated tokens extend the prompt's blocks as if they were prompt tokens
    longer = np.concatenate([ids(32000), np.arange(30, dtype=np.int32)])
    assert a.extended(list(range(30))) == prompt_keys(longer, picture(0)).keys


def test_device_tiles_are_named_by_their_source_without_reading_them_back():
    class Unreadable:  # stands in for tiles still being resized on the device
        dtype, shape = np.dtype(np.uint8), (1, 8, 8, 3)

        def __array__(self, *args, **kwargs):
            raise AssertionError("the tiles were read back")

    layout = np.arange(40, dtype=np.int32)
    ids = np.arange(100, dtype=np.int32)
    picture = lambda seed: [ImageInput(Unreadable(), layout, 20, source=_tile(seed)[0])]
    keys = prompt_keys(ids, picture(0)).keys
    assert prompt_keys(ids, picture(0)).keys == keys
    assert prompt_keys(ids, picture(1)).keys[1] != keys[1]


def test_index_finds_the_longest_held_prefix_and_forgets_replaced_content():
    index = PrefixIndex()
    keys = prompt_keys(np.arange(64, dtype=np.int32), []).keys
    other = prompt_keys(np.arange(64, dtype=np.int32) + 1, []).keys
    assert index.lookup(keys) == (0, -1)
    index.hold(2, keys[:2])
    index.hold(5, keys)
    assert index.lookup(keys) == (64, 5)
    assert index.lookup(keys[:3] + other[3:]) == (48, 5)
    index.hold(5, other)  # slot 5 now holds something else
    assert index.lookup(keys) == (32, 2)
    index.hold(2, [])
    assert index.lookup(keys) == (0, -1) and index.lookup(other) == (64, 5)


def test_a_hit_is_used_only_for_a_short_rest_that_fits_the_slot():
    assert usable(608, 650, 1024, _bucket) == 608
    assert usable(640, 640, 1024, _bucket) == 639  # the last token is always computed
    assert usable(32, 650, 1024, _bucket) == 0  # saves less than it leaves
    assert usable(608 + MAX_SUFFIX, 608 + 2 * MAX_SUFFIX + 1, 4096, _bucket) == 0  # the rest is too long
    assert usable(992, 1000, 1024, _bucket) == 992 and usable(1000, 1020, 1024, _bucket) == 0  # 1000 + 32 > 1024
    assert usable(0, 10, 1024, _bucket) == 0


def test_prefill_groups_keep_whole_prompts_and_continuations_apart():
    index = PrefixIndex()
    shared = np.arange(200, dtype=np.int32) + 3
    request = lambda ids: EngineRequest(0, ids, [], GenerationConfig(max_new_tokens=4))
    held = request(np.concatenate([shared, [7, 8]]).astype(np.int32))
    index.hold(0, prompt_keys(held.token_ids, []).keys)
    sched = Scheduler(num_slots=8, session_len=512, max_prefill_tokens=4096, max_prefill_tiles=None, prefix=index)
    sched.free_slots = list(range(1, 8))
    continued = lambda tail: request(np.concatenate([shared, tail]).astype(np.int32))
    for r in (continued([9]), continued([10, 11]), request(np.arange(90, dtype=np.int32) + 5), continued([12])):
        sched.add(r)
    first = sched.admit(_bucket)
    assert [s.cached for s in first] == [192, 192] and [s.source for s in first] == [0, 0]
    assert [s.slot for s in first] == [1, 2]
    second = sched.admit(_bucket)
    assert [s.cached for s in second] == [0]  # a whole prompt: a group of its own
    assert [s.cached for s in sched.admit(_bucket)] == [192]
    assert index.reused_tokens == 3 * 192


def test_a_continuation_group_is_bounded_by_the_context_it_gathers():
    index = PrefixIndex()
    shared = np.arange(200, dtype=np.int32) + 3
    request = lambda tail: EngineRequest(0, np.concatenate([shared, tail]).astype(np.int32), [],
                                         GenerationConfig(max_new_tokens=4))
    index.hold(0, prompt_keys(request([7]).token_ids, []).keys)
    # 4 rows of 32 tokens fit the token budget (128 <= 256), but 4 rows of 192 + 32 positions do not fit
    # CONTEXT_BUDGETS x 256 = 512: groups of 2.
    sched = Scheduler(num_slots=8, session_len=512, max_prefill_tokens=256, max_prefill_tiles=None, prefix=index)
    sched.free_slots = list(range(1, 8))
    for tail in range(4):
        sched.add(request([10 + tail]))
    assert CONTEXT_BUDGETS == 2
    assert [[s.cached for s in sched.admit(_bucket)] for _ in range(2)] == [[192, 192], [192, 192]]


# ------------------------------------------------------------------------------------------------ device pieces


def test_prefix_copies_read_the_cache_as_it_was():
    """Slots 0 and 1 swap their first two positions in one copy; slot 2 and later positions are untouched;
    an int8 cache's scales move with their values."""
    values = jnp.arange(3, dtype=jnp.float32)[:, None, None, None] * jnp.ones((3, 2, 4, 8))
    k, scale = quantize(values + 1)
    cache = LayerCache(k, k, scale, scale).copy_prefix(jnp.array([1, 0]), jnp.array([0, 1]), 2)
    expected_slot = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [2, 2, 2, 2]])  # the source slot of each position
    for a, full in ((cache.k, k), (cache.k_scale, scale)):
        got = np.asarray(a)
        for slot in range(3):
            for pos in range(4):
                np.testing.assert_array_equal(got[slot, :, pos], np.asarray(full)[expected_slot[slot, pos], :, pos])


def test_a_continued_chunk_attends_like_the_whole_prompt():
    """context_attention of the rows past `start`, over a cache row holding the whole prompt's k/v, equals the
    causal attention over the whole prompt at those rows (GQA, two rows with different starts)."""
    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 2, 40, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d)))
    with jax.default_matmul_precision("float32"):
        whole = prefill_attention(q, k, v, impl="xla")
        starts, length = np.array([24, 30]), 8
        chunk = jnp.stack([q[i, s : s + length] for i, s in enumerate(starts)])
        out = context_attention(chunk, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(starts))
    for i, s in enumerate(starts):
        real = min(length, t - s)
        np.testing.assert_allclose(np.asarray(out[i, :real]), np.asarray(whole[i, s : s + real]), atol=1e-5)
