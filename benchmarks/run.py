#!/usr/bin/env python3
"""jaxvlm vs transformers on LLaVA-1.5-7B / LLaVA-1.6-vicuna-7B shaped checkpoints, in one command.

    python benchmarks/run.py [--json out.json] [--only NAMES] [--skip NAMES] [--smoke]

Offline by construction: random-weight bf16 checkpoints with the real llava-hf configs, a generated
32000-piece LLaMA-like tokenizer and generated images are written to --model-dir (once) and reused.

The measurements run in child processes ("phases": one per system and mode, plus the warm starts), for three
reasons: each system gets the whole GPU (no torch allocator holding memory while JAX runs, or the reverse), a
phase that hangs or crashes is killed without losing the others, and "process start to first answer" is
measured on a real fresh process. The parent imports neither torch nor jax; it runs the phases in priority
order under one time budget (--budget), prints a timestamp per phase and rewrites the JSON after each, so a run
cut short still leaves what it measured. See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ model shapes

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
TOKENIZER_BASE = 32000  # pieces before <image> and <pad>, as in LLaMA's vocabulary
MODEL_VOCAB = 32064  # llava-hf pads the embedding rows to a multiple of 64

CLIP_VIT_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

VICUNA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "vocab_size": MODEL_VOCAB,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": PAD_TOKEN_ID,
}

# --smoke: the same structure at toy sizes, with 56-px tiles (16 patches) so CPU prefills stay short.
SMOKE_TILE = 56
TINY_VISION = dict(CLIP_VIT_L_336, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=32, image_size=SMOKE_TILE)
TINY_TEXT = dict(VICUNA_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16)

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (height, width) in pixels

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def pinpoints(tile: int) -> list[list[int]]:
    return [[p * tile // 336 for p in pair] for pair in NEXT_PINPOINTS]


def llava_config(version: str, vision: dict, text: dict) -> dict:
    """config.json fields of llava-hf/llava-1.5-7b-hf ("1.5") or llava-hf/llava-v1.6-vicuna-7b-hf ("1.6")."""
    tile = vision["image_size"]
    common = {
        "vision_config": dict(vision),
        "text_config": dict(text),
        "image_token_index": IMAGE_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": (tile // vision["patch_size"]) ** 2,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_TOKEN_ID,
    }
    if version == "1.5":
        return dict(common, model_type="llava", architectures=["LlavaForConditionalGeneration"])
    return dict(common, model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                image_grid_pinpoints=pinpoints(tile), use_image_newline_parameter=True)


# Each checkpoint directory is named like its hub repository, so jaxvlm matches the chat template by path.
MODEL_DIRS = {("1.5", False): "llava-1.5-7b-hf", ("1.6", False): "llava-v1.6-vicuna-7b-hf",
              ("1.5", True): "llava-1.5-tiny-hf", ("1.6", True): "llava-v1.6-vicuna-tiny-hf"}

# The llava-v1 template jaxvlm picks for these paths (api-contract.md); transformers gets the identical string.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
VICUNA_JINJA = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for p in parts %}{{ p['text'] }}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for p in parts if p['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def hf_prompt(text: str) -> str:
    return f"{LLAVA_V1_SYSTEM} USER: <image>\n{text} ASSISTANT:"


# ------------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass
class Settings:
    """Everything a phase needs; the parent serialises it into each child's spec."""

    smoke: bool
    model_dir: str
    new_tokens: int
    counts: list[int]  # offline throughput request counts
    text_tokens: int  # text tokens per request (besides the image and the template)
    ttft_reps: int
    decode_reps: int
    first_answer_tokens: int
    bandwidth_bytes: int
    session_len_15: int
    session_len_16: int

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def shapes(self) -> tuple[dict, dict]:
        """(vision config, text config) of the benchmark models."""
        return (TINY_VISION, TINY_TEXT) if self.smoke else (CLIP_VIT_L_336, VICUNA_7B)

    def image(self, version: str, seed: int = 0):
        """The request image: 336x336 for LLaVA-1.5, 640x480 for LLaVA-1.6 (both at any tile size)."""
        return make_image(336, 336, seed) if version == "1.5" else make_image(640, 480, seed)

    def model_path(self, version: str) -> str:
        return str(Path(self.model_dir) / MODEL_DIRS[(version, self.smoke)])

    @property
    def requests_file(self) -> str:
        return str(Path(self.model_dir) / ("requests-tiny.json" if self.smoke else "requests.json"))


def make_settings(args: argparse.Namespace) -> Settings:
    smoke = args.smoke
    counts = [int(c) for c in (args.requests or ("4" if smoke else "64,256")).split(",")]
    # smoke: enough tokens that decoding, not timer noise, dominates t(N) - TTFT on a busy CPU
    new_tokens = args.new_tokens or (24 if smoke else 128)
    return Settings(
        smoke=smoke, model_dir=args.model_dir, new_tokens=new_tokens, counts=counts, text_tokens=40,
        ttft_reps=3 if smoke else 7, decode_reps=2 if smoke else 3, first_answer_tokens=8,
        bandwidth_bytes=(16 << 20) if smoke else (4 << 30),
        # prompt (1.5: 576 image tokens + ~100 of template and text; 1.6 at 640x480: 2,340 + ~100) + new tokens
        session_len_15=1024 if not smoke else 256, session_len_16=2560 if not smoke else 512,
    )


# ------------------------------------------------------------------------------------------------ inputs


