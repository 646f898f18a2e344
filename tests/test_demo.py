"""The embedded demo model (jaxvlm.demo), and the `jaxvlm demo` and `jaxvlm chat` commands run on it.

The demo checkpoint is written with numpy only; transformers (the reference) must read it as a llava-hf
LLaVA-1.5 checkpoint, tokenizer and chat template included, and generate the same tokens as jaxvlm.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from jaxvlm import cli, demo
from jaxvlm.config import GenerationConfig

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(cache_root: Path) -> dict:
    return dict(os.environ, JAXVLM_CACHE_DIR=str(cache_root), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                PYTHONIOENCODING="utf-8", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """A JAXVLM_CACHE_DIR for this module: the demo model and the compilation cache live there."""
    return tmp_path_factory.mktemp("jaxvlm-cache")


@pytest.fixture(scope="module")
def demo_dir(cache_root) -> Path:
    return demo.make_demo_model(cache_root / "demo-model")


@pytest.fixture(scope="module")
def demo_pipe(demo_dir, cache_root):
    from jaxvlm import pipeline
    from jaxvlm.config import EngineConfig

    # The engine settings `jaxvlm demo` uses, and its compilation cache, so the command below reuses the programs.
    with pipeline(str(demo_dir), EngineConfig(compilation_cache_dir=str(cache_root / "xla"))) as pipe:
        yield pipe


# ------------------------------------------------------------------------------------------------ the files


def test_build_is_deterministic_and_reused(tmp_path, demo_dir):
    other = demo.make_demo_model(tmp_path / "copy")
    assert digests(other) == digests(demo_dir)  # byte-identical, built independently
    expected = {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                "jaxvlm_demo.json"}
    assert set(digests(other)) == expected
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    assert demo.make_demo_model(other) == other
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp  # a complete copy is reused, not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name != "copy"]  # no staging directories left behind


def test_incomplete_or_outdated_copy_is_rebuilt(tmp_path, demo_dir):
    broken = tmp_path / "demo-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # an interrupted build of some older version: no marker
    demo.make_demo_model(broken)
    assert digests(broken) == digests(demo_dir)
    (broken / "jaxvlm_demo.json").write_text(json.dumps({"format_version": demo.DEMO_FORMAT_VERSION - 1}))
    (broken / "model.safetensors").write_bytes(b"old")
    demo.make_demo_model(broken)
    assert digests(broken) == digests(demo_dir)


def test_default_location_follows_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXVLM_CACHE_DIR", str(tmp_path / "jv"))
    assert demo.demo_model_dir() == tmp_path / "jv" / "demo-model"
    monkeypatch.delenv("JAXVLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.demo_model_dir() == tmp_path / "xdg" / "jaxvlm" / "demo-model"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.demo_model_dir() == tmp_path / "home" / ".cache" / "jaxvlm" / "demo-model"


def test_transformers_reads_it_as_llava_hf(demo_dir):
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == config.image_token_index < config.text_config.vocab_size
    assert 300 <= len(tok) <= config.text_config.vocab_size
    ids = tok("A red bus near the river.").input_ids
    assert ids[0] == 1 and 0 not in ids  # BOS first; every word is in the vocabulary
    assert tok.decode(ids, skip_special_tokens=True) == "a red bus near the river."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "USER: <image>\ndescribe this image ASSISTANT:"

    model, info = LlavaForConditionalGeneration.from_pretrained(demo_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vision_config.image_size == 28 and model.config.vision_config.patch_size == 14
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pixels = AutoImageProcessor.from_pretrained(demo_dir)(Image.new("RGB", (50, 40), "red"),
                                                         return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (1, 3, 28, 28)


def test_jaxvlm_generates_what_transformers_generates(demo_dir, demo_pipe):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(demo_dir)
    model = LlavaForConditionalGeneration.from_pretrained(demo_dir).eval()
    image = Image.new("RGB", (40, 30), (200, 30, 90))  # one colour: every resize backend gives the same pixels
    gen = GenerationConfig(max_new_tokens=12)
    cases = [("USER: describe the sky ASSISTANT:", "describe the sky", None),
             ("USER: <image>\ndescribe this image ASSISTANT:", ("describe this image", image), image)]
    for rendered, prompt, img in cases:
        ours = demo_pipe(prompt, gen_config=gen)
        inputs = processor(text=rendered, images=img, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        theirs = out[0, inputs.input_ids.shape[1]:].tolist()
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs  # jaxvlm leaves the EOS out
        assert ours.input_token_len == inputs.input_ids.shape[1]
        assert ours.token_ids == theirs, rendered


# ------------------------------------------------------------------------------------------------ the command


def test_demo_command(cache_root, demo_dir, demo_pipe):
    # What the command should print: the same request through the API (also fills the compilation cache).
    expected = demo_pipe((cli.DEMO_PROMPT, cli._gradient_image()), gen_config=GenerationConfig(max_new_tokens=24))
    stamp = (demo_dir / "jaxvlm_demo.json").stat().st_mtime_ns
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "demo"], capture_output=True, text=True,
                          encoding="utf-8", timeout=300, cwd=REPO, env=subprocess_env(cache_root))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RANDOM weights" in out and "meaningless" in out
    assert "jaxvlm chat llava-hf/llava-1.5-7b-hf" in out  # how to run a real model
    assert f"answer: {expected.text}\n" in out
    assert (demo_dir / "jaxvlm_demo.json").stat().st_mtime_ns == stamp  # the cached model was reused
    print(f"jaxvlm demo took {elapsed:.1f} s")


def test_chat_through_stdin(tmp_path, cache_root, demo_dir, demo_pipe):
    picture = tmp_path / "stripes.png"
    image = Image.new("RGB", (48, 36), (20, 160, 90))
    for x in range(0, 48, 6):
        for y in range(36):
            image.putpixel((x, y), (230, 40, 40))
    image.save(picture)
    session_input = "\n".join([
        "describe the sky",
        f"/image {picture}",
        "/bogus",
        "what is in the picture?",
        "/exit",
        "this line is never sent",
    ]) + "\n"
    gen = GenerationConfig(max_new_tokens=6)  # the reference first: it fills the compilation cache
    session = demo_pipe.chat("describe the sky", gen_config=gen)
    first = session.response  # chat() updates and returns the same session object
    second = demo_pipe.chat(("what is in the picture?", str(picture)), session=session, gen_config=gen).response
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvlm.cli", "chat", str(demo_dir), "--max-new-tokens", "6"],
        input=session_input, capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=REPO,
        env=subprocess_env(cache_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two streamed answers, the second one with the first turn and the image in its context.
    assert proc.stdout == f"assistant> {first.text}\nassistant> {second.text}\n"
    assert second.input_token_len > first.input_token_len + first.generate_token_len + 4
    assert "attached" in proc.stderr and "unknown command /bogus" in proc.stderr


def test_demo_with_unreadable_image_fails_before_building(tmp_path, capsys):
    target = tmp_path / "model"
    assert cli.main(["demo", str(tmp_path / "missing.png"), "--model-dir", str(target)]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert not target.exists()
