"""A tiny LLaVA-1.5 checkpoint with random weights, written with numpy only, for `jaxvlm demo` and smoke tests.

The directory is a complete llava-hf checkpoint (the file layout of llava-hf/llava-1.5-7b-hf, at toy sizes):
config.json with full text/vision sub-configs, model.safetensors, a CLIPImageProcessor preprocessor_config.json
(28-pixel crop, 14-pixel patches: 4 image tokens), a word-level `tokenizers` tokenizer that
`transformers.AutoTokenizer` loads offline, a chat template and generation_config.json. Everything is derived
from a fixed seed and a fixed word list, so every build is byte-identical.

Because the weights are random, the model's answers are random words: it shows that the machinery runs, not
what a LLaVA model says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["DEMO_FORMAT_VERSION", "demo_model_dir", "make_demo_model"]

# Bump when the files written here change, so cached copies of an older demo are rebuilt.
DEMO_FORMAT_VERSION = 1
_SEED = 20240501
_MARKER = "jaxvlm_demo.json"

# Toy sizes. The vision tower sees one 28x28 tile cut into 2x2 patches of 14 pixels.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=16, max_position_embeddings=512)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
               patch_size=14)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA's vocabulary
_IMAGE_TOKEN = "<image>"
_PAD_TOKEN = "<pad>"

# The word-level vocabulary: the chat template's own words, punctuation, and a few hundred common words so
# that the random answers read as (meaningless) English. No apostrophes: transformers' clean-up of " 's"
# would make a streamed prefix differ from the final text.
_WORDS = """
user assistant system : . , ? ! - ( ) a an the this that these those it its is are was were be been has have had
do does did not no yes and or but if then so because of in on at to from by with without for about into over
under above below near far between behind beside inside outside up down left right top bottom middle center
front back here there where what which who how why when i you he she we they me him her us them my your our
their one two three four five six seven eight nine ten many few some all every each more most less little
big small large tiny long short tall wide narrow round square flat bright dark light heavy old new young
happy sad quiet loud warm cold hot wet dry soft hard clean busy empty full open closed red orange yellow
green blue purple pink brown black white gray silver gold color colors image picture photo scene view
describe describes shows show showing see looks look appears seems there person people man woman child
children boy girl friend family dog cat bird horse cow sheep fish animal animals tree trees flower flowers
grass leaf leaves garden park field forest mountain hill river lake sea ocean beach sand water sky cloud
clouds sun moon star rain snow wind weather day night morning evening afternoon house home room kitchen
table chair bed window door wall floor roof street road city town village bridge building car bus train
boat bicycle plane truck sign light lamp book cup plate bowl bottle glass food bread apple banana cake
pizza fruit ball toy box bag hat shirt shoe computer phone screen clock picture painting line shape circle
triangle pattern gradient texture surface edge corner side part piece group pair row stands sits walks
runs plays holds carries wears eats drinks reads writes smiles waits rests sleeps flies swims grows moves
stops turns opens closes standing sitting walking running playing holding wearing eating smiling waiting
resting sleeping flying swimming growing moving near next together alone also very quite rather almost
just only still again always never often sometimes perhaps maybe probably clearly simply mostly partly
background foreground detail details object objects area space time place way thing things kind sort
""".split()


def demo_model_dir() -> Path:
    """Where the cached demo model lives: ``$JAXVLM_CACHE_DIR/demo-model``, else ``$XDG_CACHE_HOME/jaxvlm/
    demo-model``, else ``~/.cache/jaxvlm/demo-model`` (the same root as the compilation cache)."""
    root = os.environ.get("JAXVLM_CACHE_DIR")
    if not root:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache_home, "jaxvlm")
    return Path(os.path.expanduser(root)) / "demo-model"


def make_demo_model(directory: str | os.PathLike | None = None) -> Path:
    """Writes the demo checkpoint into ``directory`` (default: :func:`demo_model_dir`) and returns its path.

    An existing complete copy of the same format version is reused as is. A new copy is built in a temporary
    sibling directory and renamed into place, so an interrupted build never leaves a half-written model, and
    two processes building at once both end up with one complete copy.
    """
    target = Path(directory).expanduser() if directory is not None else demo_model_dir()
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        _write_checkpoint(staging)
        if target.exists():  # an older or broken copy: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_current(target):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_current(directory: Path) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == DEMO_FORMAT_VERSION


# ------------------------------------------------------------------------------------------------ vocabulary


def _vocabulary() -> dict[str, int]:
    """Token -> id for the base vocabulary (specials first, then the words, each once)."""
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    return vocab


def _layout() -> dict[str, int]:
    """Ids that the config, tokenizer and weights must agree on."""
    base = len(_vocabulary())
    image, pad = base, base + 1  # llava-hf puts <image> and <pad> right after the base vocabulary
    rows = -(-(pad + 1) // 64) * 64  # embedding rows padded to a multiple of 64, as llava-hf pads to 32064
    return {"image": image, "pad": pad, "vocab_rows": rows}


# ------------------------------------------------------------------------------------------------ files


def _write_checkpoint(directory: Path) -> None:
    ids = _layout()
    _write_tokenizer(directory, ids)
    _write_json(directory / "config.json", _model_config(ids))
    _write_json(directory / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": ids["pad"]})
    _write_json(directory / "preprocessor_config.json", {
        "crop_size": {"height": _VISION["image_size"], "width": _VISION["image_size"]},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": _VISION["image_size"]},
    })
    _write_json(directory / "processor_config.json", {
        "image_token": _IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": _VISION["patch_size"],
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    })
    _write_weights(directory / "model.safetensors", ids["vocab_rows"])
    # Written last: its presence means the directory is complete.
    _write_json(directory / _MARKER, {
        "format_version": DEMO_FORMAT_VERSION, "seed": _SEED,
        "note": "jaxvlm demo model with RANDOM weights; its answers are meaningless",
    })


def _model_config(ids: dict[str, int]) -> dict:
    tokens_per_image = (_VISION["image_size"] // _VISION["patch_size"]) ** 2
    text = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **_TEXT, "vocab_size": ids["vocab_rows"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": ids["pad"], "torch_dtype": "float32",
    }
    vision = {
        "model_type": "clip_vision_model", **_VISION, "num_channels": 3, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": _VISION["hidden_size"], "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": ids["image"], "image_seq_length": tokens_per_image, "pad_token_id": ids["pad"],
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True, "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "torch_dtype": "float32",
        "text_config": text, "vision_config": vision,
    }


def _write_tokenizer(directory: Path, ids: dict[str, int]) -> None:
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=_vocabulary(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation; newlines drop out
    tok.post_processor = processors.TemplateProcessing(  # BOS first, as LLaMA tokenizers do
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tok.add_special_tokens([AddedToken(_IMAGE_TOKEN, special=True, normalized=False),
                            AddedToken(_PAD_TOKEN, special=True, normalized=False)])
    assert tok.token_to_id(_IMAGE_TOKEN) == ids["image"] and tok.token_to_id(_PAD_TOKEN) == ids["pad"]
    tok.save(str(directory / "tokenizer.json"))

    named = {**{t: i for i, t in enumerate(_SPECIALS)}, _IMAGE_TOKEN: ids["image"], _PAD_TOKEN: ids["pad"]}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in named.items()},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": _PAD_TOKEN,
        "extra_special_tokens": {"image_token": _IMAGE_TOKEN}, "clean_up_tokenization_spaces": True,
        "model_max_length": _TEXT["max_position_embeddings"], "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": _PAD_TOKEN})


# A vicuna-style template in the llava-hf manner: content is a string or a list of parts, and a turn's image
# parts become "<image>\n" ahead of its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for p in parts if p['type'] in ['image', 'image_url'] %}{{ '<image>\n' }}{% endfor %}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------ weights


def _shapes(vocab_rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, named as on the hub (transformers 4.x llava-hf layout)."""
    t, v = _TEXT, _VISION
    h, hv = t["hidden_size"], v["hidden_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    out: list[tuple[str, tuple[int, ...]]] = []
    vm = "vision_tower.vision_model."
    out += [(vm + "embeddings.class_embedding", (hv,)),
            (vm + "embeddings.patch_embedding.weight", (hv, 3, v["patch_size"], v["patch_size"])),
            (vm + "embeddings.position_embedding.weight", (patches + 1, hv)),
            (vm + "pre_layrnorm.weight", (hv,)), (vm + "pre_layrnorm.bias", (hv,))]
    for i in range(v["num_hidden_layers"]):
        p = f"{vm}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(f"{p}self_attn.{proj}.weight", (hv, hv)), (f"{p}self_attn.{proj}.bias", (hv,))]
        out += [(f"{p}layer_norm1.weight", (hv,)), (f"{p}layer_norm1.bias", (hv,)),
                (f"{p}mlp.fc1.weight", (v["intermediate_size"], hv)), (f"{p}mlp.fc1.bias", (v["intermediate_size"],)),
                (f"{p}mlp.fc2.weight", (hv, v["intermediate_size"])), (f"{p}mlp.fc2.bias", (hv,)),
                (f"{p}layer_norm2.weight", (hv,)), (f"{p}layer_norm2.bias", (hv,))]
    out += [(vm + "post_layernorm.weight", (hv,)), (vm + "post_layernorm.bias", (hv,))]
    out += [("multi_modal_projector.linear_1.weight", (h, hv)), ("multi_modal_projector.linear_1.bias", (h,)),
            ("multi_modal_projector.linear_2.weight", (h, h)), ("multi_modal_projector.linear_2.bias", (h,))]
    lm = "language_model.model."
    out.append((lm + "embed_tokens.weight", (vocab_rows, h)))
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        out += [(f"{p}self_attn.q_proj.weight", (q, h)), (f"{p}self_attn.k_proj.weight", (kv, h)),
                (f"{p}self_attn.v_proj.weight", (kv, h)), (f"{p}self_attn.o_proj.weight", (h, q)),
                (f"{p}mlp.gate_proj.weight", (t["intermediate_size"], h)),
                (f"{p}mlp.up_proj.weight", (t["intermediate_size"], h)),
                (f"{p}mlp.down_proj.weight", (h, t["intermediate_size"])),
                (f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    out += [(lm + "norm.weight", (h,)), ("language_model.lm_head.weight", (vocab_rows, h))]
    return out


def _write_weights(path: Path, vocab_rows: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(_SEED)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in _shapes(vocab_rows):
        noise = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2:  # matrices ~ N(0, 1/fan_in): activations stay O(1) through the layers
            value = noise / np.float32(np.sqrt(np.prod(shape[1:])))
        elif "norm" in name and name.endswith("weight"):  # norm scales around 1
            value = 1.0 + 0.1 * noise
        else:  # biases and the class embedding
            value = 0.1 * noise
        tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
    # "format": "pt" is what transformers checks for in a safetensors header before loading it.
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
