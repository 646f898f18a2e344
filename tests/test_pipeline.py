"""The public API: every example of LMDeploy's VLM pipeline page, with `lmdeploy` replaced by `jaxvlm`, on tiny
local models and images served by a loopback HTTP server; and end-to-end parity with transformers."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import jaxvlm
from jaxvlm import (ChatTemplateConfig, EngineConfig, GenerationConfig, PytorchEngineConfig, Response,
                    TurbomindEngineConfig, VisionConfig, pipeline)
from jaxvlm.prompts import normalize_prompt
from jaxvlm.vl import IMAGE_TOKEN, load_image

import parallel_worker  # tests/ is on sys.path (conftest.py)
from loopback import Loopback


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """Serves tiger.jpeg, human-pose.jpg and det.jpg (random pictures under the names the LMDeploy page uses)."""
    root = tmp_path_factory.mktemp("www")
    for i, name in enumerate(["tiger.jpeg", "human-pose.jpg", "det.jpg"]):
        (root / name).write_bytes(_png(60 + 10 * i, 40 + 7 * i, i))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = Loopback(handler)
    yield server.base
    server.close()


@pytest.fixture(scope="module")
def next_pipe(llava_next_hf):
    with pipeline(str(llava_next_hf.path), backend_config=TurbomindEngineConfig(session_len=1024)) as pipe:
        yield pipe


def test_imports_of_the_contract():
    assert TurbomindEngineConfig is EngineConfig is PytorchEngineConfig
    assert jaxvlm.vl.IMAGE_TOKEN == IMAGE_TOKEN == "<IMAGE_TOKEN>"
    assert VisionConfig().max_batch_size >= 1


def test_hello_world_and_openai_format(next_pipe, image_server):
    url = f"{image_server}/tiger.jpeg"
    image = load_image(url)
    response = next_pipe(("describe this image", image))
    assert isinstance(response, Response) and response.finish_reason in ("stop", "length")
    assert response.input_token_len > 20 and response.generate_token_len == len(response.token_ids)
    prompts = [{"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                            {"type": "image_url", "image_url": {"url": url}}]}]
    openai = next_pipe(prompts)
    assert openai.token_ids == response.token_ids  # same image, same text, same template


def test_session_len_and_sampling_examples(llava_next_hf, image_server):
    image = load_image(f"{image_server}/tiger.jpeg")
    with pytest.warns(UserWarning, match="session_len"):  # beyond the tiny model's 1,024 positions
        pipe = pipeline(str(llava_next_hf.path), backend_config=TurbomindEngineConfig(session_len=8192))
    gen_config = GenerationConfig(top_k=40, top_p=0.8, temperature=0.6)
    response = pipe(("describe this image", image), gen_config=gen_config)
    assert response.finish_reason in ("stop", "length") and response.text == pipe._decode_ids(response.token_ids)


def test_chat_template_config_on_llava_15(llava15_original, image_server):
    pipe = pipeline(str(llava15_original.path), chat_template_config=ChatTemplateConfig(model_name="vicuna"),
                    backend_config=EngineConfig(vision_tower_path=str(llava15_original.vision_tower_path)))
    image = load_image(f"{image_server}/tiger.jpeg")
    assert pipe.processor.template.name == "vicuna"
    response = pipe(("describe this image", image))
    assert response.finish_reason in ("stop", "length")


def test_multi_image_and_batch_examples(next_pipe, image_server):
    urls = [f"{image_server}/human-pose.jpg", f"{image_server}/det.jpg"]
    images = [load_image(u) for u in urls]
    both = next_pipe(("describe these images", images))
    one = next_pipe(("describe these images", images[:1]))
    assert both.input_token_len > one.input_token_len  # the second image's tokens are in the prompt
    prompts = [("describe this image", load_image(u)) for u in urls]
    assert [r.index for r in next_pipe(prompts)] == [0, 1]
    # A prompt's answer does not depend on its batch. 64 tokens: on a GPU the kernels of a two-row and a one-row
    # prefill sum in different orders, and a random tiny model's long greedy runs meet near-ties (seen at token
    # 462 on an H200).
    gen = GenerationConfig(max_new_tokens=64)
    for prompt, r in zip(prompts, next_pipe(prompts, gen_config=gen)):
        assert next_pipe(prompt, gen_config=gen).token_ids == r.token_ids


def test_tensor_parallel_example_on_virtual_devices(llava_next_hf, image_server):
    script = textwrap.dedent(f"""
        from jaxvlm import pipeline, TurbomindEngineConfig
        from jaxvlm.vl import load_image
        pipe = pipeline({str(llava_next_hf.path)!r}, backend_config=TurbomindEngineConfig(tp=2))
        image = load_image({image_server + "/tiger.jpeg"!r})
        response = pipe(('describe this image', image))
        print("TOKENS", response.token_ids)
        # tiles made on the (first) device, as on an accelerator, then used by the model on both
        import dataclasses
        processor = pipe.processor
        processor.image_processor = dataclasses.replace(processor.image_processor, on_device=True)
        print("DEVICE", pipe(('describe this image', image)).token_ids)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=parallel_worker.cpu_devices_env(2), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tokens, device_tiles = (eval(part) for part in out.stdout.split("TOKENS", 1)[1].split("DEVICE"))
    assert device_tiles == tokens
    single = pipeline(str(llava_next_hf.path))(("describe this image", load_image(f"{image_server}/tiger.jpeg")))
    assert tokens == single.token_ids


