"""jaxvlm's LLaVA against transformers, in float32, for every checkpoint format jaxvlm loads.

The reference is transformers' model on its own processor's inputs (input ids with expanded image tokens,
pixel values, image sizes). jaxvlm gets the same ids and pixels, places the image features with its own layout
math (`anyres.feature_layout`) and must give close logits at every position and the same 32 greedy tokens.
Original-format checkpoints are compared with their llava-hf twin (same weights, `reference_path`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import jax.numpy as jnp

from jaxvlm import anyres
from jaxvlm.config import GenerationConfig
from jaxvlm.engine import Engine
from jaxvlm.kv_cache import init_cache
from jaxvlm.modeling import NEWLINE
from jaxvlm.params import inspect_checkpoint, load_model
from jaxvlm.runner import ModelRunner
from jaxvlm.scheduler import EngineRequest, ImageInput

FIXTURES = [
    "llava15_hf", "llava15_hf_gqa", "llava15_hf_tied", "llava15_hf_hub", "llava_next_hf",
    "llava15_original", "llava16_original", "llava16_mistral_original",
]
NEW_TOKENS = 32


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _reference_inputs(tiny, images):
    processor = AutoProcessor.from_pretrained(tiny.reference_path)
    marks = "".join(f"{tiny.image_token}\n" for _ in images)
    text = f"USER: {marks}What is shown here? ASSISTANT:"
    return processor(text=text, images=images, return_tensors="pt")


def _jax_inputs(tiny, cfg, inputs):
    """(pixel tiles [N, C, S, S], per-image (start, layout)) from the reference processor's tensors."""
    pixels = inputs["pixel_values"].numpy()
    ids = inputs["input_ids"][0].numpy()
    starts = [int(i) for i in np.flatnonzero(ids == tiny.image_token_index)
              if i == 0 or ids[i - 1] != tiny.image_token_index]
    per_tile = cfg.tokens_per_tile
    images = []
    if cfg.anyres:
        sizes = inputs["image_sizes"].numpy()
        for k, (h, w) in enumerate(sizes):
            grid = anyres.grid_shape((int(h), int(w)), [list(p) for p in cfg.image_grid_pinpoints],
                                     cfg.vision.image_size, cfg.unpad_rounding)
            tiles = pixels[k, : 1 + grid[0] * grid[1]]
            layout = anyres.feature_layout((int(h), int(w)), grid, cfg.vision.patches_per_side, per_tile,
                                           cfg.unpad_rounding, True)
            images.append(ImageInput(tiles, layout, starts[k]))
    else:
        for k in range(pixels.shape[0]):
            images.append(ImageInput(pixels[k : k + 1], np.arange(per_tile), starts[k]))
    return ids, images


def _feature_index(ids, images, per_tile):
    index = np.full(len(ids), -1, np.int32)
    first = 0
    for im in images:
        n = im.pixel_values.shape[0]
        rows = np.where(im.layout == n * per_tile, NEWLINE, im.layout + first * per_tile)
        index[im.start : im.start + len(rows)] = rows
        first += n
    return index


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("num_images", [1, 2])
def test_logits_and_greedy_tokens_match_transformers(request, name, num_images):
    tiny = request.getfixturevalue(name)
    sizes = [(40, 30), (23, 70)][:num_images]  # landscape and portrait: different NeXT grids
    images = [_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    inputs = _reference_inputs(tiny, images)
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny.reference_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref_model(**inputs).logits[0].numpy()
        # No EOS on either side: 32 tokens whatever comes out, so every step is compared.
        ref_model.generation_config.eos_token_id = None
        ref_tokens = ref_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = ref_tokens[0, inputs["input_ids"].shape[1] :].tolist()

    info = inspect_checkpoint(tiny.path)
    model = load_model(info, jnp.float32)
    cfg = info.config
    assert cfg.checkpoint_format == tiny.fmt
    ids, image_inputs = _jax_inputs(tiny, cfg, inputs)

    # Prefill logits at every position.
    pixels = np.concatenate([im.pixel_values for im in image_inputs])
    features = model.encode_images(jnp.asarray(pixels))
    index = _feature_index(ids, image_inputs, cfg.tokens_per_tile)
    cache = init_cache(cfg.text, 1, len(ids), jnp.float32)
    hidden, _ = model.prefill_hidden(jnp.asarray(ids[None]), features, jnp.asarray(index[None]), cache,
                                     jnp.zeros(1, jnp.int32))
    logits = np.asarray(model.language_model.logits(hidden))[0]
    np.testing.assert_allclose(logits[:, : ref_logits.shape[1]], ref_logits[:, : logits.shape[1]], atol=1e-4, rtol=0)

    # Greedy generation through the engine.
    runner = ModelRunner(model, num_slots=2, max_len=len(ids) + NEW_TOKENS + 8, cache_dtype=jnp.float32)
    engine = Engine(runner, max_vision_tiles=16)
    req = EngineRequest(0, ids.astype(np.int32), image_inputs, GenerationConfig(max_new_tokens=NEW_TOKENS))
    events = [e for e in engine.generate([req]) if e.finished]
    assert events[0].seq.output_ids == ref_tokens


def test_feature_counts_follow_each_formats_reference(llava16_original, llava_next_hf):
    """The NeXT layouts differ only where the references round differently; our counts follow each."""
    for tiny in (llava16_original, llava_next_hf):
        cfg = inspect_checkpoint(tiny.path).config
        for w, h in [(40, 30), (23, 70), (64, 64), (100, 37), (31, 31)]:
            tie = "hf" if tiny.fmt == "llava-hf" else "original"
            pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
            grid = anyres.grid_shape((h, w), pinpoints, cfg.vision.image_size, tie)
            n = len(anyres.feature_layout((h, w), grid, cfg.vision.patches_per_side, cfg.tokens_per_tile,
                                          cfg.unpad_rounding, True))
            assert n == tiny.tokens_per_image(w, h), (tiny.fmt, w, h)


def test_prefill_logits_at_the_last_tokens_equal_the_full_prefill(llava15_hf_gqa):
    """`prefill` runs the final layer for each prompt's last token only; its logits equal those of the full
    prefill (`prefill_hidden`) at that position, for right-padded prompts of different lengths."""
    model = load_model(inspect_checkpoint(llava15_hf_gqa.path), jnp.float32)
    cfg = model.config
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 24)), jnp.int32)
    last = jnp.asarray([9, 23], jnp.int32)
    slots, no_image = jnp.asarray([1, 0], jnp.int32), jnp.full(tokens.shape, -1, jnp.int32)
    hidden, full_cache = model.prefill_hidden(tokens, None, no_image, init_cache(cfg.text, 2, 24, jnp.float32), slots)
    logits, cache = model.prefill(tokens, None, no_image, init_cache(cfg.text, 2, 24, jnp.float32), slots, last)
    expected = model.language_model.logits(hidden[jnp.arange(2), last])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
    for layer, full in zip(cache, full_cache):
        np.testing.assert_array_equal(np.asarray(layer.k), np.asarray(full.k))
        np.testing.assert_array_equal(np.asarray(layer.v), np.asarray(full.v))
