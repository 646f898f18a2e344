"""jaxvlm.anyres against transformers' LLaVA-NeXT code (the reference) and the original repo's documented numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextModel,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from jaxvlm.anyres import feature_layout, grid_shape, num_image_tokens, select_best_resolution, unpadded_grid_bounds

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# (tile size, patch size, pinpoint sets) for the real LLaVA-NeXT tower and a tiny one.
TOWERS = {
    "real": (336, 14, [DEFAULT_PINPOINTS, [[336, 336], [336, 672], [672, 336], [672, 672], [1008, 1008]]]),
    "tiny": (32, 4, [TINY_PINPOINTS, [[32, 32], [64, 96], [96, 64], [128, 32], [32, 128], [96, 96]]]),
}
SIZES = [  # (height, width): square, wide, tall, tiny, odd
    (1, 1), (5, 7), (7, 5), (20, 20), (30, 64), (64, 30), (100, 333), (333, 100), (336, 336), (396, 704),
    (480, 640), (640, 480), (1080, 1920), (1920, 1080), (500, 501), (37, 1000), (1000, 37), (999, 998),
    (47, 1128), (352, 110), (410, 1968),  # more sizes where rounding and truncation disagree at 336
]


def _tiny_next_model(tile: int, patch: int) -> LlavaNextModel:
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=tile, patch_size=patch, projection_dim=8,
    )
    text = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64,
    )
    config = LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63,
        image_grid_pinpoints=DEFAULT_PINPOINTS, vision_feature_select_strategy="default",
    )
    return LlavaNextModel(config).eval()


@pytest.fixture(scope="module")
def models_by_tower() -> dict[str, LlavaNextModel]:
    return {name: _tiny_next_model(tile, patch) for name, (tile, patch, _) in TOWERS.items()}


def _packed_indices(model: LlavaNextModel, image_size, num_tiles: int, per_tile: int) -> np.ndarray:
    """Run pack_image_features on features whose value is their row index in F."""
    rows = num_tiles * per_tile
    features = torch.arange(rows, dtype=torch.float64).reshape(num_tiles, per_tile, 1)
    newline = torch.tensor([float(rows)], dtype=torch.float64)
    sizes = torch.tensor([list(image_size)])
    packed, lens = model.pack_image_features([features], sizes, "default", image_newline=newline)
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0][:, 0].numpy().astype(np.int64)


def _truncating_unpad(tensor, original_size):
    """The original repo's unpad: the kept side is truncated with int() instead of rounded."""
    height, width = (int(v) for v in original_size)
    cur_h, cur_w = tensor.shape[1:]
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(height * (cur_w / width))) // 2
        return tensor[:, pad : cur_h - pad, :]
    pad = (cur_w - int(width * (cur_h / height))) // 2
    return tensor[:, :, pad : cur_w - pad]


# ----------------------------------------------------------------------------- resolution and grid
pinpoint_sets = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda p: [28 * p[0], 28 * p[1]]), min_size=1, max_size=8
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), pinpoint_sets)
def test_select_best_resolution_hf_matches_transformers(height, width, pinpoints):
    assert select_best_resolution((height, width), pinpoints, "hf") == tuple(
        hf_select_best_resolution((height, width), pinpoints)
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), pinpoint_sets)
def test_select_best_resolution_original_reads_width_height(height, width, pinpoints):
    # The original reads every pair as (width, height): the same as transformers given the swapped pairs,
    # in the same order, so ties go to the same entry.
    swapped = [[w, h] for h, w in pinpoints]
    assert select_best_resolution((height, width), pinpoints, "original") == tuple(
        hf_select_best_resolution((height, width), swapped)
    )


@pytest.mark.parametrize("image_size", [(1, 1), (200, 300), (300, 200), (336, 336), (5, 7)])
def test_tie_break_small_images(image_size):
    # Both sides <= 336: every canvas keeps the whole image, 336x672 and 672x336 waste the same area, and
    # the first listed wins. transformers reads [336, 672] as h x w (one row, two columns); the original
    # reads it as w x h (two rows, one column).
    assert select_best_resolution(image_size, DEFAULT_PINPOINTS, "hf") == (336, 672)
    assert select_best_resolution(image_size, DEFAULT_PINPOINTS, "original") == (672, 336)
    assert grid_shape(image_size, DEFAULT_PINPOINTS, 336, "hf") == (1, 2)
    assert grid_shape(image_size, DEFAULT_PINPOINTS, 336, "original") == (2, 1)


@pytest.mark.parametrize("image_size", [(480, 640), (1080, 1920), (396, 704), (337, 1000), (2000, 300)])
def test_no_tie_conventions_agree(image_size):
    assert select_best_resolution(image_size, DEFAULT_PINPOINTS, "hf") == select_best_resolution(
        image_size, DEFAULT_PINPOINTS, "original"
    )


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_grid_shape_matches_transformers(tower):
    tile, _, sets = TOWERS[tower]
    for pinpoints in sets:
        for size in SIZES:
            expected = modeling_llava_next.get_anyres_image_grid_shape(list(size), pinpoints, tile)
            assert grid_shape(size, pinpoints, tile) == tuple(expected)
            rows, cols = expected
            assert modeling_llava_next.image_size_to_num_patches(list(size), pinpoints, tile) == 1 + rows * cols


def test_grid_shape_rejects_pinpoints_off_the_tile_size():
    with pytest.raises(ValueError, match="multiple of the tile size"):
        grid_shape((100, 100), [[300, 600]], 336)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        select_best_resolution((0, 10), DEFAULT_PINPOINTS)
    with pytest.raises(ValueError):
        select_best_resolution((10, 10), DEFAULT_PINPOINTS, tie_break="nearest")
    with pytest.raises(ValueError):
        select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="patches_per_side"):
        feature_layout((10, 10), (1, 2), 24, 577)  # a CLS token per tile cannot be laid out spatially


