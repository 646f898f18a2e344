"""The engine: continuous batching gives each request exactly what it gets alone (and what transformers gives),
seeded sampling is batch-independent, every stopping rule, the session_len limits, bounded compilation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from jaxvlm import EngineConfig, GenerationConfig, pipeline
from jaxvlm.prompts import normalize_prompt

NEW = 12


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _prompts(n: int):
    rng = np.random.default_rng(1)
    words = "red bus house cat dog tree sky green blue small large picture".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 25))))
        k = i % 3
        images = [_image(int(rng.integers(10, 90)), int(rng.integers(10, 90)), 100 * i + j) for j in range(k)]
        out.append(text if k == 0 else (text, images))
    return out


def _make(tiny, **kw):
    return pipeline(str(tiny.path), backend_config=EngineConfig(**kw))


def _reference_tokens(pipe, tiny, prompt, new_tokens):
    """transformers' greedy tokens on exactly the ids and pixels jaxvlm's processor produced."""
    req = pipe.processor.make_request(0, normalize_prompt(prompt), GenerationConfig())
    ids = req.token_ids.copy()
    for im in req.images:
        ids[im.start : im.start + len(im.layout)] = tiny.image_token_index
    model = AutoModelForImageTextToText.from_pretrained(tiny.reference_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    kw = {}
    if req.images:
        if pipe.model.config.anyres:
            tiles = [im.pixel_values for im in req.images]
            width = max(t.shape[0] for t in tiles)
            padded = np.stack([np.concatenate([t, np.zeros((width - len(t), *t.shape[1:]), t.dtype)]) for t in tiles])
            kw["pixel_values"] = torch.tensor(padded)
            sizes = [pipe.processor.image_processor(im).image_size for im in normalize_prompt(prompt).images]
            kw["image_sizes"] = torch.tensor(sizes)
        else:
            kw["pixel_values"] = torch.tensor(np.concatenate([im.pixel_values for im in req.images]))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids[None].astype(np.int64)), max_new_tokens=new_tokens,
                             do_sample=False, **kw)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["llava15_hf_gqa", "llava_next_hf"])
def test_continuous_batching_equals_alone_and_transformers(request, name, caplog):
    tiny = request.getfixturevalue(name)
    prompts = _prompts(30)
    gen = GenerationConfig(max_new_tokens=NEW, ignore_eos=True)
    pipe = _make(tiny, max_batch_size=4, session_len=256)
    with caplog.at_level(logging.INFO, logger="jaxvlm.runner"):
        batched = pipe(prompts, gen_config=gen)
    compiled = sorted(pipe.model.runner.compiled)
    print(f"{len(compiled)} programs compiled for 30 mixed prompts: {compiled}")
    # Prefill: length buckets x batch buckets x image/no-image; decode: kv buckets. Bounded, whatever the mix.
    assert len(compiled) <= 24
    assert all(r.finish_reason == "length" and r.generate_token_len == NEW for r in batched)
    alone_pipe = _make(tiny, max_batch_size=1, session_len=256)
    for i in (0, 1, 2, 7, 29):
        alone = alone_pipe(prompts[i], gen_config=gen)
        assert alone.token_ids == batched[i].token_ids, i
        assert batched[i].token_ids == _reference_tokens(pipe, tiny, prompts[i], NEW), i
    for i in range(30):
        assert batched[i].index == i


def test_seeded_sampling_is_batch_independent(llava15_hf):
    pipe = _make(llava15_hf, max_batch_size=4, session_len=256)
    prompts = _prompts(6)
    seeded = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
                              random_seed=1234, ignore_eos=True)
    other = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, random_seed=7, ignore_eos=True)
    alone = pipe(prompts[2], gen_config=seeded)
    batch = pipe(prompts, gen_config=[other, other, seeded, other, other, other])
    assert batch[2].token_ids == alone.token_ids
    again = pipe(prompts[2], gen_config=seeded)
    assert again.token_ids == alone.token_ids
    different = pipe(prompts[2], gen_config=GenerationConfig(**{**seeded.to_dict(), "random_seed": 99}))
    assert different.token_ids != alone.token_ids
    greedy = pipe(prompts[2], gen_config=GenerationConfig(max_new_tokens=10, ignore_eos=True))
    top1 = pipe(prompts[2], gen_config=GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1,
                                                        random_seed=5, ignore_eos=True))
    assert top1.token_ids == greedy.token_ids


def test_stopping_rules(llava15_hf):
    pipe = _make(llava15_hf, max_batch_size=4, session_len=256)
    prompt = _prompts(1)[0]
    free = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=20, ignore_eos=True))
    ids = free.token_ids
    # stop_token_ids: generation ends at the first occurrence, which is not part of the output.
    stop = ids[5]
    first = ids.index(stop)
    r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=20, stop_token_ids=[stop]))
    assert r.finish_reason == "stop" and r.token_ids == ids[:first]
    # min_new_tokens bans stop ids until reached: the output then diverges or runs past that point.
    r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=20, stop_token_ids=[stop], min_new_tokens=first + 1))
    assert len(r.token_ids) >= first + 1 and stop not in r.token_ids[: first + 1]
    # stop_words given as text: a single-token word works like stop_token_ids.
    word = pipe.processor.tokenizer.convert_ids_to_tokens(stop)
    if len(pipe.processor.tokenizer.encode(word, add_special_tokens=False)) == 1:
        r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=20, stop_words=[word]))
        assert r.finish_reason == "stop" and r.token_ids == ids[:first]
    # A multi-token stop string cuts the text where it appears.
    text = pipe.processor.tokenizer.decode(ids[3:6])
    if len(pipe.processor.tokenizer.encode(text, add_special_tokens=False)) > 1 and text.strip():
        r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=20, stop_words=[text]))
        assert r.finish_reason == "stop" and text not in r.text
    # max_new_tokens and ignore_eos.
    r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert r.finish_reason == "length" and r.token_ids == ids[:3]
    # EOS from the generation config: banning everything but EOS makes it stop at once.
    eos = llava15_hf.eos_token_id
    everything_else = [t for t in range(llava15_hf.vocab_size) if t != eos]
    r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=5, bad_token_ids=everything_else))
    assert r.finish_reason == "stop" and r.token_ids == []
    r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=5, bad_token_ids=everything_else, ignore_eos=True))
    assert r.finish_reason == "length" and r.token_ids == [eos] * 5


def test_session_len_limits(llava15_hf):
    pipe = _make(llava15_hf, max_batch_size=2, session_len=64)
    short = "red bus"
    long_prompt = " ".join(["red bus house cat"] * 40)
    rs = pipe([short, long_prompt, short], gen_config=GenerationConfig(max_new_tokens=None, ignore_eos=True))
    assert rs[1].finish_reason == "error" and "session_len" in rs[1].error_message
    # max_new_tokens=None runs up to session_len; a larger max_new_tokens is cut there with 'length'.
    assert rs[0].finish_reason == "length" and rs[0].input_token_len + rs[0].generate_token_len == 64
    r = pipe(short, gen_config=GenerationConfig(max_new_tokens=500, ignore_eos=True))
    assert r.finish_reason == "length" and r.input_token_len + r.generate_token_len == 64
    assert rs[2].token_ids == rs[0].token_ids


def test_logprobs(llava15_hf):
    pipe = _make(llava15_hf, max_batch_size=2, session_len=128)
    r = pipe("red bus", gen_config=GenerationConfig(max_new_tokens=4, logprobs=3, ignore_eos=True))
    assert len(r.logprobs) == 4
    for token, top in zip(r.token_ids, r.logprobs):
        assert len(top) == 3 and token in top  # greedy: the chosen token is the most likely one
        assert max(top.values()) == top[token] and all(v <= 0 for v in top.values())


def test_prefill_buckets_pad_little_and_stay_few():
    """Past 512 tokens a prompt pads by under 1/8, past 1024 by under 1/16 (prefill is compute-bound), in steps of
    at least 64 tokens; below, powers of two; explicit buckets win; nothing exceeds the session."""
    from jaxvlm.runner import Buckets

    b = Buckets(max_len=4096, max_prefill_tokens=8192, num_slots=4)
    lengths = [b.prefill_length(n) for n in range(1, 4097)]
    assert all(n <= length <= 4096 for n, length in zip(range(1, 4097), lengths))
    assert all(length - n < n / 8 for n, length in zip(range(513, 4097), lengths[512:]))
    assert all(length - n < n / 16 for n, length in zip(range(1025, 4097), lengths[1024:]))
    assert lengths == sorted(lengths)
    assert sorted(set(lengths[512:])) == [512 + 64 * i for i in range(1, 25)] + [2048 + 128 * i for i in range(1, 17)]
    assert (b.prefill_length(655), b.prefill_length(2399)) == (704, 2432)
    assert Buckets(max_len=600, max_prefill_tokens=8192, num_slots=4).prefill_length(590) == 600
    assert Buckets(4096, 8192, 4, prefill_lengths=(100, 1000)).prefill_length(655) == 1000
    assert b.kv_length(655) == 768  # decode keeps its coarser buckets


def test_decode_rows_follow_the_highest_running_slot():
    """Decode computes slots 0..rows-1 only, rows the highest running slot + 1 padded to a power of four; the
    scheduler hands out the lowest free slot, so sequences stay packed low; dp replicas always decode every slot."""
    from jaxvlm.runner import Buckets
    from jaxvlm.scheduler import EngineRequest, Scheduler

    b = Buckets(max_len=1024, max_prefill_tokens=8192, num_slots=93)
    assert [b.decode_rows(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 93)] == [1, 4, 4, 16, 16, 64, 64, 93, 93]
    assert Buckets(1024, 8192, 8, dp=2).decode_rows(1) == 8
    sched = Scheduler(num_slots=4, session_len=64, max_prefill_tokens=4096, max_prefill_tiles=None)
    request = lambda i: EngineRequest(i, np.arange(3, 8, dtype=np.int32), [], GenerationConfig(max_new_tokens=4))
    for i in range(4):
        sched.add(request(i))
    seqs = sched.admit(lambda n: 32)
    assert [s.slot for s in seqs] == [0, 1, 2, 3]
    sched.finish(seqs[3], "length")
    sched.finish(seqs[1], "length")
    sched.add(request(4))
    assert [s.slot for s in sched.admit(lambda n: 32)] == [1]


def test_prefill_group_size_follows_tokens_tiles_and_free_slots():
    """A prefill group takes waiting requests in order while the padded rows fit the token budget, their tiles
    the vision batch, and slots are free; the first always goes, even over the budget."""
    from jaxvlm.scheduler import EngineRequest, ImageInput, Scheduler

    tile = np.zeros((1, 4, 4, 3), np.uint8)
    request = lambda length, tiles=0: EngineRequest(
        0, np.arange(length, dtype=np.int32), [ImageInput(tile, np.arange(1), 0)] * tiles, GenerationConfig())
    bucket = lambda n: -(-n // 32) * 32

    def group(prompts, slots=8, tokens=128, tiles=None):
        sched = Scheduler(num_slots=slots, session_len=512, max_prefill_tokens=tokens, max_prefill_tiles=tiles)
        for p in prompts:
            sched.add(request(*p))
        return sched.group_size(bucket)

    assert group([(30,)] * 6) == 4  # four 32-token rows fill 128 tokens
    assert group([(30,)] * 2 + [(60,)] * 3) == 2  # a longer prompt doubles every row's length
    assert group([(300,), (30,)]) == 1  # over the budget alone
    assert group([(30, 2)] * 4, tiles=5) == 2
    assert group([(30,)] * 6, slots=3) == 3
    assert group([(30,)] * 6, slots=0) == 0


def test_lone_and_shrinking_batches_decode_few_rows(llava15_hf):
    """A lone request in a many-slot engine decodes one row; as a batch's high slots finish, the rows shrink.
    Either way every request gets exactly its tokens alone."""
    pipe = _make(llava15_hf, max_batch_size=20, session_len=128)
    prompts = _prompts(6)
    budgets = [12, 10, 8, 6, 4, 2]  # prompt i takes slot i; the highest slots finish first
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in budgets]
    alone_pipe = _make(llava15_hf, max_batch_size=1, session_len=128)
    alone = [alone_pipe(p, gen_config=g).token_ids for p, g in zip(prompts, gens)]
    assert pipe(prompts[0], gen_config=gens[0]).token_ids == alone[0]
    assert {key[1] for key in pipe.model.runner.compiled if key[0] == "decode"} == {1}
    assert [r.token_ids for r in pipe(prompts, gen_config=gens)] == alone
    assert {key[1] for key in pipe.model.runner.compiled if key[0] == "decode"} == {1, 4, 16}


def test_first_prefill_waits_only_for_its_own_requests(llava15_hf):
    """The engine pulls requests (each prepared on the host: images, template, tokens) only until the next prefill
    group is complete: the first prefill starts once its own requests are ready, not after the whole batch is."""
    pipe = _make(llava15_hf, max_batch_size=8, session_len=128, max_prefill_token_num=128)
    gen = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    convs = [normalize_prompt(p) for p in _prompts(12) if isinstance(p, str)]  # text only: 64-token prefills
    pulled, at_prefill = [], []

    def requests():
        for i, conv in enumerate(convs):
            pulled.append(i)
            yield pipe.processor.make_request(i, conv, gen)

    runner = pipe.model.runner
    prefill = runner.prefill
    runner.prefill = lambda *a, **k: (at_prefill.append(len(pulled)), prefill(*a, **k))[1]
    try:
        events = list(pipe.engine.generate(requests()))
    finally:
        del runner.prefill
    lengths = [len(pipe.processor.make_request(0, c, gen).token_ids) for c in convs]
    assert 32 < max(lengths) <= 64
    # 128 tokens hold two 64-token prompts: the third one pulled shows that the group is complete
    assert at_prefill[0] == 3 < len(convs)
    assert sorted(e.seq.request.index for e in events if e.finished) == list(range(len(convs)))
    assert all(len(e.seq.output_ids) == 3 for e in events if e.finished)


def test_uint8_tiles_normalized_on_the_device_equal_the_host_pixels(llava_next_hf):
    """The processor hands the engine uint8 tiles and its value table; the device gather gives the vision
    tower exactly the float pixels that the host normalization (and transformers) gives."""
    from jaxvlm.image_processing import normalize_tiles

    pipe = _make(llava_next_hf, max_batch_size=1, session_len=256)
    processed, _ = pipe.processor.preprocess_image(_image(61, 23, 5))
    assert processed.tiles.dtype == np.uint8 and processed.num_tiles > 1
    runner = pipe.model.runner
    on_device = runner.encode_images(processed.tiles, processed.value_table)
    on_host = runner.encode_images(normalize_tiles(processed.tiles, processed.value_table))
    np.testing.assert_array_equal(np.asarray(on_device), np.asarray(on_host))
    assert {key[-1] for key in runner.compiled if key[0] == "vision"} == {"uint8", "float32"}


def test_int8_kv_cache_tracks_the_full_precision_cache(llava_next_hf):
    """quant_policy=8: the first token comes from prefill, which attends to the prompt's own k/v, so it is
    identical; every later step reads the int8 cache, and its log-probabilities stay within the quantization
    error of the full-precision cache's while the two choose the same tokens."""
    prompts = _prompts(6)
    gen = GenerationConfig(max_new_tokens=8, logprobs=4, ignore_eos=True)
    full = _make(llava_next_hf, max_batch_size=4, session_len=256)(prompts, gen_config=gen)
    pipe = _make(llava_next_hf, max_batch_size=4, session_len=256, quant_policy=8)
    layer = pipe.model.runner.cache[0]
    assert layer.k.dtype == np.int8 and layer.k_scale.dtype == np.float32
    int8 = pipe(prompts, gen_config=gen)
    compared = 0
    for a, b in zip(full, int8):
        assert a.token_ids[0] == b.token_ids[0] and a.logprobs[0] == b.logprobs[0]
        for token_a, token_b, top_a, top_b in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            if token_a != token_b:
                break
            assert abs(top_a[token_a] - top_b[token_b]) < 0.08, (top_a, top_b)  # measured: at most 0.04
            compared += 1
    assert compared >= 0.75 * 6 * 8  # most steps agree: the comparison covered them


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_models_ask_for_float32_dots(llava15_hf, dtype):
    """A float32 model's steps carry precision HIGHEST on their dots (XLA's default is TF32 on a GPU and one bf16
    pass on a TPU, so CPU results alone would not show it); a bfloat16 model's keep the default."""
    runner = _make(llava15_hf, max_batch_size=1, session_len=128, dtype=dtype).model.runner
    programs = [
        runner._decode.lower(runner._leaves, runner.cache, runner.state, rows=1, kv_len=64, greedy_only=True,
                             num_logprobs=0),
        runner._encode.lower(runner._leaves, np.zeros((1, 3, 32, 32), np.float32), None),
    ]
    for lowered in programs:
        text = lowered.as_text()
        assert "dot_general" in text
        assert ("HIGHEST" in text) == (dtype == "float32")
