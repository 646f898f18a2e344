"""Image preprocessing on the host (PIL) against the same resize on the device (`jaxvlm/resample.py`): the
time per image for LLaVA-1.5 and LLaVA-NeXT processing at a few sizes, and a bit-for-bit check of the two.

    python benchmarks/resize_probe.py
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np
from PIL import Image

from jaxvlm.image_processing import ImageProcessor

CLIP = {"do_resize": True, "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3}
CONFIGS = {
    "llava-1.5": {"image_processor_type": "CLIPImageProcessor", **CLIP},
    "llava-1.6": {"image_processor_type": "LlavaNextImageProcessor", **CLIP,
                  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]},
}


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; pillow {Image.__version__}", flush=True)
    for name, cfg in CONFIGS.items():
        host = ImageProcessor.from_hf(cfg)
        device = dataclasses.replace(host, on_device=True)
        for width, height in ((336, 336), (640, 480), (1024, 768), (4032, 3024)):
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
            same = np.array_equal(host(image).tiles, np.asarray(device(image).tiles))
            repeats = 5 if width > 2000 else 25
            pil = _median_ms(lambda: host(image), repeats)
            dev = _median_ms(lambda: jax.block_until_ready(device(image).tiles), repeats)
            print(f"{name} {width}x{height}: PIL {pil:.2f} ms, device {dev:.2f} ms (to the tiles on the device), "
                  f"bit-identical: {same}", flush=True)


if __name__ == "__main__":
    main()
