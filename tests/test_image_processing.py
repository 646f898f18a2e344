"""jaxvlm.image_processing against transformers' PIL-backend image processors (the reference)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from jaxvlm import image_processing
from jaxvlm.image_processing import CLIP_VIT_L_336_PREPROCESSOR, ImageProcessor, ProcessedImage

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def _real(kind: str, **extra) -> dict:
    """Field-for-field the preprocessor_config.json of llava-hf/llava-1.5-7b-hf and llava-v1.6 checkpoints."""
    cfg = {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": kind, "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
    }
    cfg.update(extra)
    return cfg


def _tiny(kind: str, side: int, **extra) -> dict:
    return {"image_processor_type": kind, "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
            **extra}


HF_CONFIGS = {
    "clip-336": _real("CLIPImageProcessor"),
    "clip-tiny": _tiny("CLIPImageProcessor", 28),
    "clip-defaults": {"image_processor_type": "CLIPImageProcessor"},
    "clip-old-format": {"feature_extractor_type": "CLIPFeatureExtractor", "size": 30, "crop_size": 28, "resample": 3},
    "clip-crop-pads": _tiny("CLIPImageProcessor", 20, crop_size={"height": 28, "width": 25}),
    "clip-odd-settings": {
        "image_processor_type": "CLIPImageProcessorFast", "size": {"height": 30, "width": 26},
        "crop_size": {"height": 28, "width": 28}, "resample": 2, "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3], "rescale_factor": 0.0078125,
    },
    "llava-336-pad": _real("LlavaImageProcessor", do_pad=True),
    "llava-tiny-pad": _tiny("LlavaImageProcessor", 28, do_pad=True),
    "llava-tiny-nopad": _tiny("LlavaImageProcessor", 28, do_pad=False),
    "next-336": _real("LlavaNextImageProcessor", image_grid_pinpoints=DEFAULT_PINPOINTS, do_pad=True,
                      processor_class="LlavaNextProcessor", aspect_ratio_setting="anyres"),
    "next-tiny": _tiny("LlavaNextImageProcessor", 32, image_grid_pinpoints=TINY_PINPOINTS),
    "next-tiny-other-pinpoints": _tiny(
        "LlavaNextImageProcessor", 28, image_grid_pinpoints=[[28, 28], [56, 84], [84, 56], [112, 28], [28, 112]]
    ),
}

SHAPES = [(40, 40), (64, 30), (30, 64), (5, 7), (7, 5), (1, 1), (97, 13), (28, 28)]  # (width, height); 28: a tile


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 1000 * width + height)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        data[..., 3] = rng.choice(np.array([0, 90, 200, 255], dtype=np.uint8), (height, width))
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def _images_for(name: str) -> list[Image.Image]:
    images = [_image(w, h) for w, h in SHAPES] + [_image(50, 37, "RGBA")]
    if "336" in name:  # real settings: also images bigger than one tile and one below it on both sides
        images += [_image(700, 500), _image(300, 200), _image(480, 1000), _image(336, 336)]
    return images


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """Load each config the way users do: AutoImageProcessor on a directory, PIL backend."""
    processors = {}
    for name, cfg in HF_CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
        processors[name] = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    return processors


def _reference_tiles(processor, image: Image.Image) -> np.ndarray:
    """transformers output as [num_tiles, 3, S, S]."""
    pixel_values = np.asarray(processor(image, return_tensors="np")["pixel_values"])
    return pixel_values.reshape((-1,) + pixel_values.shape[-3:])


# ----------------------------------------------------------------------------- llava-hf
@pytest.mark.parametrize("on_device", [False, True], ids=["pil", "device"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_from_hf_matches_transformers(name, on_device, hf_reference):
    """Both resize paths: PIL on the host, and `resample.py`'s tables on the device (XLA here)."""
    ref = hf_reference[name]
    mine = dataclasses.replace(ImageProcessor.from_hf(HF_CONFIGS[name]), on_device=on_device)
    on_the_device = []
    for image in _images_for(name):
        out = mine(image)
        on_the_device.append(isinstance(out.tiles, jax.Array))
        expected = _reference_tiles(ref, image)
        assert out.pixel_values.dtype == np.float32
        assert out.image_size == (image.height, image.width)
        np.testing.assert_allclose(out.pixel_values, expected, rtol=0, atol=1e-6, err_msg=f"{name} {image.size}")
        if name.startswith("next"):
            pinpoints = ref.image_grid_pinpoints
            assert out.grid == tuple(get_anyres_image_grid_shape(list(out.image_size), pinpoints, mine.tile_size))
        else:
            assert out.grid is None and out.num_tiles == 1
    # every config here has a device form, used wherever an image is resized
    assert any(on_the_device) == on_device