# ----------------------------------------------------------------------------- feature layout
def test_single_tile_layouts():
    assert feature_layout((10, 20), None, 24, 576, newline=False).tolist() == list(range(576))
    # One tile plus newline: pack_image_features' branch for a lone tile; F's newline row is 576.
    assert feature_layout((10, 20), None, 24, 576, newline=True).tolist() == list(range(576)) + [576]
    assert feature_layout((10, 20), None, 24, 576).dtype == np.int32


def test_single_tile_matches_pack_image_features(models_by_tower):
    model = models_by_tower["tiny"]
    per_tile = 64
    assert _packed_indices(model, (10, 20), 1, per_tile).tolist() == feature_layout((10, 20), None, 8, per_tile).tolist()


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_layout_matches_pack_image_features(models_by_tower, tower):
    tile, patch, sets = TOWERS[tower]
    model = models_by_tower[tower]
    side = tile // patch
    for pinpoints in sets:
        model.config.image_grid_pinpoints = pinpoints
        for size in SIZES:
            rows, cols = grid_shape(size, pinpoints, tile)
            expected = _packed_indices(model, size, 1 + rows * cols, side * side)
            layout = feature_layout(size, (rows, cols), side, side * side, rounding="hf", newline=True)
            np.testing.assert_array_equal(layout, expected, err_msg=f"{tower} {pinpoints} {size}")
            assert num_image_tokens(size, (rows, cols), side, side * side) == len(expected)


def test_layout_without_newline_matches_pack_image_features(models_by_tower):
    model = models_by_tower["tiny"]
    model.config.image_grid_pinpoints = TINY_PINPOINTS
    for size in SIZES:
        rows, cols = grid_shape(size, TINY_PINPOINTS, 32)
        features = torch.arange((1 + rows * cols) * 64, dtype=torch.float64).reshape(1 + rows * cols, 64, 1)
        packed, _ = model.pack_image_features([features], torch.tensor([list(size)]), "default", image_newline=None)
        layout = feature_layout(size, (rows, cols), 8, 64, newline=False)
        np.testing.assert_array_equal(layout, packed[0][:, 0].numpy().astype(np.int64))


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_original_layout_matches_pack_with_original_rules(models_by_tower, tower, monkeypatch):
    # transformers' packing with the original's two rules swapped in: pairs read as (width, height) and a
    # truncating unpad. Everything else (tile order, spatial rearrangement, newlines) is shared.
    tile, patch, sets = TOWERS[tower]
    model = models_by_tower[tower]
    side = tile // patch
    monkeypatch.setattr(modeling_llava_next, "unpad_image", _truncating_unpad)
    for pinpoints in sets:
        model.config.image_grid_pinpoints = [[w, h] for h, w in pinpoints]
        for size in SIZES:
            grid = grid_shape(size, pinpoints, tile, tie_break="original")
            expected = _packed_indices(model, size, 1 + grid[0] * grid[1], side * side)
            layout = feature_layout(size, grid, side, side * side, rounding="original")
            np.testing.assert_array_equal(layout, expected, err_msg=f"{tower} {pinpoints} {size}")


def test_documented_token_counts():
    def count(height, width, rounding):
        grid = grid_shape((height, width), DEFAULT_PINPOINTS, 336, rounding)
        return num_image_tokens((height, width), grid, 24, 576, rounding=rounding)

    assert count(480, 640, "hf") == count(480, 640, "original") == 2340
    assert count(1080, 1920, "hf") == 1948
    # 704x396: 396 * (48 / 704) is 26.999..., rounded to 27 rows by transformers, truncated to 26 originally.
    assert count(396, 704, "hf") == 1948
    assert count(396, 704, "original") == 1850
    assert unpadded_grid_bounds((396, 704), (48, 48), "hf") == (10, 38, 0, 48)
    assert unpadded_grid_bounds((396, 704), (48, 48), "original") == (11, 37, 0, 48)


def test_tie_case_layouts_differ_in_shape_not_count():
    # 200x300 (h x w): transformers lays a 1x2 grid (24 x 48 features), the original a 2x1 grid (48 x 24).
    hf = feature_layout((200, 300), (1, 2), 24, 576, "hf")
    orig = feature_layout((200, 300), (2, 1), 24, 576, "original")
    # hf: the image (aspect 1.5) is narrower than the 24x48 map (aspect 2): 48 columns cropped to 36.
    assert len(hf) == 576 + 24 * (36 + 1)
    # original: the image is wider than the 48x24 map (aspect 0.5): 48 rows cropped to 24 * 200 / 300 = 16.
    assert len(orig) == 576 + 16 * (24 + 1)


# ----------------------------------------------------------------------------- against LlavaNextProcessor
def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


@pytest.fixture(scope="module")
def next_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=DEFAULT_PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=_tiny_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def test_num_image_tokens_matches_processor_counts(next_processor):
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(200)]
    expected = next_processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for size, want in zip(sizes, expected):
        grid = grid_shape(size, DEFAULT_PINPOINTS, 336)
        assert num_image_tokens(size, grid, 24, 576) == want, size


def test_num_image_tokens_matches_processor_prompt(next_processor):
    from PIL import Image

    for height, width in [(480, 640), (50, 300), (700, 90)]:
        image = Image.new("RGB", (width, height), (10, 200, 30))
        ids = np.asarray(next_processor(images=image, text="hi <image>")["input_ids"])
        grid = grid_shape((height, width), DEFAULT_PINPOINTS, 336)
        assert int((ids == 1).sum()) == num_image_tokens((height, width), grid, 24, 576)
