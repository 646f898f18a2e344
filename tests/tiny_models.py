"""Tiny random-weight LLaVA checkpoints, written locally with transformers + torch (CPU, no downloads).

Builders:
- `make_llava_hf(dir, text="mha"|"gqa", next=False)`: llava-hf `LlavaForConditionalGeneration` (or, with
  `next=True`, `LlavaNextForConditionalGeneration`) saved by `save_pretrained`, with its processor, so that
  `AutoProcessor.from_pretrained(dir)` works offline.
- `make_llava_original(dir, version="1.5"|"1.6", llm="vicuna"|"mistral")`: the original haotian-liu/LLaVA
  layout, whose weights are those of a llava-hf model kept beside it (`reference_path`) for parity tests.
- `write_layout(model, dir, layout)`: the same llava-hf weights under another state-dict key layout
  (see `LAYOUTS`).

Every parameter is random (biases and norm weights too, so a loader that skips one is caught), scaled so that
activations stay O(1) and logits have std ~3 (greedy parity rarely hinges on near-ties). The lm_head rows past
the text vocabulary (<image>, <pad>, padding) are zero, so generation only produces decodable text tokens.

Session fixtures wrapping these builders are in conftest.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ------------------------------------------------------------------------------------------------ constants

IMAGE_TOKEN = "<image>"
BASE_VOCAB = 1000  # tokenizer without added tokens: 3 specials + 256 byte tokens + 741 learned pieces
IMAGE_TOKEN_INDEX = BASE_VOCAB  # llava-hf: <image> right after the base vocabulary (32000 in the real ones)
PAD_TOKEN_INDEX = BASE_VOCAB + 1  # llava-hf: <pad>
MODEL_VOCAB = 1024  # embedding rows, padded past the tokenizer as llava-hf pads 32002 to 32064
TILE = 32  # CLIP image_size
PATCH = 8  # CLIP patch_size: 4x4 = 16 patches per tile
# Multiples of the tile, in the order of the real checkpoints ([336, 672], [672, 336], [672, 672], ...).
GRID_PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# State-dict key layouts of llava-hf checkpoints (design-notes.md), as a function of the in-memory key of a
# transformers >= 5.6 model (`model.language_model.*`, `model.vision_tower.<no vision_model>.*`, `lm_head.*`).
LAYOUTS = (
    "hub",  # files on the hub, written by transformers 4.x: language_model.model.*, vision_tower.vision_model.*
    "transformers-5.0",  # save_pretrained of 5.0-5.5: model.language_model.*, model.vision_tower.vision_model.*
    "transformers-5.6",  # in-memory keys of >= 5.6: model.vision_tower.embeddings.* (no vision_model level)
    "hub-no-vision-model",  # what save_pretrained of transformers 5.24 writes: hub names without vision_model.
)

# Text for training the tokenizer (own words; newlines are left to byte fallback as in LLaMA's vocabulary).
_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. A chat between a curious human and an artificial intelligence
assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: The picture shows a red bus parked next to a small green house
under a cloudy sky. USER: Describe the photo in detail. ASSISTANT: Two cats are sleeping on a wooden table near
the window, and a blue cup stands beside them. Cats, dogs, birds and horses are animals. A dog runs across the
field while children play with a yellow ball. The sun is bright and the grass is green. Colors: red, orange,
yellow, green, blue, purple, black, white, gray, brown, pink. Shapes: circle, square, triangle, rectangle, line,
point, star. Numbers: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, 0 1 2 3 4 5
6 7 8 9 10 42 100 2024. The quick brown fox jumps over the lazy dog. How many people are standing on the bridge?
I can see three people and a bicycle. What color is the car? The car is silver. Where is the man going? He is
walking to the market to buy bread, apples, and milk. Is there any text in the picture? Yes, the sign says
"STOP" in large white letters on a red background. Please answer the question with a single word or phrase.
Answer the question using a short sentence. human assistant system question answer image picture photo video
frame scene object person people animal food plate table chair room kitchen street city road tree water river
mountain beach ocean sky cloud light shadow left right top bottom middle center front back inside outside above
below near far large small big little tall short long wide old new young happy sad. [INST] Tell me about this
image. [/INST] It looks like a sunny afternoon in a quiet park, with a bench, a lamp post and a few trees.
Mistral and Vicuna are language models. LLaVA connects a vision encoder to a language model with a projector.
"""

