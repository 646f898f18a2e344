"""LLaVA-NeXT ("anyres") geometry as host-side integer math.

The model runs the vision tower on a flat batch of tiles and places the projected features with a single
gather. Everything LLaVA-NeXT does to those features (choosing the grid, rearranging the grid tiles into
one spatial map, cropping the padding back off, inserting a newline vector after every row) is therefore
expressed here as an index array into one per-image feature matrix.

Two conventions exist and both are reproduced:

* ``"hf"``: transformers (``select_best_resolution`` reads pinpoints as (height, width); ``unpad_image``
  computes the unpadded side with ``int(round(x, 7))``).
* ``"original"``: haotian-liu/LLaVA (pinpoints read as (width, height) and ``int(x)`` truncation). For the
  symmetric pinpoint lists of the released checkpoints the two only disagree on ties (an image with both
  sides <= one tile gets a 1x2 grid from transformers, 2x1 from the original) and on a few sizes where the
  float product falls just below an integer (704x396 at 336-pixel tiles: 1,948 vs 1,850 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "select_best_resolution",
    "grid_shape",
    "unpadded_grid_bounds",
    "feature_layout",
    "num_image_tokens",
]

_CONVENTIONS = ("hf", "original")


def _check_convention(name: str, value: str) -> None:
    if value not in _CONVENTIONS:
        raise ValueError(f"{name} must be 'hf' or 'original', got {value!r}")


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (height, width), got {tuple(image_size)}")
    return height, width


def select_best_resolution(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tie_break: str = "hf",
) -> tuple[int, int]:
    """Pick the canvas an image of ``image_size`` (height, width) is resized and padded onto.

    ``pinpoints`` is the ``image_grid_pinpoints`` list exactly as the checkpoint's config stores it. With
    ``tie_break="hf"`` each pair is read as (height, width) like transformers; with ``"original"`` as
    (width, height) like haotian-liu/LLaVA. Either way the result is returned as (height, width).

    The rule: keep the most image pixels after downscaling to fit (capped at the original pixel count),
    then waste the least canvas area; on an exact tie the earlier pinpoint wins.
    """
    _check_convention("tie_break", tie_break)
    height, width = _check_image_size(image_size)
    if not pinpoints:
        raise ValueError("pinpoints must not be empty")

    best: tuple[int, int] | None = None
    best_effective = 0
    best_wasted = float("inf")
    for pair in pinpoints:
        first, second = (int(v) for v in pair)
        cand_h, cand_w = (first, second) if tie_break == "hf" else (second, first)
        # The same float expressions as both references, so ties resolve identically.
        scale = min(cand_w / width, cand_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        wasted = cand_h * cand_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
    if best is None:
        # Only reachable with degenerate (zero-sized) pinpoints.
        raise ValueError(f"no usable pinpoint in {list(pinpoints)}")
    return best


def grid_shape(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    tie_break: str = "hf",
) -> tuple[int, int]:
    """(rows, cols) of the grid tiles that an image of ``image_size`` (height, width) is cut into."""
    best_h, best_w = select_best_resolution(image_size, pinpoints, tie_break)
    if tile_size <= 0 or best_h % tile_size or best_w % tile_size:
        # transformers would silently disagree with itself here (floor in the model, ceil in the
        # processor); refuse instead of producing a feature layout that does not match the pixels.
        raise ValueError(
            f"pinpoint {best_h}x{best_w} is not a multiple of the tile size {tile_size}; "
            "image_grid_pinpoints must be multiples of the vision tower's image size"
        )
    return best_h // tile_size, best_w // tile_size


def unpadded_grid_bounds(
    image_size: Sequence[int],
    grid_hw: Sequence[int],
    rounding: str = "hf",
) -> tuple[int, int, int, int]:
    """Rows/cols ``(top, bottom, left, right)`` of a ``grid_hw`` feature map that show the image.

    The image was resized to fit the canvas and centred, so padding sits on one axis only. The slice
    bounds are ``padding`` and ``size - padding`` exactly like both references (an odd leftover keeps
    one padded row/column at the far end).
    """
    _check_convention("rounding", rounding)
    height, width = _check_image_size(image_size)
    cur_h, cur_w = (int(v) for v in grid_hw)
    top, bottom, left, right = 0, cur_h, 0, cur_w
    if width / height > cur_w / cur_h:
        scaled = height * (cur_w / width)
        kept = int(round(scaled, 7)) if rounding == "hf" else int(scaled)
        pad = (cur_h - kept) // 2
        top, bottom = pad, cur_h - pad
    else:
        scaled = width * (cur_h / height)
        kept = int(round(scaled, 7)) if rounding == "hf" else int(scaled)
        pad = (cur_w - kept) // 2
        left, right = pad, cur_w - pad
    return top, bottom, left, right


def feature_layout(
    image_size: Sequence[int],
    grid: Sequence[int] | None,
    patches_per_side: int,
    tokens_per_tile: int,
    rounding: str = "hf",
    newline: bool = True,
) -> np.ndarray:
    """The image's token sequence as int32 row indices into its feature matrix ``F``.

    ``F`` has ``num_tiles * tokens_per_tile + 1`` rows: tile ``t`` (0 = base image, then the grid tiles in
    row-major order) owns rows ``[t * tokens_per_tile, (t + 1) * tokens_per_tile)`` and the last row is
    ``image_newline``. ``grid=None`` means a single tile (LLaVA-1.5, or the one-tile case of LLaVA-NeXT
    where ``newline`` appends one newline after the tile).
    """
    if tokens_per_tile <= 0:
        raise ValueError(f"tokens_per_tile must be positive, got {tokens_per_tile}")
    per_tile = int(tokens_per_tile)
    base = np.arange(per_tile, dtype=np.int64)
    if grid is None:
        if newline:
            base = np.append(base, per_tile)  # F has one tile, so its newline row is index per_tile
        return base.astype(np.int32)

    rows, cols = (int(v) for v in grid)
    side = int(patches_per_side)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be positive (rows, cols), got {tuple(grid)}")
    if side * side != per_tile:
        # The grid tiles are rearranged as side x side maps; a CLS token per tile cannot be placed.
        raise ValueError(
            f"tokens_per_tile ({per_tile}) must equal patches_per_side**2 ({side * side}) for a grid; "
            "use the 'default' vision_feature_select_strategy"
        )
    newline_row = (1 + rows * cols) * per_tile

    # Spatial map of the whole grid: position (y, x) lies in tile (y // side, x // side).
    ys = np.arange(rows * side)
    xs = np.arange(cols * side)
    tile = 1 + (ys // side)[:, None] * cols + (xs // side)[None, :]
    spatial = tile * per_tile + (ys % side)[:, None] * side + (xs % side)[None, :]

    top, bottom, left, right = unpadded_grid_bounds(image_size, spatial.shape, rounding)
    spatial = spatial[top:bottom, left:right]
    if newline:
        spatial = np.concatenate([spatial, np.full((spatial.shape[0], 1), newline_row)], axis=1)
    return np.concatenate([base, spatial.reshape(-1)]).astype(np.int32)


def num_image_tokens(
    image_size: Sequence[int],
    grid: Sequence[int] | None,
    patches_per_side: int,
    tokens_per_tile: int,
    rounding: str = "hf",
    newline: bool = True,
) -> int:
    """How many placeholder tokens the image takes: ``len(feature_layout(...))``."""
    return int(feature_layout(image_size, grid, patches_per_side, tokens_per_tile, rounding, newline).shape[0])