def test_stream_infer_and_chat(next_pipe, image_server):
    image = load_image(f"{image_server}/tiger.jpeg")
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    whole = next_pipe(("describe this image", image), gen_config=gen)
    deltas = list(next_pipe.stream_infer([("describe this image", image)], gen_config=gen))
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.index == 0 for d in deltas)
    # With logprobs, each delta carries those of its own tokens.
    gen_lp = GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=2)
    whole_lp = next_pipe(("describe this image", image), gen_config=gen_lp)
    deltas = list(next_pipe.stream_infer([("describe this image", image)], gen_config=gen_lp))
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert sum((d.logprobs for d in deltas), []) == whole_lp.logprobs
    sess = next_pipe.chat(("describe this image", image), gen_config=gen)
    first = sess.response
    assert first.token_ids == whole.token_ids
    sess = next_pipe.chat("and what colour is it?", session=sess, gen_config=gen)
    assert len(sess.history) == 2 and sess.response.input_token_len > first.input_token_len + first.generate_token_len


def test_gen_config_list_and_errors(next_pipe):
    rs = next_pipe(["hello", "hi"], gen_config=[GenerationConfig(max_new_tokens=2), GenerationConfig(max_new_tokens=3)])
    assert [r.generate_token_len for r in rs] in ([2, 3],) or all(r.finish_reason == "stop" for r in rs)
    with pytest.raises(ValueError, match="2 prompts"):
        next_pipe(["hello", "hi"], gen_config=[GenerationConfig()])
    with pytest.raises(ValueError):
        next_pipe(("two markers <IMAGE_TOKEN> <IMAGE_TOKEN>", [Image.new("RGB", (8, 8))]))
    bad = next_pipe(["fine", ("two markers <IMAGE_TOKEN> <IMAGE_TOKEN>", [Image.new("RGB", (8, 8))])])
    assert bad[0].finish_reason != "error" and bad[1].finish_reason == "error" and "2" in bad[1].error_message