@pytest.mark.parametrize("mode", ["L", "LA", "P-transparent", "RGBA"])
def test_other_modes_match_transformers(mode, hf_reference):
    if mode == "P-transparent":
        image = _image(33, 21).convert("P")
        image.info["transparency"] = 3
    else:
        image = _image(33, 21, mode)
    for name in ("llava-tiny-pad", "next-tiny"):
        out = ImageProcessor.from_hf(HF_CONFIGS[name])(image)
        np.testing.assert_allclose(out.pixel_values, _reference_tiles(hf_reference[name], image), rtol=0, atol=1e-6)


def test_alpha_follows_the_installed_transformers(monkeypatch):
    """transformers 5.17 and before drop alpha; later releases composite onto white. jaxvlm asks the installed
    release, so the transformers a user compares with is matched (the test above covers the installed one)."""
    import transformers.image_transforms as transforms

    image = _image(9, 7, "RGBA")
    processor = ImageProcessor.from_hf(HF_CONFIGS["clip-tiny"])
    for drops, expected in ((True, image.convert("RGB")),
                            (False, Image.alpha_composite(Image.new("RGBA", image.size, "white"), image))):
        monkeypatch.setattr(transforms, "convert_to_rgb", lambda im, drops=drops: im.convert("RGB") if drops
                            else Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA")))
        image_processing._transformers_composites_alpha.cache_clear()
        out = processor(image).pixel_values
        np.testing.assert_array_equal(out, processor(expected.convert("RGB")).pixel_values)
    image_processing._transformers_composites_alpha.cache_clear()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.sampled_from(["RGB", "RGBA"]), st.booleans())
def test_random_sizes_match_transformers(width, height, mode, on_device):
    image = _image(width, height, mode)
    for name, cls in [("llava-tiny-pad", LlavaImageProcessorPil), ("next-tiny", LlavaNextImageProcessorPil)]:
        cfg = {k: v for k, v in HF_CONFIGS[name].items() if k != "image_processor_type"}
        expected = _reference_tiles(cls(**cfg), image)
        mine = dataclasses.replace(ImageProcessor.from_hf(HF_CONFIGS[name]), on_device=on_device)
        np.testing.assert_allclose(mine(image).pixel_values, expected, atol=1e-6)


def test_field_defaults_follow_transformers():
    proc = ImageProcessor.from_hf({"image_processor_type": "LlavaNextImageProcessor"})
    assert proc.aspect == "anyres" and proc.tile_size == 224 and proc.shortest_edge == 224
    assert proc.grid_pinpoints == tuple(map(tuple, DEFAULT_PINPOINTS))
    assert ImageProcessor.from_hf({"image_processor_type": "LlavaImageProcessor"}).aspect == "crop"
    # Null fields take the class default too, as in transformers.
    assert ImageProcessor.from_hf({"image_processor_type": "CLIPImageProcessor", "size": None}).shortest_edge == 224


