"""Incremental detokenization: the deltas add up to the whole text, and each step decodes a bounded window
(streaming and stop-word checks are linear in the answer length, not quadratic)."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from jaxvlm import EngineConfig, GenerationConfig, pipeline
from jaxvlm.detokenize import IncrementalDetokenizer, tail_text


class _CountingDecode:
    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, ids) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _stream(decode, ids) -> str:
    stream = IncrementalDetokenizer(decode)
    return "".join(stream.step(ids[: n + 1]) for n in range(len(ids)))


def test_deltas_add_up_and_windows_stay_short(llava15_hf):
    tokenizer = AutoTokenizer.from_pretrained(str(llava15_hf.path))
    rng = np.random.default_rng(0)
    multibyte = tokenizer.encode("café, naïve 東京 — 🚌 near the river", add_special_tokens=False)
    assert any(3 <= i < 259 for i in multibyte)  # characters outside the learned pieces: byte tokens
    for trial in range(20):
        # Random learned pieces (leading spaces, word parts) with byte-encoded characters spliced in.
        ids = rng.integers(259, 1000, size=300).tolist()
        at = int(rng.integers(0, 300))
        ids[at:at] = multibyte
        decode = _CountingDecode(tokenizer)
        assert _stream(decode, ids) == tokenizer.decode(ids, skip_special_tokens=True), trial
        assert decode.longest < 40, (trial, decode.longest)  # a window of a few tokens, never all of them


def test_an_unfinished_character_is_held_back(llava15_hf):
    tokenizer = AutoTokenizer.from_pretrained(str(llava15_hf.path))
    ids = tokenizer.encode("bus 東", add_special_tokens=False)
    stream = IncrementalDetokenizer(lambda x: tokenizer.decode(list(x)))
    parts = [stream.step(ids[: n + 1]) for n in range(len(ids))]
    assert "".join(parts) == "bus 東" and all("\ufffd" not in p for p in parts)
    assert parts[-2] == ""  # the first two of the character's three byte tokens give no text yet


def test_tail_text_holds_a_stop_word_that_just_ended(llava15_hf):
    tokenizer = AutoTokenizer.from_pretrained(str(llava15_hf.path))
    decode = lambda x: tokenizer.decode(list(x), skip_special_tokens=True)
    ids = tokenizer.encode("the cat sat on the mat " * 30 + "END of story", add_special_tokens=False)
    assert " of story" in tail_text(decode, ids, len(" of story"))
    assert len(tail_text(decode, ids, 3)) < 40


def test_streaming_with_a_stop_word_gives_text_before_the_end(llava15_hf):
    pipe = pipeline(str(llava15_hf.path), backend_config=EngineConfig(max_batch_size=2, session_len=256))
    prompt = "red bus house cat dog"
    free = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=40, ignore_eos=True))
    stop = pipe.processor.tokenizer.decode(free.token_ids[30:33])  # a multi-token word late in the answer
    gen = GenerationConfig(max_new_tokens=40, ignore_eos=True, stop_words=[stop])
    whole = pipe(prompt, gen_config=gen)
    deltas = list(pipe.stream_infer([prompt], gen_config=gen))
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert sum(1 for d in deltas if d.text) > 3  # text streamed out while generating, not all at the end
    assert deltas[-1].finish_reason == whole.finish_reason
