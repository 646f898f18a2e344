"""Pixel preprocessing for LLaVA-1.5 and LLaVA-NeXT: PIL and numpy on the host, or the same resize on the device.

Two families of checkpoints are served, each matched to its own reference:

* llava-hf (``from_hf``): transformers' ``CLIPImageProcessor``, ``LlavaImageProcessor`` (optionally padding
  to a square with the mean colour first) and ``LlavaNextImageProcessor`` (anyres tiles), PIL backend.
* original haotian-liu/LLaVA (``from_original``): ``process_images`` with ``image_aspect_ratio`` "pad",
  "anyres" or anything else (plain CLIP processing).

Resizing goes through ``PIL.Image.resize`` on uint8 RGB data, or with ``on_device`` through ``resample.py``'s
tables, which give PIL's bytes on the accelerator; rescale/normalize use the same float64 -> float32 steps as
transformers, so results match the references bit for bit. Images always become
3-channel RGB (``do_convert_rgb`` is not consulted): the vision towers take nothing else.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .anyres import feature_layout, grid_shape, select_best_resolution
from .resample import FILTERS, render

__all__ = ["ProcessedImage", "ImageProcessor", "CLIP_VIT_L_336_PREPROCESSOR"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = int(Image.Resampling.BICUBIC)

# transformers' class defaults for CLIP/Llava/LlavaNext image processors (used for absent fields).
_HF_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "default_to_square": False,
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "resample": BICUBIC,
}
_NEXT_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# preprocessor_config.json of openai/clip-vit-large-patch14-336, the tower of every original LLaVA-1.5/1.6;
# used when an original checkpoint ships no processor config of its own.
CLIP_VIT_L_336_PREPROCESSOR: dict[str, Any] = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 336,
}

_CLIP_TYPES = {"CLIPImageProcessor", "CLIPFeatureExtractor"}
_LLAVA_TYPES = {"LlavaImageProcessor"}
_NEXT_TYPES = {"LlavaNextImageProcessor"}


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower: its resized and cropped uint8 tiles, and the table that rescales
    and normalizes them. The engine ships the tiles as they are (a quarter of the float32 bytes) and gathers
    through the table on the device; `pixel_values` does the same gather on the host."""

    tiles: Any  # uint8 [num_tiles, S, S, 3], numpy or a device array; tile 0: the whole (NeXT: base) image
    image_size: tuple[int, int]  # original (height, width)
    grid: tuple[int, int] | None  # NeXT: (rows, cols) of the grid tiles; None for LLaVA-1.5
    value_table: np.ndarray | None = None  # float32 [3, 256]: each channel's normalized value of each uint8
    source: np.ndarray | None = None  # device tiles: the host uint8 RGB image they were made from

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @functools.cached_property
    def pixel_values(self) -> np.ndarray:
        """float32 [num_tiles, 3, S, S], as transformers' processor gives them."""
        return normalize_tiles(self.tiles, self.value_table)


@functools.cache
def _transformers_composites_alpha() -> bool:
    """Whether the installed transformers puts transparent pixels onto white (recent releases) or drops alpha
    (5.17 and before); llava-hf processing follows the release it would be compared with."""
    from transformers.image_transforms import convert_to_rgb

    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    try:
        rgb = convert_to_rgb(clear, return_numpy=True)
    except TypeError:  # releases that drop alpha take no return_numpy
        rgb = convert_to_rgb(clear)
    return bool(np.asarray(rgb).reshape(-1)[0] == 255)