# Chat templates written for these fixtures. Content may be a string or a list of parts; image parts
# ("image" or "image_url") become "<image>\n" before the text of their turn, as llava-hf's templates do.
_PARTS = (
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
)
_IMAGES = "{%- for part in parts if part['type'] in ('image', 'image_url') -%}{{ '<image>\\n' }}{%- endfor -%}"
_TEXTS = "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
VICUNA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}" + _PARTS
    + "{%- if message['role'] == 'system' -%}" + _TEXTS + "{{ ' ' }}"
    + "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _IMAGES + _TEXTS + "{{ ' ' }}"
    + "{%- else -%}{{ 'ASSISTANT: ' }}" + _TEXTS + "{{ '</s>' }}{%- endif -%}"
    + "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}" + _PARTS
    + "{%- if message['role'] == 'system' -%}" + _TEXTS + "{{ '\\n\\n' }}"
    + "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}" + _IMAGES + _TEXTS + "{{ ' [/INST]' }}"
    + "{%- else -%}{{ ' ' }}" + _TEXTS + "{{ '</s>' }}{%- endif -%}"
    + "{%- endfor -%}"
)


# ------------------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class TinyModel:
    """A written tiny checkpoint and the facts tests need about it."""

    path: Path
    reference_path: Path  # llava-hf model with the same weights (== path for llava-hf checkpoints)
    fmt: str  # "llava-hf" | "original"
    version: str  # "1.5" (LLaVA) | "1.6" (LLaVA-NeXT)
    llm: str  # "vicuna" (LLaMA) | "mistral"
    text: str  # "mha" | "gqa"
    layout: str  # one of LAYOUTS for llava-hf; "original" for the original layout
    dtype: str  # "float32" | "bfloat16" | "float16"
    tie_word_embeddings: bool
    image_token_index: int  # <image> id of the reference (llava-hf) tokenizer and config
    vocab_size: int  # embedding rows
    tokenizer_size: int  # len() of this checkpoint's own tokenizer
    image_size: int = TILE
    patch_size: int = PATCH
    grid_pinpoints: list | None = None  # as in the config: [h, w] pairs (llava-hf), [w, h] pairs (original)
    vision_tower_path: Path | None = None  # original checkpoints: the CLIP dir named by mm_vision_tower
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 2
    max_position_embeddings: int = 1024
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0  # the checkpoint's own pad id (<pad> for llava-hf, <unk> for originals)
    image_token: str = IMAGE_TOKEN
    reference: TinyModel | None = field(default=None, compare=False, repr=False)  # originals: the llava-hf twin

    def tokens_per_image(self, width: int, height: int) -> int:
        """Image feature tokens for a `width` x `height` image, by this checkpoint's own reference."""
        per_tile = (self.image_size // self.patch_size) ** 2
        if self.version == "1.5":
            return per_tile
        if self.fmt == "llava-hf":
            return llava_hf_next_tokens(width, height, self.image_size, self.patch_size, self.grid_pinpoints)
        return original_next_tokens(width, height, self.image_size, self.patch_size, self.grid_pinpoints)

    @property
    def tokens_per_image_fn(self) -> Callable[[int, int], int]:
        return self.tokens_per_image


def llava_hf_next_tokens(width: int, height: int, tile: int, patch: int, pinpoints: list) -> int:
    """LlavaNextProcessor's count: pinpoints are (height, width); unpad rounds to 7 digits before int()."""
    best_h, best_w = _best_resolution((height, width), pinpoints)
    side = tile // patch
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return side * side + cur_h * (cur_w + 1)  # base tile + unpadded grid with one newline per row


def original_next_tokens(width: int, height: int, tile: int, patch: int, pinpoints: list) -> int:
    """haotian-liu/LLaVA's count (anyres + spatial_unpad): pinpoints are (width, height); unpad truncates."""
    best_w, best_h = _best_resolution((width, height), pinpoints)
    side = tile // patch
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(width * (cur_h / height))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return side * side + cur_h * (cur_w + 1)


def _best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """Both references' choice, written for pairs in the caller's own order: the candidate that keeps the most
    of the image's pixels, then the one that wastes the fewest; the first wins a full tie."""
    a, b = size
    best, best_kept, best_waste = None, -1, math.inf
    for pa, pb in pinpoints:
        scale = min(pa / a, pb / b)
        kept = min(int(a * scale) * int(b * scale), a * b)
        waste = pa * pb - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (pa, pb), kept, waste
    return best


# ------------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(with_image_token: bool) -> Tokenizer:
    """A LLaMA-like BPE (metaspace, byte fallback, <unk>/<s>/</s> = 0/1/2, BOS added) trained on `_CORPUS`."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    # words are trained separately (split=True) so that no learned piece spans a word boundary, as in LLaMA
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB - len(byte_tokens), special_tokens=specials,
                                  show_progress=False)
    trained.train_from_iterator([" ".join(_CORPUS.split())], trainer)
    spec = json.loads(trained.to_str())
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + learned)}
    if len(vocab) != BASE_VOCAB:
        raise RuntimeError(f"tokenizer training gave {len(vocab)} tokens, expected {BASE_VOCAB}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # the pipeline transformers' LlamaTokenizer rebuilds (legacy=False), so both load paths agree
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    if with_image_token:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True),
                                AddedToken("<pad>", normalized=False, special=True)])
    return tok


def write_tokenizer(
    directory: Path,
    *,
    with_image_token: bool,
    chat_template: str | None,
    model_max_length: int,
    padding_side: str,
) -> int:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns the tokenizer's size."""
    tok = build_tokenizer(with_image_token)
    tok.save(str(directory / "tokenizer.json"))
    pad = "<pad>" if with_image_token else "<unk>"  # original LLaVA sets pad = unk
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    if with_image_token:
        ids.update({IMAGE_TOKEN: IMAGE_TOKEN_INDEX, "<pad>": PAD_TOKEN_INDEX})
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in ids.items()
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "padding_side": padding_side,
        "sp_model_kwargs": {},
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad})
    return tok.get_vocab_size(with_added_tokens=True)