def test_pinpoints_from_model_config():
    pre = {k: v for k, v in HF_CONFIGS["next-tiny"].items() if k != "image_grid_pinpoints"}
    model_config = {"model_type": "llava_next", "image_grid_pinpoints": TINY_PINPOINTS}
    mine = ImageProcessor.from_hf(pre, model_config)
    assert mine.grid_pinpoints == tuple(map(tuple, TINY_PINPOINTS))
    ref = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=TINY_PINPOINTS
    )
    for image in (_image(64, 30), _image(7, 90)):
        np.testing.assert_allclose(mine(image).pixel_values, _reference_tiles(ref, image), atol=1e-6)
    # Without a recorded type, the model type decides.
    untyped = {k: v for k, v in pre.items() if k != "image_processor_type"}
    assert ImageProcessor.from_hf(untyped, model_config).aspect == "anyres"
    assert ImageProcessor.from_hf(untyped, {"model_type": "llava"}).aspect == "crop"


# ----------------------------------------------------------------------------- original LLaVA
def _clip336_reference(**kwargs):
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **kwargs)


def test_original_clip_defaults_are_openai_336():
    proc = ImageProcessor.from_original({"image_aspect_ratio": "pad"}, None)
    assert CLIP_VIT_L_336_PREPROCESSOR["size"] == 336
    assert (proc.shortest_edge, proc.crop_hw, proc.tile_size) == (336, (336, 336), 336)
    assert proc.pad_color == (122, 116, 104) and proc.convention == "original"


@pytest.mark.parametrize("on_device", [False, True], ids=["pil", "device"])
@pytest.mark.parametrize("clip_config", [None, _tiny("CLIPImageProcessor", 28)])
def test_original_pad_matches_llava_do_pad(clip_config, on_device):
    side = 336 if clip_config is None else 28
    ref = LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True)
    mine = dataclasses.replace(ImageProcessor.from_original({"image_aspect_ratio": "pad"}, clip_config),
                               on_device=on_device)
    for width, height in SHAPES + [(300, 200)]:
        image = _image(width, height)
        np.testing.assert_allclose(mine(image).pixel_values, _reference_tiles(ref, image), atol=1e-6)


def test_original_drops_alpha():
    image = _image(50, 37, "RGBA")
    ref = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True)
    original = ImageProcessor.from_original({"image_aspect_ratio": "pad"}, _tiny("CLIPImageProcessor", 28))(image)
    hf = ImageProcessor.from_hf(HF_CONFIGS["llava-tiny-pad"])(image)
    np.testing.assert_allclose(original.pixel_values, _reference_tiles(ref, image.convert("RGB")), atol=1e-6)
    # llava-hf processing differs from it exactly when the installed transformers composites onto white
    assert np.allclose(original.pixel_values, hf.pixel_values) != image_processing._transformers_composites_alpha()


@pytest.mark.parametrize("ratio", [None, "square", "pad_and_crop"])
def test_original_other_ratios_use_plain_clip(ratio):
    mine = ImageProcessor.from_original({"image_aspect_ratio": ratio} if ratio else {}, None)
    ref = _clip336_reference()
    for width, height in [(64, 30), (30, 64), (1, 1)]:
        image = _image(width, height)
        out = mine(image)
        assert out.grid is None
        np.testing.assert_allclose(out.pixel_values, _reference_tiles(ref, image), atol=1e-6)


@pytest.mark.parametrize("on_device", [False, True], ids=["pil", "device"])
@pytest.mark.parametrize("tiny", [True, False])
def test_original_anyres_matches_next_outside_ties(tiny, on_device):
    side, pinpoints = (32, TINY_PINPOINTS) if tiny else (336, DEFAULT_PINPOINTS)
    clip_config = _tiny("CLIPImageProcessor", side) if tiny else None
    mine = ImageProcessor.from_original(
        {"image_aspect_ratio": "anyres", "image_grid_pinpoints": str([tuple(p) for p in pinpoints])}, clip_config
    )
    mine = dataclasses.replace(mine, on_device=on_device)
    ref = LlavaNextImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
    )
    sizes = [(side * 2 + 5, side - 3), (side - 3, side * 2 + 5), (side * 3, side * 3), (side + 1, side + 1)]
    for width, height in sizes:
        image = _image(width, height)
        out = mine(image)
        np.testing.assert_allclose(out.pixel_values, _reference_tiles(ref, image), atol=1e-6)
        assert out.grid == tuple(get_anyres_image_grid_shape([height, width], pinpoints, side))