@pytest.mark.parametrize("name", ["llava15_hf", "llava_next_hf"])
def test_greedy_equals_transformers_on_the_rendered_prompt(request, name, image_server):
    tiny = request.getfixturevalue(name)
    image = load_image(f"{image_server}/det.jpg")
    pipe = pipeline(str(tiny.path))
    ours = pipe(("describe this image", image), gen_config=GenerationConfig(max_new_tokens=24))
    prompt = pipe.processor.template.render([{"role": "user", "content": f"{IMAGE_TOKEN}\ndescribe this image"}])
    processor = AutoProcessor.from_pretrained(tiny.path)
    inputs = processor(text=prompt.replace(IMAGE_TOKEN, tiny.image_token), images=[image], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(tiny.path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.input_token_len == inputs["input_ids"].shape[1]
    eos = tiny.eos_token_id
    expected = out[: out.index(eos)] if eos in out else out
    assert ours.token_ids == expected
    assert ours.finish_reason == ("stop" if eos in out else "length")
    assert ours.text == processor.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llava15_hf", "llava_next_hf"])
def test_image_runs_are_placed_as_transformers_places_them(request, name):
    """Several images between text: the ids transformers' processor gives, each run starting where we say."""
    tiny = request.getfixturevalue(name)
    pipe = request.getfixturevalue("next_pipe") if name == "llava_next_hf" else pipeline(str(tiny.path))
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue"), Image.new("RGB", (33, 33))]
    text = f"compare {IMAGE_TOKEN} with {IMAGE_TOKEN}, then{IMAGE_TOKEN}"
    req = pipe.processor.make_request(0, normalize_prompt((text, images)), GenerationConfig())
    prompt = pipe.processor.template.render([{"role": "user", "content": text}])
    processor = AutoProcessor.from_pretrained(tiny.path)
    expected = processor(text=prompt.replace(IMAGE_TOKEN, tiny.image_token), images=images)["input_ids"][0]
    assert req.token_ids.dtype == np.int32
    np.testing.assert_array_equal(req.token_ids, expected)
    is_image = req.token_ids == tiny.image_token_index
    for im in req.images:
        run = len(im.layout)
        assert is_image[im.start : im.start + run].all()
        assert not is_image[im.start - 1] and not is_image[im.start + run]


@pytest.mark.parametrize("name", ["llava15_hf", "llava_next_hf"])
def test_tiles_resized_on_the_device_give_the_same_answers(request, name, image_server):
    """On an accelerator the processor resizes on the device (`resample.py`); both paths run through the whole
    pipeline (a batch, two images in one prompt) on any backend, the host's PIL tiles against the device's."""
    tiny = request.getfixturevalue(name)
    pipe = pipeline(str(tiny.path), backend_config=TurbomindEngineConfig(session_len=1024))
    tiger, pose, det = (load_image(f"{image_server}/{n}") for n in ("tiger.jpeg", "human-pose.jpg", "det.jpg"))
    prompts = [("describe", tiger), (f"compare {IMAGE_TOKEN} with {IMAGE_TOKEN}", [pose, det]), ("again", tiger)]
    gen = GenerationConfig(max_new_tokens=8)
    assert pipe.processor.image_processor.on_device == (jax.default_backend() != "cpu")  # the default
    pipe.processor.image_processor = dataclasses.replace(pipe.processor.image_processor, on_device=False)
    on_host = pipe(prompts, gen_config=gen)
    pipe.processor.image_processor = dataclasses.replace(pipe.processor.image_processor, on_device=True)
    request_ = pipe.processor.make_request(0, normalize_prompt(prompts[1]), gen)
    assert all(isinstance(im.tiles, jax.Array) for im in request_.images)
    assert [r.token_ids for r in pipe(prompts, gen_config=gen)] == [r.token_ids for r in on_host]


def test_a_single_prompt_is_prepared_on_the_calling_thread(next_pipe, monkeypatch):
    seen = []
    make_request = next_pipe.processor.make_request
    monkeypatch.setattr(next_pipe.processor, "make_request",
                        lambda *a, **k: seen.append(threading.current_thread()) or make_request(*a, **k))
    next_pipe(("describe", Image.new("RGB", (8, 8))), gen_config=GenerationConfig(max_new_tokens=1))
    next_pipe(["one", "two"], gen_config=GenerationConfig(max_new_tokens=1))
    assert seen[0] is threading.current_thread()  # no thread start and handoff for one request
    assert all(t is not threading.current_thread() for t in seen[1:])  # a batch loads on the pool