@dataclass(frozen=True)
class ImageProcessor:
    """Preprocessing settings; call it on a PIL image.

    ``aspect`` is "crop" (resize the short side, centre crop), "pad" (pad to a square with ``pad_color``
    first) or "anyres" (LLaVA-NeXT tiles). ``convention`` says whose reference to follow where llava-hf
    and the original repo differ: alpha handling, anyres tie-break and canvas resampling, and the rounding
    that ``layout`` uses.
    """

    aspect: str = "crop"
    convention: str = "hf"
    do_resize: bool = True
    shortest_edge: int | None = 336
    resize_hw: tuple[int, int] | None = None
    do_center_crop: bool = True
    crop_hw: tuple[int, int] | None = (336, 336)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = BICUBIC
    pad_color: tuple[int, int, int] = (122, 116, 104)
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    # Resize on the accelerator (`resample.py`, bit-identical to PIL): the host's PIL resize of a 640x480 image
    # into LLaVA-NeXT's tiles was ~10 ms of the time to first token on a GPU machine's host.
    on_device: bool = False

    def __post_init__(self) -> None:
        if self.aspect not in ("crop", "pad", "anyres"):
            raise ValueError(f"aspect must be 'crop', 'pad' or 'anyres', got {self.aspect!r}")
        if self.convention not in ("hf", "original"):
            raise ValueError(f"convention must be 'hf' or 'original', got {self.convention!r}")
        if (self.shortest_edge is None) == (self.resize_hw is None):
            raise ValueError("exactly one of shortest_edge and resize_hw must be set")
        if self.aspect == "anyres" and not self.grid_pinpoints:
            raise ValueError("anyres preprocessing needs image_grid_pinpoints")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (RGB)")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, preprocessor_config: Mapping[str, Any], model_config: Mapping[str, Any] | None = None) -> ImageProcessor:
        """Settings of a llava-hf checkpoint (its preprocessor_config.json and optionally config.json)."""
        cfg = dict(preprocessor_config)
        model_config = dict(model_config or {})
        kind = _hf_kind(cfg, model_config)
        settings = _clip_settings(cfg)
        if kind == "next":
            pinpoints = cfg.get("image_grid_pinpoints")
            if pinpoints is None:
                pinpoints = model_config.get("image_grid_pinpoints")
            settings["aspect"] = "anyres"
            settings["grid_pinpoints"] = _pinpoints(pinpoints) if pinpoints is not None else _NEXT_DEFAULT_PINPOINTS
        elif kind == "llava" and cfg.get("do_pad"):
            settings["aspect"] = "pad"
        else:
            settings["aspect"] = "crop"
        return cls(convention="hf", **settings)

    @classmethod
    def from_original(
        cls, llava_config: Mapping[str, Any], clip_preprocessor_config: Mapping[str, Any] | None = None
    ) -> ImageProcessor:
        """Settings of an original LLaVA checkpoint: its config.json plus its vision tower's processor."""
        clip_cfg = dict(clip_preprocessor_config if clip_preprocessor_config is not None else CLIP_VIT_L_336_PREPROCESSOR)
        settings = _clip_settings(clip_cfg)
        ratio = llava_config.get("image_aspect_ratio")
        if ratio == "pad":
            settings["aspect"] = "pad"
        elif ratio == "anyres":
            pinpoints = llava_config.get("image_grid_pinpoints")
            if pinpoints is None:
                raise ValueError("image_aspect_ratio 'anyres' needs image_grid_pinpoints in the config")
            settings["aspect"] = "anyres"
            settings["grid_pinpoints"] = _pinpoints(pinpoints)
        elif str(ratio).startswith("anyres"):
            # Variants such as "anyres_max_9" come from later LLaVA-NeXT repos with another tiling rule;
            # haotian-liu/LLaVA has no such mode, so refuse rather than silently crop.
            raise ValueError(f"image_aspect_ratio {ratio!r} is not supported (use 'anyres', 'pad' or 'square')")
        else:
            # process_images falls back to the plain CLIP processor for any other value.
            settings["aspect"] = "crop"
        return cls(convention="original", **settings)

    # ----------------------------------------------------------------- properties
    @property
    def tile_size(self) -> int:
        """Side of each tile fed to the vision tower (NeXT grid tiles are cut at this size)."""
        if self.crop_hw is not None:
            return self.crop_hw[0]
        if self.resize_hw is not None:
            return self.resize_hw[0]
        return int(self.shortest_edge)  # type: ignore[arg-type]

    def layout(
        self, image: ProcessedImage, patches_per_side: int, tokens_per_tile: int, newline: bool
    ) -> np.ndarray:
        """``anyres.feature_layout`` for a processed image, with this checkpoint's rounding."""
        return feature_layout(image.image_size, image.grid, patches_per_side, tokens_per_tile, self.convention, newline)

    # ----------------------------------------------------------------- processing
    def __call__(self, image: Image.Image) -> ProcessedImage:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        rgb = self._to_rgb(image)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise ValueError(f"empty image ({width}x{height})")

        grid = None
        if self.aspect == "anyres":
            grid = grid_shape((height, width), self.grid_pinpoints, self.tile_size, self.convention)  # type: ignore[arg-type]
        plan = self._device_plan(rgb) if self.on_device else None
        if plan is not None:
            crops = render(*plan)
        else:
            if self.aspect == "anyres":
                tiles = self._anyres_tiles(rgb)
            elif self.aspect == "pad":
                tiles = [_pad_to_square(rgb, self.pad_color)]
            else:
                tiles = [rgb]
            crops = np.stack([self._resize_and_crop(tile) for tile in tiles])
        return ProcessedImage(tiles=crops, image_size=(height, width), grid=grid, value_table=self._value_table,
                              source=rgb if plan is not None else None)

    def _device_plan(self, rgb: np.ndarray) -> tuple[np.ndarray, int, list[tuple], tuple[int, int]] | None:
        """The source, filter, canvases (output size, canvas size, offset) and tile size that give this image's
        tiles in one device call, or None where the processing has no such form (a filter with no exact device
        form, or anyres tiles that a second resize or crop would change) or nothing is resized (the host then
        only copies pixels, faster than a device call)."""
        if self.aspect == "anyres":
            tile = self.tile_size
            source, (resample, canvases) = rgb, self._anyres_canvases(*rgb.shape[:2])
            if canvases[0][0] != (tile, tile) or not self._keeps(tile, tile):
                return None
            tile_hw = (tile, tile)
        else:
            source = _pad_to_square(rgb, self.pad_color) if self.aspect == "pad" else rgb
            size = tuple(self._target(source.shape[:2]) if self.do_resize else source.shape[:2])
            tile_hw = tuple(self.crop_hw if self.do_center_crop and self.crop_hw is not None else size)
            (src_y, dst_y, _), (src_x, dst_x, _) = _crop_axis(size[0], tile_hw[0]), _crop_axis(size[1], tile_hw[1])
            resample, canvases = self.resample, [(size, tile_hw, (dst_y - src_y, dst_x - src_x))]
        if resample not in FILTERS or all(out == source.shape[:2] for out, _, _ in canvases):
            return None
        return source, resample, canvases, tile_hw

    def _anyres_canvases(self, height: int, width: int) -> tuple[int, list[tuple]]:
        """LLaVA-NeXT's filter and its two canvases, as (output size, canvas size, offset): the base image resized
        to its own canvas, and the image fitted into the chosen pinpoint's canvas, centred."""
        # The original calls PIL's resize without a filter (bicubic); transformers passes its resample.
        resample = BICUBIC if self.convention == "original" else self.resample
        base_hw = tuple(self.resize_hw) if self.resize_hw is not None else (self.shortest_edge, self.shortest_edge)
        canvas = select_best_resolution((height, width), self.grid_pinpoints, self.convention)  # type: ignore[arg-type]
        fit_h, fit_w = _fit_inside((height, width), canvas)
        offset = ((canvas[0] - fit_h) // 2, (canvas[1] - fit_w) // 2)
        return resample, [(base_hw, base_hw, (0, 0)), ((fit_h, fit_w), canvas, offset)]

    def _keeps(self, height: int, width: int) -> bool:
        """Whether `_resize_and_crop` returns a tile of this size unchanged."""
        if self.do_resize and tuple(self._target((height, width))) != (height, width):
            return False
        return not (self.do_center_crop and self.crop_hw is not None) or tuple(self.crop_hw) == (height, width)

    def _to_rgb(self, image: Image.Image) -> np.ndarray:
        if self.convention == "original":
            # The original repo loads with convert('RGB'), which simply drops alpha.
            return np.asarray(image.convert("RGB"))
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if not has_alpha or not _transformers_composites_alpha():
            return np.asarray(image.convert("RGB"))
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    def _anyres_tiles(self, rgb: np.ndarray) -> list[np.ndarray]:
        resample, [(base_hw, _, _), ((fit_h, fit_w), (canvas_h, canvas_w), (top, left))] = \
            self._anyres_canvases(*rgb.shape[:2])
        base = _resize(rgb, base_hw, resample)
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[top : top + fit_h, left : left + fit_w] = _resize(rgb, (fit_h, fit_w), resample)

        tile = self.tile_size
        grid_tiles = [
            canvas[y : y + tile, x : x + tile] for y in range(0, canvas_h, tile) for x in range(0, canvas_w, tile)
        ]
        return [base, *grid_tiles]

    def _target(self, size_hw: Sequence[int]) -> tuple[int, int]:
        """What the resize step makes of an image of ``size_hw``."""
        if self.resize_hw is not None:
            return tuple(self.resize_hw)  # type: ignore[return-value]
        return _short_side_size(size_hw, int(self.shortest_edge))  # type: ignore[arg-type]

    def _resize_and_crop(self, tile: np.ndarray) -> np.ndarray:
        """Resize and centre crop one HWC uint8 tile."""
        out: np.ndarray = tile
        if self.do_resize:
            target = self._target(out.shape[:2])
            if tuple(target) != out.shape[:2]:  # PIL returns a same-size resize as a copy: skip the round trip
                out = _resize(out, target, self.resample)
        if self.do_center_crop and self.crop_hw is not None:
            out = _center_crop(out, self.crop_hw)
        return out

    @functools.cached_property
    def _value_table(self) -> np.ndarray:
        """[3, 256] float32: what rescale + normalize make of each uint8 value in each channel.

        Both steps are per-element functions of a uint8 value, so a 768-entry table computed with
        transformers' exact precision path (a float64 product, then float32 arithmetic) gives bit-identical
        tiles in one gather, on the host or on the device."""
        out = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
        if self.do_rescale:
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            out = out.astype(np.float32)
            out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(np.asarray(out, np.float32).T)


# --------------------------------------------------------------------- config parsing
def _hf_kind(cfg: Mapping[str, Any], model_config: Mapping[str, Any]) -> str:
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if name:
        for suffix in ("Fast", "Pil"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name in _NEXT_TYPES:
            return "next"
        if name in _LLAVA_TYPES:
            return "llava"
        if name in _CLIP_TYPES:
            return "clip"
        raise ValueError(f"unsupported image_processor_type {name!r} for a LLaVA checkpoint")
    # No type recorded: go by the model.
    if model_config.get("model_type") == "llava_next" or "image_grid_pinpoints" in cfg:
        return "next"
    return "llava"


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    """A field, with transformers' rule that a missing or null field takes the class default."""
    value = cfg.get(key)
    return _HF_DEFAULTS[key] if value is None else value


def _clip_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    shortest_edge, resize_hw = _parse_size(_get(cfg, "size"), bool(_get(cfg, "default_to_square")))
    mean = _three(_get(cfg, "image_mean"), "image_mean")
    return {
        "do_resize": bool(_get(cfg, "do_resize")),
        "shortest_edge": shortest_edge,
        "resize_hw": resize_hw,
        "do_center_crop": bool(_get(cfg, "do_center_crop")),
        "crop_hw": _parse_crop(_get(cfg, "crop_size")),
        "do_rescale": bool(_get(cfg, "do_rescale")),
        "rescale_factor": float(_get(cfg, "rescale_factor")),
        "do_normalize": bool(_get(cfg, "do_normalize")),
        "image_mean": mean,
        "image_std": _three(_get(cfg, "image_std"), "image_std"),
        "resample": int(_get(cfg, "resample")),
        # Both references pad with int(255 * mean) per channel: (122, 116, 104) for CLIP.
        "pad_color": tuple(int(m * 255) for m in mean),
    }


def _parse_size(size: Any, default_to_square: bool) -> tuple[int | None, tuple[int, int] | None]:
    if isinstance(size, int):
        return (None, (size, size)) if default_to_square else (size, None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, (int(size[0]), int(size[1]))
    if isinstance(size, Mapping):
        keys = set(size)
        if keys == {"shortest_edge"}:
            return int(size["shortest_edge"]), None
        if keys == {"height", "width"}:
            return None, (int(size["height"]), int(size["width"]))
    raise ValueError(f"unsupported 'size' in the image processor config: {size!r}")


def _parse_crop(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    if isinstance(crop, Mapping) and set(crop) == {"height", "width"}:
        return int(crop["height"]), int(crop["width"])
    raise ValueError(f"unsupported 'crop_size' in the image processor config: {crop!r}")


def _three(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # type: ignore[return-value]
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return values  # type: ignore[return-value]


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if isinstance(value, str):
        # The original repo also accepts the list written as a Python literal string.
        value = ast.literal_eval(value)
    pairs = tuple((int(a), int(b)) for a, b in value)
    if not pairs:
        raise ValueError("image_grid_pinpoints must not be empty")
    return pairs


# --------------------------------------------------------------------- pixel helpers
def normalize_tiles(tiles: np.ndarray, value_table: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] tiles -> float32 [N, 3, S, S] through a [3, 256] table (`ImageProcessor._value_table`);
    the engine's device path (`runner.ModelRunner.encode_images`) gathers the same way."""
    out = np.empty((tiles.shape[0], 3, *tiles.shape[1:3]), np.float32)
    for c in range(3):
        np.take(value_table[c], tiles[..., c], out=out[:, c])
    return out


def _resize(rgb: np.ndarray, size_hw: Sequence[int], resample: int) -> np.ndarray:
    height, width = (int(v) for v in size_hw)
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def _short_side_size(size_hw: Sequence[int], shortest_edge: int) -> tuple[int, int]:
    """Output (height, width) when the short side becomes ``shortest_edge`` (long side truncated)."""
    height, width = size_hw
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def _fit_inside(size_hw: Sequence[int], canvas_hw: Sequence[int]) -> tuple[int, int]:
    """Largest aspect-keeping size inside the canvas, the rounding-up rule both references use."""
    height, width = size_hw
    canvas_h, canvas_w = canvas_hw
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def _pad_to_square(rgb: np.ndarray, color: Sequence[int]) -> np.ndarray:
    height, width = rgb.shape[:2]
    if height == width:
        return rgb
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(color, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = rgb
    return out


def _center_crop(rgb: np.ndarray, crop_hw: Sequence[int]) -> np.ndarray:
    """Centre crop; a side smaller than the crop is zero-padded, its extra pixel (if odd) going on top/left."""
    crop_h, crop_w = (int(v) for v in crop_hw)
    height, width = rgb.shape[:2]
    out = np.zeros((crop_h, crop_w) + rgb.shape[2:], dtype=rgb.dtype)
    src_y, dst_y, span_h = _crop_axis(height, crop_h)
    src_x, dst_x, span_w = _crop_axis(width, crop_w)
    out[dst_y : dst_y + span_h, dst_x : dst_x + span_w] = rgb[src_y : src_y + span_h, src_x : src_x + span_w]
    return out


def _crop_axis(size: int, crop: int) -> tuple[int, int, int]:
    """(source start, destination start, length) of the kept span along one axis."""
    if crop <= size:
        return (size - crop) // 2, 0, crop
    return 0, math.ceil((crop - size) / 2), size