# ------------------------------------------------------------------------------------------------ configs


def _vision_config_dict(image_size: int, patch_size: int) -> dict:
    # every size field given: a partial dict falls back to CLIP-L defaults
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, num_channels=3, projection_dim=32,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _text_config_dict(text: str, llm: str, tie: bool) -> dict:
    kv = {"mha": 4, "gqa": 2}[text]
    common = dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
        head_dim=16, vocab_size=MODEL_VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-5, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=tie, attention_bias=False,
    )
    if llm == "mistral":
        return dict(common, model_type="mistral", rope_theta=1e6, sliding_window=None)
    return dict(common, model_type="llama", rope_theta=10000.0)


def _llava_hf_config(text: str, llm: str, next_: bool, tie: bool, image_size: int, patch_size: int):
    from transformers import AutoConfig, LlavaConfig, LlavaNextConfig

    vision = _vision_config_dict(image_size, patch_size)
    textd = _text_config_dict(text, llm, tie)
    vision_cfg = AutoConfig.for_model(**vision)
    text_cfg = AutoConfig.for_model(**textd)
    common = dict(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=IMAGE_TOKEN_INDEX, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=tie,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    if next_:
        pinpoints = [[p * image_size // TILE for p in pair] for pair in GRID_PINPOINTS]
        return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    return LlavaConfig(**common)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), others ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            elif re.search(r"norm\d?\.weight$", name):
                value = 1.0 + 0.1 * noise
            else:  # biases, class embedding, image_newline
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ------------------------------------------------------------------------------------------------ llava-hf


def build_llava_hf_model(text: str = "mha", next: bool = False, *, llm: str = "vicuna", seed: int = 0,
                         dtype: str = "float32", tie_word_embeddings: bool = False, image_size: int = TILE,
                         patch_size: int = PATCH):
    """The in-memory llava-hf model (random weights, eval mode) that the builders save."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = _llava_hf_config(text, llm, next, tie_word_embeddings, image_size, patch_size)
    cls = LlavaNextForConditionalGeneration if next else LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    _randomize(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        # logits with std ~3: greedy choices are rarely near-ties, so parity with another implementation
        # does not hinge on float rounding
        head.mul_(3.0)
        # rows past the text vocabulary (<image>, <pad>, padding) score 0 while the best text token scores
        # ~+9: like a trained model, the tiny one never generates them, so every output decodes to text
        head[BASE_VOCAB:] = 0.0
    return model.to(_torch_dtype(dtype)).eval()


def _save_processor(directory: Path, model, *, next_: bool, pad_to_square: bool, llm: str, style: str) -> int:
    """Tokenizer + PIL image processor + processor config, written through transformers' own save."""
    from transformers import (
        AutoTokenizer, CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil,
        LlavaNextProcessor, LlavaProcessor,
    )

    cfg = model.config
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    template = MISTRAL_CHAT_TEMPLATE if llm == "mistral" else VICUNA_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as tmp:  # loaded back so that the processor saves it the transformers way
        write_tokenizer(Path(tmp), with_image_token=True, chat_template=template, padding_side="left",
                        model_max_length=cfg.text_config.max_position_embeddings)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    sizes = dict(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD)
    proc_args = dict(tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                     num_additional_image_tokens=1, chat_template=template)
    if next_:
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=cfg.image_grid_pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, **proc_args)
    elif pad_to_square:  # reproduces the original LLaVA-1.5 "pad" preprocessing
        processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(**sizes, do_pad=True), **proc_args)
    else:
        processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(**sizes), **proc_args)
    processor.save_pretrained(directory)
    if style == "hub":
        _split_processor_files(directory)
    elif style != "save_pretrained":
        raise ValueError(f"processor_style must be 'save_pretrained' or 'hub', not {style!r}")
    return len(tokenizer)