def make_image(width: int, height: int, seed: int):
    """A gradient with noise (not compressible to nothing, different per seed): no downloads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 255 * (x + y) / (width + height)], axis=-1)
    noisy = base * 0.8 + rng.uniform(0, 51, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def load_requests(settings: Settings) -> list[str]:
    return json.loads(Path(settings.requests_file).read_text())["texts"]


_WORDS = ("picture image photo scene describe detail color shape light shadow left right top bottom center "
          "person animal tree house road river sky cloud water table chair window door street city field "
          "small large bright dark red green blue yellow white black what where how many which near far "
          "above below inside outside front back standing sitting walking moving looking holding").split()


def make_texts(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` different questions of about `tokens` text tokens each (by the checkpoint's own tokenizer)."""
    import random

    texts = []
    for i in range(count):
        rng = random.Random(i)
        words = [rng.choice(_WORDS)]
        length = lambda: len(tokenizer.encode(" ".join(words) + "?", add_special_tokens=False).ids)
        while length() < tokens:
            words.append(rng.choice(_WORDS))
        if length() > tokens and len(words) > 1:
            words.pop()
        texts.append(" ".join(words) + "?")
    return texts


# ------------------------------------------------------------------------------------------------ checkpoints


def build_tokenizer():
    """A LLaMA-like BPE: <unk>/<s>/</s> = 0/1/2, 256 byte-fallback pieces, then generated pieces up to 32000:
    characters, whole words of the template and of the questions (so prompts have realistic lengths), then
    letter pairs and triples with and without the word-start mark '▁'; <image> = 32000, <pad> = 32001."""
    import itertools
    import re
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    vocab += ["\u2581"] + list(string.ascii_letters + string.digits + ".,;:!?'\"()-")
    merges: list[tuple[str, str]] = []
    known = set(vocab)

    def pieces():
        words = re.findall(r"[A-Za-z]+", f"{LLAVA_V1_SYSTEM} USER ASSISTANT {' '.join(_WORDS)}")
        for word in dict.fromkeys(words):
            for end in range(2, len(word) + 2):  # every prefix of "▁word", so each merge has both halves
                yield ("\u2581" + word)[:end]
        for c in string.ascii_letters + string.digits:
            yield "\u2581" + c
        low = string.ascii_lowercase
        for n in (2, 3):
            for prefix in ("", "\u2581"):
                for combo in itertools.product(low, repeat=n):
                    yield prefix + "".join(combo)

    for piece in pieces():
        if len(vocab) == TOKENIZER_BASE:
            break
        left, right = piece[:-1], piece[-1]
        if piece not in known and left in known and right in known:  # BPE: a merge joins two known pieces
            vocab.append(piece)
            known.add(piece)
            merges.append((left, right))
    assert len(vocab) == TOKENIZER_BASE, len(vocab)

    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(vocab)}, merges=merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID and tok.token_to_id("<pad>") == PAD_TOKEN_ID
    return tok


def write_tokenizer_and_processor(directory: Path, version: str, tok, vision: dict) -> None:
    """tokenizer + preprocessor + processor files as the llava-hf hub repositories carry them."""
    tok.save(str(directory / "tokenizer.json"))
    special = {0: "<unk>", 1: "<s>", 2: "</s>", IMAGE_TOKEN_ID: "<image>", PAD_TOKEN_ID: "<pad>"}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in special.items()},
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "padding_side": "left",
        "chat_template": VICUNA_JINJA,
    })
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    processor_class = "LlavaProcessor" if version == "1.5" else "LlavaNextProcessor"
    tile = vision["image_size"]
    image = {
        "crop_size": {"height": tile, "width": tile}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": tile},
        "processor_class": processor_class,
    }
    if version == "1.5":
        image["image_processor_type"] = "CLIPImageProcessor"
    else:
        image.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=pinpoints(tile),
                     do_pad=True)
    _write_json(directory / "preprocessor_config.json", image)
    _write_json(directory / "processor_config.json", {
        "processor_class": processor_class, "patch_size": vision["patch_size"],
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": "<image>",
    })
    _write_json(directory / "chat_template.json", {"chat_template": VICUNA_JINJA})
    _write_json(directory / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_TOKEN_ID})


