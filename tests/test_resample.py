"""jaxvlm.resample (PIL's resize as device tables) against PIL itself, bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxvlm.resample import FILTERS, _pillow_can_start_with_columns, axis_table, render_tiles, vertical_pass_first

sizes = st.integers(1, 160)
filters = st.sampled_from(sorted(FILTERS))


def _source(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _render(src: np.ndarray, out_hw, canvas_hw, offset, resample: int, height_first: bool) -> np.ndarray:
    h, w = src.shape[:2]
    tables = ((axis_table(h, out_hw[0], resample, canvas_hw[0], offset[0]),
               axis_table(w, out_hw[1], resample, canvas_hw[1], offset[1])),)
    return np.asarray(render_tiles(src, tables, (height_first,), tuple(canvas_hw)))[0]  # one tile: the canvas


@settings(max_examples=60, deadline=None)
@given(sizes, sizes, sizes, filters, st.integers(0, 9))
def test_a_canvas_of_the_output_size_is_pils_resize(height, width, side, resample, seed):
    """Any source (downscales up to 160x, upscales up to 160x) to a square output, in the order this pillow
    uses, equals PIL's own resize."""
    src = _source(height, width, seed)
    expected = np.asarray(Image.fromarray(src).resize((side, side), resample=resample))
    order = vertical_pass_first(height - side, width - side)
    np.testing.assert_array_equal(_render(src, (side, side), (side, side), (0, 0), resample, order), expected)


@settings(max_examples=40, deadline=None)
@given(sizes, sizes, st.integers(1, 90), st.integers(1, 90), st.integers(1, 90), st.integers(-40, 40),
       st.integers(-40, 40), filters, st.booleans())
def test_canvas_offsets_crop_and_pad_with_zeros(height, width, out_h, out_w, side, top, left, resample,
                                                height_first):
    """A canvas shows the resize shifted by its offset, zeros where the resize is not; either pass order is
    PIL's two one-axis resizes in that order."""
    src = Image.fromarray(_source(height, width))
    if height_first:
        resized = src.resize((width, out_h), resample=resample).resize((out_w, out_h), resample=resample)
    else:
        resized = src.resize((out_w, height), resample=resample).resize((out_w, out_h), resample=resample)
    expected = np.zeros((side, side, 3), np.uint8)
    full = np.asarray(resized)
    ys, xs = np.arange(side) - top, np.arange(side) - left
    keep_y, keep_x = (ys >= 0) & (ys < out_h), (xs >= 0) & (xs < out_w)
    expected[np.ix_(keep_y, keep_x)] = full[np.ix_(ys[keep_y], xs[keep_x])]
    got = _render(np.asarray(src), (out_h, out_w), (side, side), (top, left), resample, height_first)
    np.testing.assert_array_equal(got, expected)


def test_canvases_cut_into_row_major_tiles():
    src = _source(50, 70)
    bicubic = int(Image.Resampling.BICUBIC)
    tables = ((axis_table(50, 16, bicubic, 16, 0), axis_table(70, 16, bicubic, 16, 0)),
              (axis_table(50, 32, bicubic, 32, 0), axis_table(70, 48, bicubic, 48, 0)))
    tiles = np.asarray(render_tiles(src, tables, (False, False), (16, 16)))
    big = np.asarray(Image.fromarray(src).resize((48, 32), resample=bicubic))
    assert tiles.shape == (1 + 2 * 3, 16, 16, 3)
    np.testing.assert_array_equal(tiles[0], np.asarray(Image.fromarray(src).resize((16, 16), resample=bicubic)))
    np.testing.assert_array_equal(tiles[1 + 3 + 2], big[16:32, 32:48])  # grid row 1, column 2


def test_the_pass_order_probe_tells_the_orders_apart():
    """The probe that asks pillow for its pass order only works if its two orders round differently."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    bicubic = Image.Resampling.BICUBIC
    rows_first = probe.resize((60, 64), resample=bicubic).resize((60, 16), resample=bicubic)
    columns_first = probe.resize((64, 16), resample=bicubic).resize((60, 16), resample=bicubic)
    assert not np.array_equal(np.asarray(rows_first), np.asarray(columns_first))
    whole = np.asarray(probe.resize((60, 16), resample=bicubic))
    expected = columns_first if _pillow_can_start_with_columns() else rows_first
    np.testing.assert_array_equal(whole, np.asarray(expected))