def _split_processor_files(directory: Path) -> None:
    """Rewrites transformers 5's single processor_config.json into the files llava-hf hub repositories carry:
    preprocessor_config.json (image processor), processor_config.json (the rest), chat_template.json."""
    proc = json.loads((directory / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image["processor_class"] = proc["processor_class"]
    _write_json(directory / "preprocessor_config.json", image)
    _write_json(directory / "processor_config.json", proc)
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        _write_json(directory / "chat_template.json", {"chat_template": jinja.read_text()})
        jinja.unlink()


def make_llava_hf(
    directory: str | Path,
    text: str = "mha",
    next: bool = False,
    *,
    llm: str = "vicuna",
    seed: int = 0,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    layout: str | None = None,
    shards: int = 1,
    pad_to_square: bool = False,
    processor_style: str = "save_pretrained",
    image_size: int = TILE,
    patch_size: int = PATCH,
    model=None,
) -> TinyModel:
    """A llava-hf checkpoint written by `save_pretrained` (plus processor) into `directory`.

    `layout` rewrites the weights under another key layout (None keeps what save_pretrained wrote);
    `shards` > 1 splits them into `model-0000k-of-0000n.safetensors` + index; `pad_to_square` uses
    `LlavaImageProcessor(do_pad=True)` (the original LLaVA-1.5 preprocessing) instead of CLIP's center crop;
    `processor_style="hub"` splits the processor files as hub repositories have them (preprocessor_config.json,
    processor_config.json, chat_template.json) instead of transformers 5's single processor_config.json.
    `model` saves that in-memory model instead of building one (its config then decides text/llm/dtype/tie).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_llava_hf_model(text, next, llm=llm, seed=seed, dtype=dtype,
                                     tie_word_embeddings=tie_word_embeddings, image_size=image_size,
                                     patch_size=patch_size)
    model.save_pretrained(directory)
    tokenizer_size = _save_processor(directory, model, next_=next, pad_to_square=pad_to_square, llm=llm,
                                     style=processor_style)
    cfg, t, v = model.config, model.config.text_config, model.config.vision_config
    info = TinyModel(
        path=directory, reference_path=directory, fmt="llava-hf", version="1.6" if next else "1.5",
        llm="mistral" if t.model_type == "mistral" else "vicuna",
        text="gqa" if t.num_key_value_heads < t.num_attention_heads else "mha",
        layout=detect_layout(load_state(directory)), dtype=str(model.dtype).removeprefix("torch."),
        tie_word_embeddings=bool(cfg.tie_word_embeddings), image_token_index=IMAGE_TOKEN_INDEX,
        vocab_size=t.vocab_size, tokenizer_size=tokenizer_size, image_size=v.image_size, patch_size=v.patch_size,
        grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints] if next else None,
        hidden_size=t.hidden_size, num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads, vision_hidden_size=v.hidden_size, vision_layers=v.num_hidden_layers,
        max_position_embeddings=t.max_position_embeddings, pad_token_id=PAD_TOKEN_INDEX,
    )
    if layout is not None or shards > 1:
        _write_weights(directory, load_state(directory), layout or info.layout, shards)
        info = replace(info, layout=layout or info.layout)
    return info


# ------------------------------------------------------------------------------------------------ layouts


def canonical_key(key: str) -> str:
    """Any llava-hf layout's key -> the in-memory key of transformers >= 5.6."""
    rules = (
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^image_newline$", "model.image_newline"),
    )
    for pattern, repl in rules:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def layout_key(canonical: str, layout: str) -> str:
    """The in-memory (>= 5.6) key -> its name under `layout`."""
    if layout == "transformers-5.6":
        return canonical
    key = re.sub(r"^model\.vision_tower\.", "model.vision_tower.vision_model.", canonical)
    if layout == "transformers-5.0":
        return key
    if layout in ("hub", "hub-no-vision-model"):
        if layout == "hub-no-vision-model":
            key = canonical
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        return re.sub(r"^model\.", "", key)  # vision tower, projector, image_newline
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def detect_layout(state: dict) -> str:
    keys = list(state)
    if any(k.startswith("language_model.model.") for k in keys):
        return "hub" if any(k.startswith("vision_tower.vision_model.") for k in keys) else "hub-no-vision-model"
    if any(k.startswith("model.vision_tower.vision_model.") for k in keys):
        return "transformers-5.0"
    return "transformers-5.6"


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """All safetensors tensors of a llava-hf directory (single or sharded), by file key."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def _write_weights(directory: Path, state: dict, layout: str, shards: int) -> None:
    """Replaces the directory's safetensors weights by `state` renamed to `layout`."""
    renamed = OrderedDict((layout_key(canonical_key(k), layout), v) for k, v in state.items())
    for old in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        old.unlink()
    save_sharded(directory, renamed, shards, fmt="safetensors")


def write_layout(model: TinyModel, directory: str | Path, layout: str, shards: int = 1) -> TinyModel:
    """A copy of a llava-hf checkpoint (configs, tokenizer, processor) with its weights under `layout`."""
    if model.fmt != "llava-hf":
        raise ValueError("write_layout takes a llava-hf checkpoint")
    directory = Path(directory)
    if directory.resolve() == model.path.resolve():
        raise ValueError("write_layout writes a copy: give it another directory")
    directory.mkdir(parents=True, exist_ok=True)
    for src in model.path.iterdir():
        if src.is_file() and not src.name.startswith("model") and src.suffix != ".safetensors":
            shutil.copy2(src, directory / src.name)
    _write_weights(directory, load_state(model.path), layout, shards)
    return replace(model, path=directory, layout=layout)


# ------------------------------------------------------------------------------------------------ sharding


def save_sharded(directory: Path, state: "OrderedDict[str, torch.Tensor]", shards: int, fmt: str) -> list[Path]:
    """Writes `state` as one file or `shards` files plus an index, in transformers' naming.

    fmt "safetensors": model.safetensors / model-0000k-of-0000n.safetensors + model.safetensors.index.json;
    fmt "bin": pytorch_model.bin / pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json.
    """
    directory = Path(directory)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    items = [(k, v.detach().contiguous().clone()) for k, v in state.items()]
    total = sum(v.numel() * v.element_size() for _, v in items)
    groups: list[list] = [[] for _ in range(max(shards, 1))]
    acc = 0
    for k, v in items:  # contiguous groups of roughly equal bytes (by each tensor's midpoint), in key order
        size = v.numel() * v.element_size()
        g = min(int((acc + size / 2) * len(groups) / max(total, 1)), len(groups) - 1)
        groups[g].append((k, v))
        acc += size
    groups = [g for g in groups if g]
    n = len(groups)
    paths = []
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"{stem}.{ext}" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        path = directory / name
        if fmt == "safetensors":
            save_file(OrderedDict(group), str(path), metadata={"format": "pt"})
        else:
            torch.save(OrderedDict(group), path)
        paths.append(path)
        weight_map.update({k: name for k, _ in group})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(directory / f"{stem}.{ext}.index.json", index)
    return paths


# ------------------------------------------------------------------------------------------------ original LLaVA


def _original_key(canonical: str, version: str) -> str | None:
    """The in-memory llava-hf key -> its name in haotian-liu/LLaVA; None where 1.5 keeps it elsewhere."""
    rules = (
        (r"^model\.language_model\.", "model."),
        (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^model\.image_newline$", "model.image_newline"),
        (r"^lm_head\.", "lm_head."),
    )
    if canonical.startswith("model.vision_tower."):
        if version == "1.5":
            return None  # 1.5 checkpoints do not contain the (frozen) tower
        return "model.vision_tower.vision_tower.vision_model." + canonical[len("model.vision_tower."):]
    for pattern, repl in rules:
        if re.match(pattern, canonical):
            return re.sub(pattern, repl, canonical)
    raise KeyError(canonical)


def _original_order(key: str) -> tuple:
    # module order of LlavaLlamaForCausalLM: LLaMA body, vision tower, projector, newline, then lm_head
    for rank, prefix in enumerate(("model.embed_tokens", "model.layers.", "model.norm", "model.vision_tower.",
                                   "model.mm_projector.", "model.image_newline", "lm_head")):
        if key.startswith(prefix):
            m = re.match(r"model\.layers\.(\d+)\.", key)
            return (rank, int(m.group(1)) if m else 0)
    return (99, 0)


def _original_config(ref, version: str, llm: str, dtype: str, tower_dir: Path) -> dict:
    """config.json in the field names of liuhaotian/llava-v1.5-7b, llava-v1.6-vicuna-7b, -mistral-7b."""
    t = ref.config.text_config
    v = ref.config.vision_config
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5" if version == "1.5" else (
            "mistralai/Mistral-7B-Instruct-v0.2" if llm == "mistral" else "lmsys/vicuna-7b-v1.5"),
        "architectures": ["LlavaMistralForCausalLM" if llm == "mistral" else "LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "image_aspect_ratio": "pad" if version == "1.5" else "anyres",
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "mm_hidden_size": v.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower_dir.resolve()),
        "model_type": "llava_mistral" if llm == "mistral" else "llava",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": bool(ref.config.tie_word_embeddings),
        "torch_dtype": dtype,
        "transformers_version": "4.31.0" if version == "1.5" else "4.36.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": t.vocab_size,
    }
    if version == "1.6":
        # 1.5's config predates rope_theta (readers must default it to 10000)
        cfg.update({
            "attention_bias": False,
            "attention_dropout": 0.0,
            "freeze_mm_vision_resampler": False,
            "image_crop_resolution": 224,
            "image_grid_pinpoints": [list(p) for p in ref.config.image_grid_pinpoints],
            "image_split_resolution": 224,
            "mm_patch_merge_type": "spatial_unpad",
            "mm_projector_lr": None,
            "mm_resampler_type": None,
            "mm_vision_tower_lr": 2e-06,
            "rope_theta": float(t.rope_theta if hasattr(t, "rope_theta") else t.rope_parameters["rope_theta"]),
            "tokenizer_model_max_length": t.max_position_embeddings,
            "tokenizer_padding_side": "right",
            "tune_mm_vision_resampler": False,
            "unfreeze_mm_vision_tower": True,
        })
        if llm == "mistral":
            cfg["sliding_window"] = None
    return dict(sorted(cfg.items()))


def _write_clip_dir(directory: Path, ref, *, with_weights: bool, seed: int) -> None:
    """A CLIP directory shaped like openai/clip-vit-large-patch14-336: config.json, an old-style
    preprocessor_config.json and (optionally) a full CLIPModel as pytorch_model.bin. Its vision tower holds
    the reference model's tower weights, so the original checkpoint and its reference see the same tower."""
    from transformers import CLIPConfig, CLIPModel

    directory.mkdir(parents=True, exist_ok=True)
    v = ref.config.vision_config
    vision = _vision_config_dict(v.image_size, v.patch_size)
    vision.pop("model_type")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, projection_dim=32, bos_token_id=97, eos_token_id=98, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    config.architectures = ["CLIPModel"]
    config.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    _write_json(directory / "config.json", cfg)
    size = v.image_size
    _write_json(directory / "preprocessor_config.json", {
        "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": size,
    })
    if not with_weights:
        return
    clip = CLIPModel(config)
    _randomize(clip, seed + 1000)
    tower = ref.model.vision_tower.state_dict()
    state = OrderedDict()
    for k, val in clip.state_dict().items():
        if k.startswith("vision_model."):
            val = tower[k[len("vision_model."):]]
        state[k] = val.detach().to(torch.float32)
    # checkpoints of that era also carry the position_ids buffers (int64)
    state["text_model.embeddings.position_ids"] = torch.arange(text["max_position_embeddings"])[None]
    state["vision_model.embeddings.position_ids"] = torch.arange((size // v.patch_size) ** 2 + 1)[None]
    save_sharded(directory, state, 1, fmt="bin")


def make_llava_original(
    directory: str | Path,
    version: str = "1.5",
    *,
    llm: str = "vicuna",
    seed: int = 0,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    shards: int | None = None,
    reference_dir: str | Path | None = None,
    vision_tower_dir: str | Path | None = None,
    image_size: int = TILE,
    patch_size: int = PATCH,
) -> TinyModel:
    """An original (haotian-liu/LLaVA) checkpoint in `directory`, its llava-hf twin and its CLIP directory.

    1.5: LlavaLlamaForCausalLM, `image_aspect_ratio: pad`, sharded pytorch_model-*.bin + index, no tower weights
    (they live in the CLIP dir named by `mm_vision_tower`, a full CLIPModel as pytorch_model.bin).
    1.6: `anyres` + `spatial_unpad`, tower inside (`model.vision_tower.vision_tower.vision_model.*`), sharded
    safetensors + index; the CLIP dir holds only config + preprocessor. `llm="mistral"` (1.6 only) gives
    LlavaMistralForCausalLM with GQA. The reference (llava-hf) defaults to `<directory>-hf`, the CLIP dir to
    `<directory>-clip`.
    """
    if version not in ("1.5", "1.6"):
        raise ValueError(f"version must be '1.5' or '1.6', not {version!r}")
    if llm == "mistral" and version != "1.6":
        raise ValueError("the Mistral variant exists for LLaVA-1.6 only")
    directory = Path(directory)
    reference_dir = Path(reference_dir) if reference_dir else Path(f"{directory}-hf")
    tower_dir = Path(vision_tower_dir) if vision_tower_dir else Path(f"{directory}-clip")
    text = "gqa" if llm == "mistral" else "mha"
    next_ = version == "1.6"
    ref_model = build_llava_hf_model(text, next_, llm=llm, seed=seed, dtype=dtype,
                                     tie_word_embeddings=tie_word_embeddings, image_size=image_size,
                                     patch_size=patch_size)
    ref = make_llava_hf(reference_dir, text, next_, llm=llm, dtype=dtype, tie_word_embeddings=tie_word_embeddings,
                        pad_to_square=not next_, model=ref_model)

    directory.mkdir(parents=True, exist_ok=True)
    _write_clip_dir(tower_dir, ref_model, with_weights=not next_, seed=seed)
    state = OrderedDict()
    for k, v in ref_model.state_dict().items():
        if tie_word_embeddings and k == "lm_head.weight":
            continue
        name = _original_key(k, version)
        if name is not None:
            state[name] = v
    state = OrderedDict(sorted(state.items(), key=lambda kv: _original_order(kv[0])))
    if next_:
        save_sharded(directory, state, shards or 3, fmt="safetensors")
    else:
        save_sharded(directory, state, shards or 2, fmt="bin")
    _write_json(directory / "config.json", _original_config(ref_model, version, llm, dtype, tower_dir))
    _write_json(directory / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                 "transformers_version": "4.31.0" if version == "1.5" else "4.36.2"})
    tokenizer_size = write_tokenizer(directory, with_image_token=False, chat_template=None,
                                     model_max_length=2048 if version == "1.5" else 4096, padding_side="right")
    return replace(
        ref, path=directory, reference_path=reference_dir, fmt="original", layout="original",
        tokenizer_size=tokenizer_size, vision_tower_path=tower_dir, pad_token_id=0,
        reference=ref,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