def write_checkpoint(directory: Path, version: str, vision: dict, text: dict, tok, device: str) -> bool:
    """Writes one random bf16 checkpoint (model built on the device, then save_pretrained) unless one with the same
    config is there; returns whether it wrote. Tokenizer and processor files are rewritten either way
    (milliseconds), so they always match this script."""
    import torch
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    cfg = llava_config(version, vision, text)
    marker = directory / "bench_complete.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        write_tokenizer_and_processor(directory, version, tok, vision)
        return False
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    cls, config_cls = ((LlavaForConditionalGeneration, LlavaConfig) if version == "1.5"
                       else (LlavaNextForConditionalGeneration, LlavaNextConfig))
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    config.architectures = cfg["architectures"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(config)  # random init, directly on the device in bf16: seconds even for 7B
    finally:
        torch.set_default_dtype(default)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    write_tokenizer_and_processor(directory, version, tok, vision)
    _write_json(marker, cfg)
    return True


def phase_checkpoints(spec: dict, rec: Recorder) -> None:
    """Writes the missing checkpoints (`write_checkpoint`), then the request texts."""
    s = Settings(**spec["settings"])
    vision, text = s.shapes
    tok = build_tokenizer()
    for version in ("1.5", "1.6"):
        t0 = time.perf_counter()
        directory = Path(s.model_path(version))
        if write_checkpoint(directory, version, vision, text, tok, s.device):
            rec.put(f"written_{version}_s", time.perf_counter() - t0)
        else:
            rec.put(f"reused_{version}", str(directory))
    texts = make_texts(tok, max(s.counts), s.text_tokens)
    _write_json(Path(s.requests_file), {"text_tokens": s.text_tokens, "texts": texts})


def count_params(cfg: dict) -> dict:
    """Parameter counts by part, from the config alone (for the roofline)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    d, ff, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    hd = t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * ff + 2 * d
    embed = t["vocab_size"] * d
    vd, vff, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    vision = (vl * (4 * vd * vd + 4 * vd + 2 * vd * vff + vff + vd + 4 * vd)
              + 3 * v["patch_size"] ** 2 * vd + vd + patches * vd + 4 * vd)
    projector = vd * d + d + d * d + d
    return {"decoder_layers": layers * per_layer, "final_norm": d, "lm_head": embed, "embed_tokens": embed,
            "vision_tower": vision, "projector": projector}


# ------------------------------------------------------------------------------------------------ measurements


def phase_bandwidth(spec: dict, rec: Recorder) -> None:
    """Device memory bandwidth: a jitted elementwise copy (read N + write N bytes), back-to-back calls."""
    import jax
    import jax.numpy as jnp

    nbytes = spec["bytes"]
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)  # `a + 1` so XLA cannot elide it; as memory-bound as a plain copy
    copy(x).block_until_ready()
    calls, trials = 10, 5
    per_call = []
    for _ in range(trials):
        y = x
        t0 = time.perf_counter()
        for _ in range(calls):
            y = copy(y)
        y.block_until_ready()
        per_call.append((time.perf_counter() - t0) / calls)
    moved = 2 * (nbytes // 4) * 4
    rec.put("bytes_per_call", moved)
    rec.put("device", str(jax.devices()[0].device_kind))
    rec.put("best_GBps", moved / min(per_call) / 1e9)
    rec.put("median_GBps", moved / statistics.median(per_call) / 1e9)


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


class WarmupClock:
    """Sums the wall time of warm-up calls (compiles happen there) and publishes the running total."""

    def __init__(self, rec: Recorder):
        self.rec, self.total = rec, 0.0

    def run(self, what: str, fn, *args, **kwargs):
        dt, out = _timed(fn, *args, **kwargs)
        self.total += dt
        self.rec.put(f"warmup_{what}_s", dt)
        self.rec.put("warmup_s", self.total)
        return out


def _decode_rate(new_tokens: int, full_s: float, ttft_s: float) -> float | str:
    """Tokens after the first over the time after the first; a string when noise makes that meaningless."""
    if full_s <= ttft_s:
        return f"invalid: t({new_tokens} tokens) {full_s:.4f}s <= TTFT {ttft_s:.4f}s"
    return (new_tokens - 1) / (full_s - ttft_s)


def _first_answer(rec: Recorder, fn) -> Any:
    """Process start (stamped by the parent just before it spawned us) to the first complete answer."""
    out = fn()
    rec.put("first_answer_s", time.time() - float(os.environ["BENCH_SPAWN_TIME"]))
    return out


def _free_jax(rec: Recorder) -> None:
    """Drops everything the last pipeline compiled and allocated, so the next one plans its KV cache from
    the whole device again; records what is still allocated (0 unless something leaked)."""
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    rec.put("live_arrays_after_free", len(jax.live_arrays()))
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        rec.put("bytes_in_use_after_free", stats["bytes_in_use"])


def phase_jaxvlm(spec: dict, rec: Recorder) -> None:
    """jaxvlm through its public pipeline API, one pipeline per step (freed before the next)."""
    import jax

    import jaxvlm

    rec.put("device", str(jax.devices()[0].device_kind))
    rec.put("versions", {"jax": jax.__version__, "jaxvlm": jaxvlm.__version__})
    s = Settings(**spec["settings"])
    for i, step in enumerate(spec["steps"]):
        if i == 1:
            # The persistent cache serves the cold/warm start pair (the first step). Later steps compile from
            # scratch, so that a program one step shares with another (e.g. the vision tower at 8 tiles) does
            # not make a warm-up look cheaper than it is.
            from jax.experimental.compilation_cache import compilation_cache

            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()  # JAX decides once per process whether to use it: ask again
        _jaxvlm_step(s, step, spec["cache_dir"] if i == 0 else None, rec.sub(step["name"]))
        _free_jax(rec.sub(step["name"]))


def _jaxvlm_step(s: Settings, step: dict, cache_dir: str | None, rec: Recorder) -> None:
    """One pipeline; step["tasks"] names what to measure: first (process start to first answer), ttft, decode
    (needs ttft), throughput."""
    import jaxvlm
    from jaxvlm import EngineConfig, GenerationConfig
    from jaxvlm.prefix_cache import PrefixIndex

    version, tasks = step["version"], step["tasks"]
    t0 = time.perf_counter()
    pipe = jaxvlm.pipeline(s.model_path(version), backend_config=EngineConfig(
        session_len=step["session_len"], max_batch_size=step["max_batch_size"], compilation_cache_dir=cache_dir,
        quant_policy=step.get("quant_policy", 0), enable_prefix_caching=step.get("prefix_caching", False)))
    rec.put("load_s", time.perf_counter() - t0)
    runner = pipe.engine.runner
    rec.put("slots", runner.buckets.num_slots)
    xla_programs = _count_xla_compiles()
    texts = load_requests(s)
    image = s.image(version)
    clock = WarmupClock(rec)

    def ask(prompts, new_tokens):
        gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, do_sample=False)
        out = pipe(prompts, gen_config=gen)
        for r in out if isinstance(out, list) else [out]:
            if r.finish_reason == "error" or r.generate_token_len != new_tokens:
                raise RuntimeError(f"request {r.index}: {r.finish_reason} after {r.generate_token_len} tokens: "
                                   f"{r.error_message}")
        return out

    def forget_prefixes():
        if pipe.engine.prefix is not None:
            pipe.engine.prefix = PrefixIndex()

    one = (texts[0], image)
    if "first" in tasks:
        r = clock.run("first_answer", _first_answer, rec, lambda: ask(one, s.first_answer_tokens))
        rec.put("prompt_tokens", r.input_token_len)
    if "ttft" in tasks or "decode" in tasks:
        clock.run("ttft", ask, one, 1)
        if pipe.engine.prefix is not None:  # the first call filled the cache; this one compiles its continuation
            clock.run("ttft_cached", ask, one, 1)
        compiled = xla_programs()
        ttft = statistics.median(_timed(ask, one, 1)[0] for _ in range(s.ttft_reps))
        rec.put("ttft_ms", ttft * 1e3)
        measured_compiles = xla_programs() - compiled  # the warm-ups' own compiles are not counted
        if "decode" in tasks:
            clock.run("decode", ask, one, s.new_tokens)
            compiled = xla_programs()
            full = statistics.median(_timed(ask, one, s.new_tokens)[0] for _ in range(s.decode_reps))
            rec.put("decode_total_s", full)
            rec.put("decode_tok_s", _decode_rate(s.new_tokens, full, ttft))
            measured_compiles += xla_programs() - compiled
        rec.put("compiles_while_measuring", measured_compiles)
    if "throughput" in tasks:
        for n in s.counts:
            prompts = [(texts[i], s.image("1.5", seed=i % 8)) for i in range(n)]
            try:
                # The same run once first: every prefill group, vision batch and decode bucket (the KV length
                # grows through several buckets) is compiled before the measured run. Both start from an empty
                # prefix index, so they schedule the same groups: the measured run finds only what it computes
                # itself (the later requests about each of the 8 images reuse the earlier ones' prefixes), and
                # a warm-up that found an earlier count's prefixes would skip the shapes of their first prefill.
                forget_prefixes()
                clock.run(f"offline_{n}", ask, prompts, s.new_tokens)
                compiled = xla_programs()
                forget_prefixes()
                dt, out = _timed(ask, prompts, s.new_tokens)
                rec.put(f"offline_tok_s_{n}", sum(r.generate_token_len for r in out) / dt)
                rec.put(f"offline_{n}_compiles_while_measuring", xla_programs() - compiled)
                if pipe.engine.prefix is not None:
                    rec.put(f"offline_{n}_reused_tokens", pipe.engine.prefix.reused_tokens)
            except Exception as e:  # noqa: BLE001 - record it and go on with the next count
                rec.put(f"offline_tok_s_{n}", "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"[:300])
    pipe.close()


@functools.cache  # one listener per process, however many steps ask
def _count_xla_compiles():
    """A counter of every program XLA compiles in this process (the engine's steps, the resize programs, eager
    ops), so that "compiles while measuring" misses none; a program loaded from the persistent cache counts too."""
    import jax

    count = [0]

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # jax._src.dispatch.BACKEND_COMPILE_EVENT
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda: count[0]


def _is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return "outofmemory" in text or "out of memory" in text or "resource_exhausted" in text


def phase_transformers(spec: dict, rec: Recorder) -> None:
    """transformers `generate` (bf16, sdpa), eager or with cache_implementation="static" (forward compiled)."""
    import torch
    import transformers

    s = Settings(**spec["settings"])
    if spec["static"]:
        # Each new batch/cache shape recompiles; past the default limit (8) torch would silently run eager.
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    rec.put("device", torch.cuda.get_device_name() if s.device == "cuda" else "cpu")
    rec.put("versions", {"torch": torch.__version__, "transformers": transformers.__version__})
    for step in spec["steps"]:
        _transformers_step(s, step, spec["static"], rec.sub(step["name"]))


def _transformers_step(s: Settings, step: dict, static: bool, rec: Recorder) -> None:
    import gc
    import importlib.util

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    version, tasks, device = step["version"], step["tasks"], s.device
    # bf16 as on the GPU; --smoke computes in float32, since CPUs without bf16 units emulate it (4x slower)
    dtype = torch.float32 if s.smoke else torch.bfloat16
    cls = LlavaForConditionalGeneration if version == "1.5" else LlavaNextForConditionalGeneration
    t0 = time.perf_counter()
    # device_map= loads straight onto the GPU but needs `accelerate`; without it, load on the host and move.
    direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
    model = cls.from_pretrained(s.model_path(version), dtype=dtype, attn_implementation="sdpa",
                                **({"device_map": device} if direct else {}))
    model = (model if direct else model.to(device)).eval()
    processor = AutoProcessor.from_pretrained(s.model_path(version))
    processor.tokenizer.padding_side = "left"
    rec.put("load_s", time.perf_counter() - t0)
    extra = {"cache_implementation": "static"} if static else {}
    texts = load_requests(s)
    image = s.image(version)
    clock = WarmupClock(rec)

    def ask(batch: list[tuple[str, Any]], new_tokens: int) -> tuple[int, int]:
        """End to end like a pipeline call: preprocess, generate, detokenize. Returns (new tokens, prompt len)."""
        inputs = processor(images=[im for _, im in batch], text=[hf_prompt(t) for t, _ in batch],
                           return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        # generate() runs under no_grad itself; min_new_tokens=max_new_tokens is how it ignores EOS
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=PAD_TOKEN_ID, **extra)
        new = out[:, inputs["input_ids"].shape[1]:]
        processor.batch_decode(new, skip_special_tokens=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if new.shape[1] != new_tokens:
            raise RuntimeError(f"generated {new.shape[1]} tokens, expected {new_tokens}")
        return new.numel(), inputs["input_ids"].shape[1]

    def release():
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    one = [(texts[0], image)]
    if "first" in tasks:
        _, prompt_len = clock.run("first_answer", _first_answer, rec, lambda: ask(one, s.first_answer_tokens))
        rec.put("prompt_tokens", prompt_len)
    if "ttft" in tasks or "decode" in tasks:
        clock.run("ttft", ask, one, 1)
        ttft = statistics.median(_timed(ask, one, 1)[0] for _ in range(s.ttft_reps))
        rec.put("ttft_ms", ttft * 1e3)
        if "decode" in tasks:
            clock.run("decode", ask, one, s.new_tokens)  # static: compiles at exactly the measured shapes
            full = statistics.median(_timed(ask, one, s.new_tokens)[0] for _ in range(s.decode_reps))
            rec.put("decode_total_s", full)
            rec.put("decode_tok_s", _decode_rate(s.new_tokens, full, ttft))
    if "throughput" in tasks:
        for n in s.counts:
            batch = [(texts[i], s.image("1.5", seed=i % 8)) for i in range(n)]
            try:
                # eager: a short run warms the kernels; static: the full run, so compilation and CUDA-graph
                # capture happen at the measured batch size and cache length
                clock.run(f"offline_{n}", ask, batch, s.new_tokens if static else min(4, s.new_tokens))
                dt, (tokens, _) = _timed(ask, batch, s.new_tokens)
                rec.put(f"offline_tok_s_{n}", tokens / dt)
            except Exception as e:  # noqa: BLE001 - OOM is an expected outcome at 256 requests
                rec.put(f"offline_tok_s_{n}", "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"[:300])
            finally:
                release()
    del model
    release()


# ------------------------------------------------------------------------------------------------ child side


class Recorder:
    """Appends one JSON line per result, flushed at once, so a killed phase keeps what it measured."""

    def __init__(self, path: str, prefix: str = ""):
        self.path, self.prefix = path, prefix

    def sub(self, name: str) -> Recorder:
        return Recorder(self.path, f"{self.prefix}{name}/")

    def put(self, key: str, value: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": self.prefix + key, "value": value}) + "\n")


PHASE_FUNCTIONS = {
    "checkpoints": phase_checkpoints,
    "bandwidth": phase_bandwidth,
    "jaxvlm": phase_jaxvlm,
    "transformers": phase_transformers,
}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    PHASE_FUNCTIONS[spec["kind"]](spec, Recorder(spec["results"]))


# ------------------------------------------------------------------------------------------------ parent side


@dataclasses.dataclass
class Phase:
    name: str
    system: str  # "setup" | "jaxvlm" | "transformers" | "transformers-static"
    spec: dict
    cap_s: float  # the most this phase may take (the budget left may be less)
    env: dict = dataclasses.field(default_factory=dict)


# jaxvlm's optional engine settings (LMDeploy's names) that the offline runs are repeated with, each in a phase
# "jaxvlm-<kind>": kind -> (row label, step settings). An int8 KV cache (quant_policy=8) fits twice the slots;
# with prefix caching (enable_prefix_caching) a request whose image an earlier one brought (the requests ask
# about 8 images) prefills only its own question.
OPTIONS = {
    "int8": ("int8 KV cache", {"quant_policy": 8}),
    "prefix": ("prefix caching (8 images)", {"prefix_caching": True}),
    "int8-prefix": ("int8 KV cache and prefix caching", {"quant_policy": 8, "prefix_caching": True}),
}


def option_phase(kind: str) -> str:
    """The name of the phase that repeats the offline runs with OPTIONS[kind]."""
    return f"jaxvlm-{kind}"


def plan_phases(s: Settings, args: argparse.Namespace, scratch: Path) -> list[Phase]:
    """Phases in priority order (a budget cut drops the last ones first). One process per system and mode runs
    several steps, each with its own model/pipeline freed before the next; the warm starts are separate."""
    big = not s.smoke
    base = {"settings": dataclasses.asdict(s)}
    inductor = {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TRITON_CACHE_DIR": str(scratch / "triton")}
    lat15 = {"version": "1.5", "session_len": s.session_len_15, "max_batch_size": 1}
    lat16 = {"name": "1.6-latency", "version": "1.6", "tasks": ["ttft"], "session_len": s.session_len_16,
             "max_batch_size": 1}
    jax_steps = [  # bounded steps first; the offline one compiles the most shapes
        dict(lat15, name="1.5-latency", tasks=["first", "ttft", "decode"]),  # first: the cold start
        lat16,
        # One engine for every count, sized for the largest, as a user serving a queue would configure it.
        # Its batch-1 decode row shows a lone request in an engine of many slots: idle slots must cost nothing.
        dict(lat15, name="offline", tasks=["ttft", "decode", "throughput"], max_batch_size=max(s.counts)),
    ]
    torch_steps = [{"name": "1.5", "version": "1.5", "tasks": ["first", "ttft", "decode", "throughput"]},
                   {"name": "1.6", "version": "1.6", "tasks": ["ttft"]}]

    def option_steps(kind: str) -> list[dict]:
        """The offline runs with one of OPTIONS; with prefix caching also the 1.6 question asked twice (the
        second time only the vision-free last token is prefilled)."""
        settings = OPTIONS[kind][1]
        offline = dict(lat15, name="offline", tasks=["throughput"], max_batch_size=max(s.counts), **settings)
        return [offline, dict(lat16, **settings)] if kind == "prefix" else [offline]

    jaxvlm = dict(base, kind="jaxvlm", cache_dir=str(scratch / "xla"))
    transformers = dict(base, kind="transformers", static=False)
    static = dict(transformers, static=True)
    phases = [
        Phase("checkpoints", "setup", dict(base, kind="checkpoints"), 400 if big else 120),
        Phase("bandwidth", "setup", dict(base, kind="bandwidth", bytes=s.bandwidth_bytes), 90 if big else 60),
        Phase("jaxvlm", "jaxvlm", dict(jaxvlm, steps=jax_steps), 400 if big else 180),
        # The cold start's engine settings and first request, now with the cache that process left.
        Phase("jaxvlm-warm-start", "jaxvlm", dict(jaxvlm, steps=[dict(lat15, name="1.5-latency",
                                                                      tasks=["first"])]), 150 if big else 120),
        Phase("transformers", "transformers", dict(transformers, steps=torch_steps), 300 if big else 120),
        Phase("transformers-static", "transformers-static", dict(static, steps=torch_steps),
              420 if big else 120, inductor),
        Phase("transformers-static-warm-start", "transformers-static",
              dict(static, steps=[{"name": "1.5", "version": "1.5", "tasks": ["first"]}]),
              180 if big else 120, inductor),
        # jaxvlm's optional settings last: a budget cut drops them before the comparison with transformers.
        *[Phase(option_phase(kind), "jaxvlm", dict(jaxvlm, steps=option_steps(kind)), 300 if big else 150)
          for kind in OPTIONS],
    ]
    # The setup phases always run. A name is a phase's or a system's; in --only, "transformers" takes both its modes.
    only, skip = (set(names.split(",")) if names else set() for names in (args.only, args.skip))
    return [p for p in phases if p.system == "setup" or (
        (not only or p.name in only or p.system in only or p.system.split("-")[0] in only)
        and p.name not in skip and p.system not in skip)]


@dataclasses.dataclass
class Running:
    phase: Phase
    proc: subprocess.Popen
    entry: dict
    kill_at: float
    timeout: float
    results: Path
    log_path: Path
    log: Any


class Runner:
    """Runs phases as child processes under one deadline and keeps the merged results.

    Phases come in lanes: each lane runs its phases one after the other; lanes run side by side. The GPU run
    uses a single lane (measurements must not share the device); --smoke runs jaxvlm and transformers in two
    lanes (and the option phases in whichever is free), since its CPU numbers mean nothing and its wall time is
    mostly interpreter start-up and imports.
    """

    def __init__(self, s: Settings, args: argparse.Namespace, scratch: Path, log_dir: Path):
        self.s, self.args, self.scratch, self.log_dir = s, args, scratch, log_dir
        self.start = time.time()
        self.deadline = self.start + args.budget
        self.results: dict[str, dict] = {}
        self.status: list[dict] = []
        self.active: list[Running | None] = []

    def stamp(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - self.start:6.1f}s] {message}", flush=True)

    def env_for(self, phase: Phase) -> dict:
        env = dict(os.environ)
        env.update(phase.env)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
        if self.s.smoke:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
            # Toy programs: XLA's CPU backend optimisations cost more compile time than they save at run time.
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                                " --xla_llvm_disable_expensive_passes=true").strip()
        else:
            # JAX alone on the GPU in its phases; leave a margin for cuDNN/cuBLAS workspaces outside its pool.
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
        repo = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")  # jaxvlm from this checkout
        return env

    def _start(self, phase: Phase) -> Running | None:
        left = self.deadline - time.time()
        entry = {"phase": phase.name, "system": phase.system, "started_s": round(time.time() - self.start, 1)}
        self.status.append(entry)
        if left < (5 if self.s.smoke else 30):
            entry["status"] = "skipped (time budget)"
            self.stamp(f"{phase.name}: skipped, {left:.0f}s of budget left")
            return None
        timeout = min(phase.cap_s, left)
        results = self.scratch / f"{phase.name}.jsonl"
        spec_path = self.scratch / f"{phase.name}.spec.json"
        _write_json(spec_path, dict(phase.spec, results=str(results)))
        log_path = self.log_dir / f"{phase.name}.log"
        self.stamp(f"{phase.name}: start (limit {timeout:.0f}s)")
        env = self.env_for(phase)
        log = open(log_path, "w")
        env["BENCH_SPAWN_TIME"] = repr(time.time())
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        return Running(phase, proc, entry, time.time() + timeout, timeout, results, log_path, log)

    def _finish(self, run: Running, status: str) -> None:
        run.log.close()
        entry = run.entry
        entry["status"] = status
        entry["seconds"] = round(time.time() - self.start - entry["started_s"], 1)
        self.results[run.phase.name] = read_results(run.results)
        self.stamp(f"{run.phase.name}: {status} in {entry['seconds']:.1f}s")
        if status != "ok":
            entry["log_tail"] = _tail(run.log_path, 2000)
            print(_indent(_tail(run.log_path, 1500)), flush=True)

    def run_lanes(self, lanes: list[list[Phase]], after_each, shared: Sequence[Phase] = ()) -> None:
        """Each lane runs its phases in order; a lane with none left takes the next of `shared`."""
        queues, pool = [list(lane) for lane in lanes], list(shared)
        self.active = [None] * len(queues)
        while True:
            for i, queue in enumerate(queues):
                while self.active[i] is None and (queue or pool):
                    self.active[i] = self._start((queue or pool).pop(0))
            if all(run is None for run in self.active):
                return
            time.sleep(0.1)
            for i, run in enumerate(self.active):
                if run is None:
                    continue
                rc = run.proc.poll()
                if rc is None and time.time() < run.kill_at:
                    continue
                if rc is None:
                    _kill(run.proc)
                    status = f"timeout after {run.timeout:.0f}s"
                else:
                    status = "ok" if rc == 0 else f"failed (exit {rc})"
                self.active[i] = None
                self._finish(run, status)
                after_each()

    def kill_all(self) -> None:
        for run in self.active:
            if run is not None:
                _kill(run.proc)


def _kill(proc: subprocess.Popen) -> None:
    """Stops a child and everything in its session (e.g. torch's compile workers): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


try:  # loaded here, not in the forked child, where only the prctl call itself runs
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL if the parent dies (even by SIGKILL), so no orphan keeps the GPU."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def read_results(path: Path) -> dict:
    out: dict[str, Any] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            out[item["key"]] = item["value"]
    return out


# ------------------------------------------------------------------------------------------------ the table

# system: (phase with the measurements, its 1.5 latency step, 1.6 step, offline step, warm-start phase or None)
SOURCES = {
    "jaxvlm": ("jaxvlm", "1.5-latency", "1.6-latency", "offline", "jaxvlm-warm-start"),
    "transformers": ("transformers", "1.5", "1.6", "1.5", None),
    "transformers-static": ("transformers-static", "1.5", "1.6", "1.5", "transformers-static-warm-start"),
}


def row_labels(s: Settings) -> dict[str, str]:
    labels = {
        "decode_tok_s_b1": f"batch-1 decode tok/s ({s.new_tokens} new)",
        "decode_roofline_fraction": "  as a fraction of the roofline",
        "decode_tok_s_b1_offline_engine": "  same, in the offline run's engine",
        "ttft_ms_llava15_336": "TTFT ms, llava-1.5, 336x336",
        "ttft_ms_llava16_640x480": "TTFT ms, llava-1.6, 640x480",
        "ttft_ms_llava16_640x480_prefix": "  same prompt again, prefix caching",
    }
    for n in s.counts:
        labels[f"offline_tok_s_{n}"] = f"offline output tok/s, {n} requests"
    for kind, (label, _) in OPTIONS.items():
        for n in s.counts:
            labels[f"offline_tok_s_{n}_{kind}"] = f"  same, {label}, {n} requests"
    labels.update({
        "warmup_s": "compile/warm-up s",
        "start_to_first_answer_s_cold": "start -> first answer s, cold cache",
        "start_to_first_answer_s_warm": "start -> first answer s, warm cache",
    })
    return labels


def roofline(s: Settings, results: dict, prompt_tokens: int | None) -> dict | None:
    """Bytes one batch-1 decode step must read (decoder weights + lm_head + the KV cache in use, averaged over
    the generated tokens) over the measured copy bandwidth."""
    bw = results.get("bandwidth", {}).get("best_GBps")
    if not isinstance(bw, (int, float)) or not prompt_tokens:
        return None
    params = count_params(llava_config("1.5", *s.shapes))
    text = s.shapes[1]
    weight_bytes = 2 * (params["decoder_layers"] + params["final_norm"] + params["lm_head"])  # bf16
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2
    kv_bytes = kv_per_token * (prompt_tokens + s.new_tokens / 2)
    seconds = (weight_bytes + kv_bytes) / (bw * 1e9)
    return {"weight_bytes": weight_bytes, "kv_bytes_avg": kv_bytes, "bandwidth_GBps": bw,
            "step_s": seconds, "tok_s": 1 / seconds, "prompt_tokens": prompt_tokens}


def build_table(s: Settings, results: dict, status: list[dict]) -> tuple[dict, dict | None, list[str]]:
    state = {e["phase"]: e.get("status", "running") for e in status}
    ran = {e["system"] for e in status}
    notes: list[str] = []

    def value(phase: str, key: str) -> Any:
        got = results.get(phase, {}).get(key)
        if got is not None:
            return got
        st = state.get(phase)
        return "not run" if st is None else ("missing" if st == "ok" else st)

    prompt = None
    for system, (phase, lat15, *_rest) in SOURCES.items():
        p = results.get(phase, {}).get(f"{lat15}/prompt_tokens")
        if isinstance(p, int):
            prompt = prompt or p
            if p != prompt:
                notes.append(f"prompt lengths differ: {system} has {p} tokens, another system {prompt}")
    roof = roofline(s, results, prompt)
    table: dict[str, dict] = {}
    for system, (phase, lat15, lat16, offline, warm) in SOURCES.items():
        if system not in ran:  # a column for each system any phase ran for (jaxvlm-int8 alone gives jaxvlm's)
            continue
        dec = value(phase, f"{lat15}/decode_tok_s")
        if isinstance(dec, (int, float)):
            fraction = dec / roof["tok_s"] if roof else "no bandwidth"
        else:
            fraction = dec
        warmups = [v for k, v in results.get(phase, {}).items() if k.endswith("/warmup_s")]
        row: dict[str, Any] = {
            "decode_tok_s_b1": dec,
            "decode_roofline_fraction": fraction,
            "decode_tok_s_b1_offline_engine": value(phase, f"{offline}/decode_tok_s"),
            "ttft_ms_llava15_336": value(phase, f"{lat15}/ttft_ms"),
            "ttft_ms_llava16_640x480": value(phase, f"{lat16}/ttft_ms"),
            "ttft_ms_llava16_640x480_prefix": value(option_phase("prefix"), "1.6-latency/ttft_ms") if system == "jaxvlm"
            else "n/a",
            **{f"offline_tok_s_{n}": value(phase, f"{offline}/offline_tok_s_{n}") for n in s.counts},
            # The optional settings are jaxvlm's; the transformers rows compare its default cache only.
            **{f"offline_tok_s_{n}_{kind}": value(option_phase(kind), f"offline/offline_tok_s_{n}")
               if system == "jaxvlm" else "n/a" for kind in OPTIONS for n in s.counts},
            "warmup_s": sum(warmups) if warmups else value(phase, f"{lat15}/warmup_s"),
            "start_to_first_answer_s_cold": value(phase, f"{lat15}/first_answer_s"),
            # Eager transformers compiles nothing, so there is no cache to warm: one start serves both rows.
            "start_to_first_answer_s_warm": value(warm or phase, f"{lat15}/first_answer_s"),
        }
        table[system] = row
    if "transformers" in table:
        notes.append("transformers (eager) compiles nothing, so it has no compilation cache: its cold and warm "
                     "start rows are one measurement")
    return table, roof, notes


def format_table(s: Settings, table: dict) -> str:
    labels = row_labels(s)
    systems = list(table)
    width = max(len(v) for v in labels.values()) + 2

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)[:20]

    lines = ["".ljust(width) + "".join(f"{name:>22}" for name in systems)]
    for key, label in labels.items():
        lines.append(label.ljust(width) + "".join(f"{cell(table[sy][key]):>22}" for sy in systems))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def _write_json(path: Path, obj: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # readers never see half a file, even if we are killed mid-write


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.splitlines())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, small counts: checks the whole flow")
    p.add_argument("--json", help="write the results (table, per-phase details, phase log) here")
    p.add_argument("--only", help="comma-separated systems (jaxvlm, transformers, transformers-static) or phases "
                   "(jaxvlm-int8, ...) to run; the checkpoints and bandwidth always run")
    p.add_argument("--skip", help="comma-separated systems or phases not to run, e.g. transformers-static")
    p.add_argument("--model-dir", default="/tmp/jaxvlm-bench", help="where the checkpoints are written/reused")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 540; --smoke 300)")
    p.add_argument("--requests", help="comma-separated offline request counts (default 64,256; --smoke 4)")
    p.add_argument("--new-tokens", type=int, help="new tokens per request (default 128; --smoke 24)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the compilation caches and raw results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 300.0 if args.smoke else 540.0
    if args.smoke and args.model_dir == p.get_default("model_dir"):
        args.model_dir = "/tmp/jaxvlm-bench-smoke"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    s = make_settings(args)
    Path(s.model_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="jaxvlm-bench-run-"))
    log_dir = Path(f"{args.json}.logs") if args.json else scratch / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(s, args, scratch, log_dir)
    meta = {
        "smoke": s.smoke, "settings": dataclasses.asdict(s), "budget_s": args.budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "logs": str(log_dir),
        "methods": {
            "ttft": "median latency of a max_new_tokens=1 request after warm-up, end to end (preprocessing, "
                    "prefill, first token, detokenization)",
            "decode_tok_s_b1": f"({s.new_tokens}-1) / (median t({s.new_tokens} tokens) - TTFT), batch 1, "
                               "ignore_eos",
            "offline_tok_s": f"generated tokens / wall time for N requests (one 336x336 image and "
                             f"{s.text_tokens} text tokens each, {s.new_tokens} new tokens, ignore_eos) in one "
                             "call, after a warm-up on the same requests",
            "warmup_s": "wall time of all warm-up calls (first answer included): compilation plus their run time",
            "start_to_first_answer": "parent's clock just before spawning a fresh process, to that process "
                                     f"holding its first answer ({s.first_answer_tokens} new tokens); cold: "
                                     "empty compilation cache, warm: the cache the cold process left",
            "roofline": "bf16 decoder + lm_head weights + KV cache in use (prompt + half the new tokens) read "
                        "once per token, at the best measured device-to-device copy bandwidth",
        },
    }

    def write_json() -> dict:
        table, roof, notes = build_table(s, runner.results, runner.status)
        doc = {"meta": meta, "table": table, "roofline": roof, "bandwidth": runner.results.get("bandwidth"),
               "phases": runner.status, "details": runner.results, "notes": notes}
        if args.json:
            _write_json(Path(args.json), doc)
        return doc

    def on_signal(signum, _frame):
        runner.stamp(f"signal {signum}: stopping the running phases and writing what was measured")
        runner.kill_all()
        write_json()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    runner.stamp(f"{'smoke run on CPU' if s.smoke else 'GPU run'}: budget {args.budget:.0f}s, "
                 f"models in {s.model_dir}")
    phases = plan_phases(s, args, scratch)
    try:
        runner.run_lanes([phases[:1]], write_json)  # the checkpoints: nothing runs without them
        if runner.status[0]["status"] == "ok":
            rest = phases[1:]
            if s.smoke:
                # The option phases depend on no other phase: whichever lane is free first runs the next one.
                options = [p for p in rest if p.name in {option_phase(kind) for kind in OPTIONS}]
                torch_lane = [p for p in rest if p.system.startswith("transformers")]
                jax_lane = [p for p in rest if p not in torch_lane and p not in options]
                runner.run_lanes([jax_lane, torch_lane], write_json, shared=options)
            else:
                runner.run_lanes([rest], write_json)
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    doc = write_json()
    bw = doc["bandwidth"] or {}
    print()
    if isinstance(bw.get("best_GBps"), (int, float)):
        print(f"device-to-device copy bandwidth: {bw['best_GBps']:.0f} GB/s (best), "
              f"{bw['median_GBps']:.0f} GB/s (median), on {bw.get('device')}")
    if doc["roofline"]:
        r = doc["roofline"]
        print(f"batch-1 decode roofline: {r['tok_s']:.1f} tok/s ({r['weight_bytes'] / 1e9:.2f} GB weights + "
              f"{r['kv_bytes_avg'] / 1e9:.3f} GB KV per token)")
    print(f"decode tok/s = ({s.new_tokens}-1) / (t({s.new_tokens} tokens) - TTFT); TTFT and throughput end to end")
    print(format_table(s, doc["table"]))
    for note in doc["notes"]:
        print(f"note: {note}")
    runner.stamp("done" + (f"; JSON in {args.json}" if args.json else ""))
    return 0 if all(e.get("status") == "ok" for e in runner.status) else 1


if __name__ == "__main__":
    sys.exit(main())
