"""Model configuration: one frozen dataclass tree read from either checkpoint format's config.json.

llava-hf checkpoints nest `text_config` / `vision_config`; original LLaVA checkpoints (haotian-liu/LLaVA) put the
LLaMA fields at the top level, name the projector with `mm_*` fields and keep the CLIP tower's config in a separate
directory or hub repo (`mm_vision_tower`). Both end up as the same `LlavaConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# CLIP ViT-L/14-336, the tower of every released LLaVA-1.5/1.6; used when the tower's own config is unreachable.
CLIP_VIT_L_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "num_channels": 3,
}
# The hub default of transformers' CLIPVisionConfig, used for absent fields of a llava-hf vision_config.
_CLIP_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "num_channels": 3,
}
# transformers' LlavaConfig falls back to these text settings (a LlamaConfig) when a field is absent.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0,
}
LLAVA_HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")


class ConfigError(ValueError):
    """A checkpoint config jaxvlm cannot serve; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # frozen dict; None = plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    text: TextConfig
    vision: VisionTowerConfig
    feature_layers: tuple[int, ...]  # indices into CLIP hidden_states (0 = pre-layernorm embeddings)
    feature_strategy: str  # "default" drops the CLS token, "full" keeps it
    projector: str  # "mlp2x_gelu" | "linear"
    projector_bias: bool
    projector_act: str
    image_token_index: int | None  # llava-hf's <image> id; None for original checkpoints (no such token)
    anyres: bool  # LLaVA-NeXT tiling
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None
    unpad_rounding: str  # "hf" (round) or "original" (int truncation): each format follows its own reference
    checkpoint_format: str  # "llava-hf" | "original"
    dtype: str  # the checkpoint's own dtype name
    vision_tower_source: str | None = None  # original 1.5: where the CLIP weights live

    @property
    def tokens_per_tile(self) -> int:
        return self.vision.patches_per_side**2 + (1 if self.feature_strategy == "full" else 0)

    @property
    def vision_layers_used(self) -> int:
        """CLIP layers that the selected feature layers need: later ones are never run nor loaded."""
        n = self.vision.num_layers
        return max(i if i >= 0 else n + 1 + i for i in self.feature_layers)


def _frozen(d: dict | None) -> tuple | None:
    return None if not d else tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _dtype_name(cfg: dict) -> str:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return str(d).replace("torch.", "")


def _text_config(t: dict) -> TextConfig:
    t = {**_LLAMA_DEFAULTS, **{k: v for k, v in t.items() if v is not None}}
    heads = t["num_attention_heads"]
    rope = dict(t.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", t.get("rope_theta", 10000.0)))
    scaling = t.get("rope_scaling") or rope
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        rms_norm_eps=float(t["rms_norm_eps"]),
        rope_theta=rope_theta,
        rope_scaling=_frozen(scaling),
        max_position_embeddings=t["max_position_embeddings"],
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        attention_bias=bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
        sliding_window=t.get("sliding_window"),
    )


def _vision_config(v: dict) -> VisionTowerConfig:
    v = {**_CLIP_DEFAULTS, **{k: x for k, x in v.items() if x is not None}}
    return VisionTowerConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        layer_norm_eps=float(v["layer_norm_eps"]),
        hidden_act=v["hidden_act"],
        num_channels=v["num_channels"],
    )


def _pinpoints(p) -> tuple[tuple[int, int], ...] | None:
    if p is None:
        return None
    if isinstance(p, str):  # original checkpoints sometimes store e.g. "(1x1),...,(3x3)"; unsupported
        raise ConfigError(f"image_grid_pinpoints given as {p!r}; a list of [height, width] pairs is required")
    return tuple((int(a), int(b)) for a, b in p)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"missing config file: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def detect_format(cfg: dict) -> str:
    arch = tuple(cfg.get("architectures") or ())
    if any(a in LLAVA_HF_ARCHITECTURES for a in arch) or cfg.get("model_type") in ("llava", "llava_next") and (
        "text_config" in cfg or "vision_config" in cfg
    ):
        return "llava-hf"
    if any(a in ORIGINAL_ARCHITECTURES for a in arch) or "mm_vision_tower" in cfg:
        return "original"
    raise ConfigError(
        f"unknown architecture {list(arch) or cfg.get('model_type')!r}: jaxvlm serves llava-hf "
        f"{LLAVA_HF_ARCHITECTURES} and original LLaVA {ORIGINAL_ARCHITECTURES} checkpoints"
    )


def llava_config_from_hf(cfg: dict) -> LlavaConfig:
    """A llava-hf config.json (LlavaConfig or LlavaNextConfig)."""
    layers = cfg.get("vision_feature_layer", -2)
    anyres = cfg.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in (
        cfg.get("architectures") or ()
    )
    text = dict(cfg.get("text_config") or {})
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    act = cfg.get("projector_hidden_act", "gelu")
    return LlavaConfig(
        text=_text_config(text),
        vision=_vision_config(cfg.get("vision_config") or {}),
        feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),),
        feature_strategy=cfg.get("vision_feature_select_strategy", "default"),
        projector="mlp2x_gelu",
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        projector_act=act,
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        anyres=anyres,
        image_grid_pinpoints=_pinpoints(cfg.get("image_grid_pinpoints")) if anyres else None,
        unpad_rounding="hf",
        checkpoint_format="llava-hf",
        dtype=_dtype_name(cfg) if "torch_dtype" in cfg or "dtype" in cfg else _dtype_name(text),
    )


def llava_config_from_original(cfg: dict, vision_tower_config: dict | None) -> LlavaConfig:
    """An original LLaVA config.json plus the config of its CLIP tower (None: CLIP ViT-L/14-336)."""
    projector = cfg.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ConfigError(f"mm_projector_type {projector!r} is not supported (linear, mlp2x_gelu)")
    ratio = str(cfg.get("image_aspect_ratio", ""))
    if ratio.startswith("anyres") and ratio != "anyres":
        raise ConfigError(f"image_aspect_ratio {ratio!r} (a later LLaVA-NeXT tiling rule) is not supported; "
                          "haotian-liu/LLaVA checkpoints use 'anyres'")
    anyres = ratio == "anyres"
    merge = cfg.get("mm_patch_merge_type", "flat")
    if anyres and merge != "spatial_unpad":
        raise ConfigError(f"mm_patch_merge_type {merge!r} is not supported with anyres (spatial_unpad)")
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
    vt = vision_tower_config or CLIP_VIT_L_336
    vt = vt.get("vision_config", vt)  # a full CLIPModel config nests the tower's
    return LlavaConfig(
        text=_text_config(cfg),
        vision=_vision_config(vt),
        feature_layers=(int(cfg.get("mm_vision_select_layer", -2)),),
        feature_strategy="default" if select == "patch" else "full",
        projector=projector,
        projector_bias=True,
        projector_act="gelu",
        image_token_index=None,
        anyres=anyres,
        image_grid_pinpoints=_pinpoints(cfg.get("image_grid_pinpoints")) if anyres else None,
        unpad_rounding="original",
        checkpoint_format="original",
        dtype=_dtype_name(cfg),
        vision_tower_source=cfg.get("mm_vision_tower"),
    )
