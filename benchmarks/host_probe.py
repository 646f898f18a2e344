"""Host-side cost of time to first token: the whole pipeline on a tiny language model with the real image
geometry (336-px tiles, a 640x480 image through LLaVA-NeXT's anyres), so that the device work is negligible
and what remains is preprocessing, prompt building, the engine and detokenization. Needs torch (it writes the
tiny checkpoint with transformers). Prints the median latency and a cProfile listing.

    python benchmarks/host_probe.py [--dir /tmp/host_probe]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402  (the tests' checkpoint writer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/host_probe")
    args = ap.parse_args()
    import jaxvlm
    from jaxvlm import EngineConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=1, ignore_eos=True, do_sample=False)
    text = "describe this image in detail " * 6
    for version, session_len, (width, height) in (("1.5", 1024, (336, 336)), ("1.6", 2560, (640, 480))):
        # The benchmark's geometry: a 336-px image for LLaVA-1.5, 640x480 for LLaVA-1.6.
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))
        path = Path(args.dir) / version
        if not path.exists():
            model = tiny_models.build_llava_hf_model("mha", version == "1.6", image_size=336, patch_size=14)
            model.config.text_config.max_position_embeddings = 4096
            tiny_models.make_llava_hf(path, next=version == "1.6", model=model)
        pipe = jaxvlm.pipeline(str(path), backend_config=EngineConfig(session_len=session_len, max_batch_size=1))
        ask = lambda: pipe((text, image), gen_config=gen)
        for _ in range(3):
            r = ask()
        times = []
        for _ in range(9):
            t = time.perf_counter()
            ask()
            times.append(time.perf_counter() - t)
        print(f"llava-{version}: {r.input_token_len} prompt tokens, time to first token "
              f"{statistics.median(times) * 1e3:.1f} ms (median of 9)", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(5):
            ask()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