@pytest.mark.parametrize(
    "side, pinpoints, fitted_height, paste_y, resample",
    [
        # 300x200 at 336: canvas 336 wide x 672 high; the width fills, height = ceil(200 * (336 / 300)) = 225
        # (the float product is 224.00000000000003), pasted at (672 - 225) // 2 = 223.
        (336, DEFAULT_PINPOINTS, 225, 223, 3),
        # 30x20 at 32: canvas 32 x 64; height = ceil(20 * 32 / 30) = 22, pasted at (64 - 22) // 2 = 21.
        (32, TINY_PINPOINTS, 22, 21, 3),
        # The original resizes the canvas and base image with PIL's default (bicubic) whatever the CLIP
        # processor's own resample says.
        (32, TINY_PINPOINTS, 22, 21, 2),
    ],
)
def test_original_anyres_tie_case(side, pinpoints, fitted_height, paste_y, resample):
    width, height = (300, 200) if side == 336 else (30, 20)
    image = _image(width, height)
    original = ImageProcessor.from_original(
        {"image_aspect_ratio": "anyres", "image_grid_pinpoints": pinpoints},
        None if side == 336 else _tiny("CLIPImageProcessor", side, resample=resample),
    )(image)
    hf = ImageProcessor.from_hf(_tiny("LlavaNextImageProcessor", side, image_grid_pinpoints=pinpoints))(image)
    assert (original.grid, hf.grid) == ((2, 1), (1, 2))

    # Hand-built: two stacked tiles of a black canvas with the resized image pasted in the middle.
    canvas = Image.new("RGB", (side, 2 * side))
    canvas.paste(image.resize((side, fitted_height), Image.Resampling.BICUBIC), (0, paste_y))
    tiles = [image.resize((side, side), Image.Resampling.BICUBIC)]
    tiles += [canvas.crop((0, 0, side, side)), canvas.crop((0, side, side, 2 * side))]
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=resample
    )
    expected = np.concatenate([_reference_tiles(clip, tile) for tile in tiles])
    np.testing.assert_allclose(original.pixel_values, expected, atol=1e-6)


# ----------------------------------------------------------------------------- misc
def test_layout_uses_the_checkpoint_rounding():
    image = ProcessedImage(np.zeros((5, 336, 336, 3), np.uint8), (396, 704), (2, 2))
    hf = ImageProcessor.from_hf(HF_CONFIGS["next-336"])
    original = ImageProcessor.from_original({"image_aspect_ratio": "anyres", "image_grid_pinpoints": DEFAULT_PINPOINTS})
    assert len(hf.layout(image, 24, 576, newline=True)) == 1948
    assert len(original.layout(image, 24, 576, newline=True)) == 1850


def test_errors():
    with pytest.raises(ValueError, match="unsupported image_processor_type"):
        ImageProcessor.from_hf({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ImageProcessor.from_original({"image_aspect_ratio": "anyres"}, None)
    with pytest.raises(ValueError, match="anyres_max_9"):
        ImageProcessor.from_original({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": TINY_PINPOINTS})
    with pytest.raises(ValueError, match="size"):
        ImageProcessor.from_hf({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 5}})
    with pytest.raises(TypeError):
        ImageProcessor.from_hf(HF_CONFIGS["clip-tiny"])(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the tile size"):
        ImageProcessor.from_hf(_tiny("LlavaNextImageProcessor", 32, image_grid_pinpoints=[[30, 60]]))(_image(9, 9))
