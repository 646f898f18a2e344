"""PIL's uint8 resize on the device, bit for bit, so that an image is resized where the vision tower runs.

PIL (libImaging/Resample.c) resizes in two separable passes. For each output position along an axis it reads
a run of consecutive source pixels with integer weights of 22 fractional bits (the filter's taps, normalized
to sum to one), sums in int32 and rounds to uint8 after each pass. Here each axis is a table of those source
indices and weights for every position of a *canvas*: the resized image placed at an offset, negative to crop
it and positive to pad it with zeros, so that LLaVA's crop, pad-and-tile steps are the same two gathers. The
tables are made on the host in float64 with PIL's order of operations; the sums are int32 as in PIL.

Only the filters whose taps are plain arithmetic are here (box, bilinear, bicubic): Lanczos and Hamming call
sin and cos, whose last bit may differ between the C library and numpy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

__all__ = ["FILTERS", "axis_table", "render", "render_tiles", "vertical_pass_first"]

PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 bits less 8 for the value and 2 for overshoot
_TAP_MULTIPLE = 4  # tap counts round up to this, so that nearby scales share a compiled program


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # as PIL: Keys' cubic convolution with a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# resample id -> (filter, support in source pixels at scale 1)
FILTERS = {
    int(Image.Resampling.BOX): (_box, 0.5),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
}


def axis_table(in_size: int, out_size: int, resample: int, canvas: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass along an axis: source indices and int32 weights [canvas, taps]. Canvas position p shows position
    p - offset of `in_size` pixels resized to `out_size`; outside that span its weights are zero, so it renders
    as 0. An unchanged size is a pass PIL skips: one tap of weight one."""
    out = np.arange(canvas) - offset
    inside = (out >= 0) & (out < out_size)
    src = np.clip(out, 0, out_size - 1)
    if in_size == out_size:
        index, weight = src[:, None], np.where(inside, 1 << PRECISION_BITS, 0)[:, None]
        return index.astype(np.int32), weight.astype(np.int32)

    fn, support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    tap = np.arange(taps)
    w = fn((tap[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(tap[None, :] < count[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # PIL's left-to-right sum: numpy's pairwise sum rounds differently
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << PRECISION_BITS)).astype(np.int64)

    padded = -(-taps // _TAP_MULTIPLE) * _TAP_MULTIPLE
    index = np.minimum(first[src][:, None] + np.arange(padded)[None, :], in_size - 1)
    weight = np.zeros((canvas, padded), np.int64)
    weight[:, :taps] = np.where(inside[:, None], fixed[src], 0)
    return index.astype(np.int32), weight.astype(np.int32)


def _pass(x: jax.Array, index: jax.Array, weight: jax.Array, axis: int) -> jax.Array:
    """One pass of uint8 [H, W, C] along `axis` (0 resamples the height, 1 the width), rounded as PIL rounds."""
    taps = jnp.take(x, index, axis=axis).astype(jnp.int32)  # axis 0: [P, K, W, C]; axis 1: [H, P, K, C]
    w = weight[:, :, None, None] if axis == 0 else weight[None, :, :, None]
    total = jnp.sum(taps * w, axis=axis + 1) + (1 << (PRECISION_BITS - 1))
    return jnp.clip(total >> PRECISION_BITS, 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("orders", "tile"))
def render_tiles(src: jax.Array, tables: tuple, orders: tuple[bool, ...], tile: tuple[int, int]) -> jax.Array:
    """uint8 [H, W, 3] source -> uint8 [N, *tile, 3]: each canvas rendered from its (height, width) tables with
    its pass order (True: the height first, as pillow 13 does for tall reductions), then cut into tiles in
    row-major order, the canvases' tiles one after another."""
    out = []
    th, tw = tile
    for (rows, cols), height_first in zip(tables, orders):
        canvas = _pass(_pass(src, *rows, 0), *cols, 1) if height_first else _pass(_pass(src, *cols, 1), *rows, 0)
        h, w, c = canvas.shape
        grid = canvas.reshape(h // th, th, w // tw, tw, c).transpose(0, 2, 1, 3, 4)
        out.append(grid.reshape(-1, th, tw, c))
    return out[0] if len(out) == 1 else jnp.concatenate(out)


def vertical_pass_first(shrink_h: int, shrink_w: int) -> bool:
    """Whether PIL resamples columns before rows: pillow 13 does when the height loses more than twice as many
    pixels as the width, to make the second pass cheaper; earlier versions always start with the rows."""
    return _pillow_can_start_with_columns() and shrink_h > 0 and shrink_h > 2 * shrink_w


@functools.cache
def _pillow_can_start_with_columns() -> bool:
    """Asks the installed pillow, on a probe whose two pass orders round differently (tested)."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    bicubic = Image.Resampling.BICUBIC
    whole = probe.resize((60, 16), resample=bicubic)
    columns_first = probe.resize((64, 16), resample=bicubic).resize((60, 16), resample=bicubic)
    return np.array_equal(np.asarray(whole), np.asarray(columns_first))


def render(source: np.ndarray, resample: int, canvases: list[tuple], tile: tuple[int, int]) -> jax.Array:
    """uint8 [H, W, 3] -> uint8 tiles [N, *tile, 3] on the device. `canvases`: for each, (the resize's output
    size, the canvas size, the offset of the resize in it), each as (height, width). The source is padded on
    each side to a quarter-octave bucket (`_bucket`; the tables never read the padding), so that images of
    nearby sizes share a compiled program."""
    height, width = source.shape[:2]
    padded = np.zeros((_bucket(height), _bucket(width), 3), np.uint8)
    padded[:height, :width] = source
    tables, orders = [], []
    for (out_h, out_w), (canvas_h, canvas_w), (top, left) in canvases:
        tables.append((_device_table(height, out_h, resample, canvas_h, top),
                       _device_table(width, out_w, resample, canvas_w, left)))
        orders.append(vertical_pass_first(height - out_h, width - out_w))
    return render_tiles(padded, tuple(tables), tuple(orders), tile)


def _bucket(n: int) -> int:
    """n rounded up to 5, 6, 7 or 8 times a power of two (at least 64): four sizes per octave, under 25% padding,
    about 30 sizes per side up to 8K pixels."""
    step = 1 << max(3, (n - 1).bit_length() - 3)
    return max(64, -(-n // step) * step)


@functools.lru_cache(maxsize=256)
def _device_table(*key: int) -> tuple[jax.Array, jax.Array]:
    """`axis_table` kept on the device (the one cache of it): images of one size then send only their pixels."""
    return tuple(jnp.asarray(a) for a in axis_table(*key))  # type: ignore[return-value]
