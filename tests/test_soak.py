"""Soak: 2,000 mixed requests (5% bad) streamed through one pipeline on a tiny model.

Not part of the default run (pyproject's addopts deselect the `soak` marker). Run it with

    python -m pytest -q -m soak tests/test_soak.py

Checks: every request is answered exactly once; exactly the bad ones fail, each naming its cause; identical
prompts give identical tokens whatever batch they land in; resident memory stays flat once warm.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvlm import EngineConfig, GenerationConfig, pipeline
from jaxvlm.vl import IMAGE_TOKEN

pytestmark = pytest.mark.soak

N = 2_000
VARIANTS = 40  # distinct prompts per kind: each recurs ~50 times, in ever different batches
WARM_UP = N // 5  # RSS is compared from here on (compilation and caches settle in the first batches)
RSS_EVERY = 50
RSS_LEAK_LIMIT_MB = 32  # a leak of 25 KB per request would show
RSS_SPIKE_LIMIT_MB = 128  # a late compile (a new batch shape at the tail) may add a little
GEN = GenerationConfig(max_new_tokens=4, ignore_eos=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_files(d: Path) -> dict[str, Path]:
    files = {f"pic{v}": d / f"pic{v}.png" for v in range(VARIANTS)}
    for v, path in enumerate(files.values()):
        noise(20 + v, 40 - v // 2, v).save(path)
    files["truncated"] = d / "truncated.png"
    files["truncated"].write_bytes(png_bytes(noise(40, 40, 99))[:300])
    return files


BAD_KINDS = ("missing file", "truncated file", "bad data url", "marker mismatch", "too long", "bytes")
GOOD_KINDS = ("text", "pil", "path", "data url", "two images")


def request(i: int, files: dict[str, Path]) -> tuple[str, int, object, str | None]:
    """(kind, variant, prompt, expected error text or None) of request i: every 20th (offset 7) is bad."""
    v = (i * 7919) % VARIANTS  # spread the variants so equal prompts are far apart
    if i % 20 == 7:
        kind = BAD_KINDS[(i // 20) % len(BAD_KINDS)]
        if kind == "missing file":
            return kind, v, ("what is this?", str(files["pic0"].with_name(f"gone{v}.png"))), "no such file"
        if kind == "truncated file":
            return kind, v, ("what is this?", str(files["truncated"])), "truncated"
        if kind == "bad data url":
            return kind, v, ("what is this?", "data:image/png;base64,***"), "malformed data URL"
        if kind == "marker mismatch":
            return kind, v, (f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", noise(9, 9, v)), "2 <IMAGE_TOKEN> markers"
        if kind == "too long":
            return kind, v, "much too long " * 150, "session_len"
        return kind, v, f"bytes {v}".encode(), "a prompt must be a str"
    kind = GOOD_KINDS[i % len(GOOD_KINDS)]
    text = f"describe item number {v} in detail"
    if kind == "text":
        return kind, v, text, None
    if kind == "pil":
        return kind, v, (text, noise(16 + v, 30, 1000 + v)), None
    if kind == "path":
        return kind, v, (text, str(files[f"pic{v}"])), None
    if kind == "data url":
        url = "data:image/png;base64," + base64.b64encode(files[f"pic{v}"].read_bytes()).decode()
        return kind, v, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}], None
    return kind, v, (f"compare {IMAGE_TOKEN} with {IMAGE_TOKEN}", [str(files[f"pic{v}"]), noise(12, 20, v)]), None


def test_soak_mixed_requests(llava15_hf, tmp_path):
    files = make_files(tmp_path)
    specs = {}

    def prompts():  # lazily: the pipeline never holds all 2,000 (nor their images) at once
        for i in range(N):
            kind, v, prompt, error = request(i, files)
            specs[i] = (kind, v, error)
            yield prompt

    finished: Counter = Counter()
    tokens: dict[int, list[int]] = defaultdict(list)
    outcome: dict[int, tuple[str, str | None]] = {}
    rss: list[tuple[int, float]] = []
    start = time.monotonic()
    with pipeline(str(llava15_hf.path), backend_config=EngineConfig(max_batch_size=8, session_len=256)) as pipe:
        for delta in pipe.stream_infer(prompts(), gen_config=GEN):
            tokens[delta.index] += delta.token_ids
            if delta.finish_reason is None:
                continue
            finished[delta.index] += 1
            outcome[delta.index] = (delta.finish_reason, delta.error_message)
            done = sum(finished.values())
            if done % RSS_EVERY == 0:
                rss.append((done, rss_mb()))
    elapsed = time.monotonic() - start
    print(f"{N} requests in {elapsed:.0f} s; RSS (MB) by requests done: "
          + ", ".join(f"{n}:{mb:.0f}" for n, mb in rss))

    # Every request answered exactly once.
    assert sorted(finished) == list(range(N)) and set(finished.values()) == {1}
    # Exactly the bad ones failed, each naming its cause; the good ones ran to max_new_tokens.
    bad = [i for i in range(N) if specs[i][2] is not None]
    assert len(bad) == N // 20
    for i in range(N):
        reason, message = outcome[i]
        error = specs[i][2]
        if error is None:
            assert reason == "length" and len(tokens[i]) == GEN.max_new_tokens, (i, specs[i], outcome[i])
        else:
            assert reason == "error" and error in message, (i, specs[i], outcome[i])
    # The same prompt gives the same tokens wherever it landed in the stream (batch-independence under load).
    by_prompt: dict[tuple, set] = defaultdict(set)
    for i in range(N):
        kind, v, error = specs[i]
        if error is None:
            by_prompt[kind, v].add(tuple(tokens[i]))
    assert all(len(outputs) == 1 for outputs in by_prompt.values()), \
        {k: o for k, o in by_prompt.items() if len(o) > 1}
    # Memory is flat once warm: the median of the last samples is close to that of the first warm ones.
    warm = [mb for n, mb in rss if n >= WARM_UP]
    early, late = float(np.median(warm[:5])), float(np.median(warm[-5:]))
    assert late - early < RSS_LEAK_LIMIT_MB, rss
    assert max(warm) - early < RSS_SPIKE_LIMIT_MB, rss
