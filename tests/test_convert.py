"""jaxvlm-convert and jaxvlm checkpoints: round trips for every source layout, the CLI's refusals and atomicity,
sharded restores and the converter's peak memory.

The round trips compare a converted checkpoint with the same source loaded directly (`params.load_model`):
every parameter must be bitwise equal and the logits of one prompt with an image (vision tower, projector,
image_newline, decoder, head) identical.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

import convert
from convert import convert_checkpoint
from jaxvlm import converted_checkpoint, params, sharding
from jaxvlm.model_config import ConfigError
from jaxvlm.kv_cache import init_cache
from jaxvlm.modeling import NEWLINE, Llava

import parallel_worker  # tests/ is on sys.path (conftest.py)

REPO = Path(__file__).resolve().parents[1]
# llava-hf key layouts (same weights) plus NeXT and both original formats.
CASES = ["hub", "transformers-5.0", "transformers-5.6", "hub-no-vision-model", "next", "original-1.5",
         "original-1.6"]


def _source(request, case: str):
    if case == "next":
        return request.getfixturevalue("llava_next_hf")
    if case == "original-1.5":
        return request.getfixturevalue("llava15_original")
    if case == "original-1.6":
        return request.getfixturevalue("llava16_original")
    return request.getfixturevalue("llava15_hf_layouts")[case]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert(source dir, dtype) -> destination, each conversion done once per module."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, str | None], Path] = {}

    def get(src: Path, dtype: str | None = None) -> Path:
        key = (str(src), dtype)
        if key not in done:
            dst = root / f"c{len(done)}"  # a name that matches no chat template on purpose
            done[key] = convert_checkpoint(str(src), dst, dtype, progress=False)
        return done[key]

    return get


def _flat_params(model: Llava) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, pixels, tokens, index):
    model = nnx.merge(graphdef, state)
    features = model.encode_images(pixels)
    cache = init_cache(model.config.text, 1, tokens.shape[1], model.language_model.embed_tokens.get_value().dtype)
    hidden, _ = model.prefill_hidden(tokens, features, index, cache, jnp.asarray([0]))
    return model.language_model.logits(hidden)


def _logits(model: Llava) -> np.ndarray:
    """Logits of a 1-image prompt: random pixels, features placed after 3 text tokens (then image_newline where
    the model has one), 5 more text tokens."""
    cfg = model.config
    rng = np.random.default_rng(0)
    side = cfg.vision.image_size
    pixels = rng.random((1, cfg.vision.num_channels, side, side), dtype=np.float32) * 2 - 1
    n = cfg.tokens_per_tile
    extra = 1 if cfg.anyres else 0
    length = 3 + n + extra + 5
    tokens = rng.integers(3, 900, (1, length))
    index = np.full((1, length), -1)
    index[0, 3 : 3 + n] = np.arange(n)
    if extra:
        index[0, 3 + n] = NEWLINE
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, pixels, tokens, index))


def _direct(tiny, dtype) -> Llava:
    return params.load_model(params.inspect_checkpoint(tiny.path), jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case", CASES)
def test_round_trip_equals_direct_load(request, converted, case):
    tiny = _source(request, case)
    dst = converted(tiny.path)
    assert converted_checkpoint.is_converted(dst) and not converted_checkpoint.is_converted(tiny.path)
    direct = _direct(tiny, "float32")
    loaded = converted_checkpoint.load(dst, "float32")
    assert loaded.config == direct.config
    want, got = _flat_params(direct), _flat_params(loaded)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(_logits(loaded), _logits(direct))


def test_bfloat16_conversion(llava15_hf, converted):
    dst = converted(llava15_hf.path, "bfloat16")
    ck = converted_checkpoint.open_checkpoint(dst)
    assert ck.dtype == "bfloat16" and ck.config.dtype == "bfloat16"  # so dtype='auto' computes in bfloat16
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = converted_checkpoint.load(dst, ck.config.dtype)
    direct = _direct(llava15_hf, "bfloat16")  # float32 source cast on load: the same rounding
    want, got = _flat_params(direct), _flat_params(loaded)
    assert {str(a.dtype) for a in got.values()} == {"bfloat16"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    logits = _logits(loaded)
    full = _logits(_direct(llava15_hf, "float32"))
    np.testing.assert_allclose(logits, full, atol=0.1 * np.abs(full).max())  # bfloat16 rounding only
    # a bfloat16 checkpoint loaded in float32 holds the bfloat16 values exactly, through either restore path
    mesh = sharding.make_mesh(1, 1, ck.config)
    for up in (converted_checkpoint.load(dst, "float32"), converted_checkpoint.load(dst, "float32", mesh=mesh)):
        up = _flat_params(up)
        for name in want:
            assert up[name].dtype == np.float32
            np.testing.assert_array_equal(up[name], want[name].astype(np.float32), err_msg=name)


def test_checkpoint_contents(llava15_original, converted):
    dst = converted(llava15_original.path)
    marker = json.loads((dst / converted_checkpoint.MARKER).read_text())
    assert marker["format"] == "jaxvlm-checkpoint" and marker["version"] == converted_checkpoint.FORMAT_VERSION
    assert marker["source_format"] == "original" and marker["dtype"] == "float32"
    assert marker["chat_template"] == "llava-v1"
    # every parameter of the model is listed once, with its shape, under the group that stores it
    model = _direct(llava15_original, "float32")
    listed = {name: shape for group in marker["groups"].values() for name, shape in group.items()}
    assert listed == {name: list(a.shape) for name, a in _flat_params(model).items()}
    assert sorted(marker["groups"]) == sorted(p.name for p in (dst / "weights").iterdir())
    assert {"layer_0", "layer_1", "embed_tokens", "lm_head", "final_norm", "projector",
            "vision_embeddings"} <= set(marker["groups"])
    # non-weight files are copied as they are; config.json only gains the dtype
    for f in llava15_original.path.iterdir():
        if f.suffix in (".bin", ".safetensors") or f.name.endswith(".index.json"):
            assert not (dst / f.name).exists()
        elif f.name == "config.json":
            src_cfg, dst_cfg = json.loads(f.read_text()), json.loads((dst / f.name).read_text())
            assert dst_cfg == {**src_cfg, "torch_dtype": "float32"}
        else:
            assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
            assert f.name in marker["files"]
    # the CLIP tower's image processor and the tower settings the weights were read with
    clip_pre = llava15_original.vision_tower_path / "preprocessor_config.json"
    assert (dst / "vision_tower/preprocessor_config.json").read_bytes() == clip_pre.read_bytes()
    assert marker["vision_tower"]["preprocessor_config"] is True
    ck = converted_checkpoint.open_checkpoint(dst)
    assert ck.tower_dir == dst / "vision_tower" and ck.config == model.config


def test_pipeline_of_converted_checkpoint_matches_source(llava15_original, converted):
    """End to end through `jaxvlm.pipeline`: the loader's branch, the tower's image processor, and the source's
    chat template (the converted directory's own name matches none)."""
    import jaxvlm
    from jaxvlm import EngineConfig, GenerationConfig

    dst = converted(llava15_original.path)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    gen = GenerationConfig(max_new_tokens=6)
    engine = EngineConfig(session_len=128, max_batch_size=1)
    out = []
    for path in (llava15_original.path, dst):
        with jaxvlm.pipeline(str(path), backend_config=engine) as pipe:
            out.append(pipe(("What is in the picture?", image), gen_config=gen))
    assert out[0].finish_reason == out[1].finish_reason == "length"
    assert out[1].input_token_len == out[0].input_token_len
    assert out[1].token_ids == out[0].token_ids and out[1].text == out[0].text


# ------------------------------------------------------------------------------------------------ loading errors


def test_load_rejects_a_config_that_does_not_fit(llava15_hf, tmp_path):
    dst = convert_checkpoint(str(llava15_hf.path), tmp_path / "c", progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 16
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"mlp/down_proj/kernel is stored with shape"):
        converted_checkpoint.load(dst, "float32")
    marker = json.loads((dst / converted_checkpoint.MARKER).read_text())
    (dst / converted_checkpoint.MARKER).write_text(json.dumps({**marker, "version": 99}))
    with pytest.raises(ConfigError, match="newer"):
        converted_checkpoint.open_checkpoint(dst)
    # Format 1 stored q/k/v and gate/up separately: it must be converted again, not half-loaded.
    (dst / converted_checkpoint.MARKER).write_text(json.dumps({**marker, "version": 1}))
    with pytest.raises(ConfigError, match="older jaxvlm .* convert the model again"):
        converted_checkpoint.open_checkpoint(dst)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_writes_refuses_and_overwrites(llava15_hf, tmp_path, capsys):
    src, dst = str(llava15_hf.path), tmp_path / "out"
    dst.mkdir()  # an existing empty directory is fine
    assert convert.main([src, str(dst), "--quiet"]) == 0
    assert converted_checkpoint.open_checkpoint(dst).dtype == "float32"
    marker = (dst / converted_checkpoint.MARKER).read_bytes()

    assert convert.main([src, str(dst), "--dtype", "bfloat16", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / converted_checkpoint.MARKER).read_bytes() == marker  # untouched

    assert convert.main([src, str(dst), "--dtype", "bfloat16", "--overwrite", "--quiet"]) == 0
    assert converted_checkpoint.open_checkpoint(dst).dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or replaced directories left

    assert convert.main([src, src, "--overwrite", "--quiet"]) == 1  # never over the source
    assert "source" in capsys.readouterr().err
    assert not converted_checkpoint.is_converted(src) and (llava15_hf.path / "config.json").exists()
    assert convert.main([str(dst), str(tmp_path / "again"), "--quiet"]) == 1
    assert "already a jaxvlm checkpoint" in capsys.readouterr().err


def test_cli_vision_tower_option(llava15_original, tmp_path, capsys):
    """An original 1.5 checkpoint whose mm_vision_tower cannot be reached converts with --vision-tower."""
    src = tmp_path / "llava-v1.5-moved"
    shutil.copytree(llava15_original.path, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": str(tmp_path / "gone" / "clip")}))
    assert convert.main([str(src), str(tmp_path / "a"), "--quiet"]) == 1
    assert "vision tower" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    clip = str(llava15_original.vision_tower_path)
    assert convert.main([str(src), str(tmp_path / "b"), "--vision-tower", clip, "--quiet"]) == 0
    got = _flat_params(converted_checkpoint.load(tmp_path / "b", "float32"))
    want = _flat_params(_direct(llava15_original, "float32"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_failed_conversion_leaves_nothing(llava15_hf, tmp_path, capsys):
    """A source that lacks a tensor fails after most groups were written: no destination, no leftovers."""
    src = tmp_path / "src"
    shutil.copytree(llava15_hf.path, src)
    weights = src / "model.safetensors"
    tensors = load_file(weights)
    del tensors[next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))]
    save_file(tensors, weights)
    out = tmp_path / "out"
    assert convert.main([str(src), str(out), "--quiet"]) == 1
    assert "lacks tensors for: language_model.layers.1.mlp.down_proj.kernel" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_conversion_leaves_nothing(llava15_hf, tmp_path, monkeypatch):
    flush = converted_checkpoint.GroupWriter._flush
    calls = []

    def interrupted(self, group):
        calls.append(group)
        if len(calls) == 3:
            raise KeyboardInterrupt
        flush(self, group)

    monkeypatch.setattr(converted_checkpoint.GroupWriter, "_flush", interrupted)
    assert convert.main([str(llava15_hf.path), str(tmp_path / "out"), "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_work_left_by_a_killed_conversion_is_removed_next_time(llava15_hf, tmp_path):
    """A SIGKILLed conversion cannot clean up; the next conversion to that destination removes its work
    directory, but not one of a conversion still running (this process) or from another host."""
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".out.converting-{host}-{int(dead.stdout)}-0a1b2c3d"
    running = tmp_path / f".out.converting-{host}-{os.getpid()}-0a1b2c3d"
    elsewhere = tmp_path / ".out.converting-another-host-1-0a1b2c3d"
    for d in (killed, running, elsewhere):
        (d / "weights").mkdir(parents=True)
    assert convert.main([str(llava15_hf.path), str(tmp_path / "out"), "--quiet"]) == 0
    assert not killed.exists() and running.exists() and elsewhere.exists()
    assert converted_checkpoint.is_converted(tmp_path / "out")


def test_python_m_convert_help():
    run = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    for option in ("SRC", "DST", "--dtype", "bfloat16", "--vision-tower", "--overwrite"):
        assert option in run.stdout


# ------------------------------------------------------------------------------------------------ subprocesses


def _python(script: str, env: dict | None = None, timeout: int = 120) -> dict:
    """Runs `script` in a fresh interpreter at the repository root; returns the JSON it prints last."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_tensor_parallel_restore(llava15_hf, converted):
    """With a mesh, each parameter is restored straight into its sharding (2 CPU devices, tp=2)."""
    dst = converted(llava15_hf.path)
    result = _python(f"""
        import json, numpy as np, jax, sys
        sys.path.insert(0, "tests")
        from test_convert import _logits
        from jaxvlm import converted_checkpoint, sharding
        ck = converted_checkpoint.open_checkpoint({str(dst)!r})
        mesh = sharding.make_mesh(2, 1, ck.config)
        sharded = converted_checkpoint.load(ck.directory, "float32", mesh=mesh)
        single = converted_checkpoint.load(ck.directory, "float32")
        diff = float(np.abs(_logits(sharded) - _logits(single)).max())  # both on the same (CPU) backend
        layer = sharded.language_model.layers[0]
        spec = lambda v: list(v.get_value().sharding.spec)
        specs = {{n: spec(getattr(layer.self_attn, n)) for n in ("qkv_proj", "o_proj")}}
        specs["gate_up"] = spec(layer.mlp.gate_up_proj)
        specs["embed"] = spec(sharded.language_model.embed_tokens)
        shard_shape = layer.self_attn.qkv_proj.get_value().addressable_shards[0].data.shape
        print(json.dumps({{"specs": specs, "shard": list(shard_shape), "diff": diff, "devices": len(jax.devices())}}))
    """, env=parallel_worker.cpu_devices_env(2))
    assert result["devices"] == 2
    assert result["specs"] == {"qkv_proj": [None, "model", None, None], "o_proj": ["model", None, None],
                               "gate_up": [None, None, "model"], "embed": ["model", None]}
    assert result["shard"] == [64, 2, 3, 16]  # 4 heads' q, k and v split over 2 devices
    assert result["diff"] < 1e-4


# A llava-hf checkpoint shaped like a small LLaMA (hidden 1024, 10 layers, vocab 32064) with a tiny tower.
_BIG = dict(hidden=1024, intermediate=2816, layers=10, heads=8, vocab=32064, vision=64, vision_mlp=128, patch=14,
            image=336)


def _write_big_checkpoint(directory: Path) -> int:
    """Random float16 weights in 2 safetensors shards (hub llava-hf names); returns the bytes of weights."""
    b = _BIG
    h, i, v, vh = b["hidden"], b["intermediate"], b["vocab"], b["vision"]
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": "float16",
        "image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "hidden_size": h, "intermediate_size": i, "vocab_size": v,
                        "num_hidden_layers": b["layers"], "num_attention_heads": b["heads"],
                        "num_key_value_heads": b["heads"], "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": vh, "intermediate_size": b["vision_mlp"],
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": b["image"],
                          "patch_size": b["patch"]},
    }
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def t(*shape):  # random bits with the top exponent bit cleared: finite float16 values in (-2, 2)
        return (rng.integers(0, 1 << 16, shape, dtype=np.uint16) & 0xBFFF).view(np.float16)

    first = {"language_model.model.embed_tokens.weight": t(v, h)}
    second = {"language_model.lm_head.weight": t(v, h), "language_model.model.norm.weight": t(h)}
    for k in range(b["layers"]):
        p = f"language_model.model.layers.{k}."
        shard = first if k < b["layers"] // 2 else second
        shard.update({p + f"self_attn.{n}_proj.weight": t(h, h) for n in "qkvo"})
        shard.update({p + "mlp.gate_proj.weight": t(i, h), p + "mlp.up_proj.weight": t(i, h),
                      p + "mlp.down_proj.weight": t(h, i), p + "input_layernorm.weight": t(h),
                      p + "post_attention_layernorm.weight": t(h)})
    vt = "vision_tower.vision_model."
    side = b["image"] // b["patch"]
    second.update({"multi_modal_projector.linear_1.weight": t(h, vh), "multi_modal_projector.linear_1.bias": t(h),
                   "multi_modal_projector.linear_2.weight": t(h, h), "multi_modal_projector.linear_2.bias": t(h),
                   vt + "embeddings.class_embedding": t(vh),
                   vt + "embeddings.patch_embedding.weight": t(vh, 3, b["patch"], b["patch"]),
                   vt + "embeddings.position_embedding.weight": t(side * side + 1, vh),
                   vt + "pre_layrnorm.weight": t(vh), vt + "pre_layrnorm.bias": t(vh)})
    for k in range(2):
        p = vt + f"encoder.layers.{k}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            second.update({p + f"self_attn.{n}.weight": t(vh, vh), p + f"self_attn.{n}.bias": t(vh)})
        for n in ("layer_norm1", "layer_norm2"):
            second.update({p + f"{n}.weight": t(vh), p + f"{n}.bias": t(vh)})
        second.update({p + "mlp.fc1.weight": t(b["vision_mlp"], vh), p + "mlp.fc1.bias": t(b["vision_mlp"]),
                       p + "mlp.fc2.weight": t(vh, b["vision_mlp"]), p + "mlp.fc2.bias": t(vh)})
    weight_map = {}
    for k, shard in enumerate((first, second), 1):
        name = f"model-{k:05d}-of-00002.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update(dict.fromkeys(shard, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(a.nbytes for shard in (first, second) for a in shard.values())


def test_conversion_streams_with_bounded_memory(tmp_path):
    """Peak RSS of a conversion (float16 -> bfloat16) stays well below the size of the checkpoint."""
    src, dst = tmp_path / "big", tmp_path / "big-jax"
    size = _write_big_checkpoint(src)
    assert size > 350e6
    result = _python(f"""
        import json, resource
        import jax, numpy, orbax.checkpoint, flax.nnx, tqdm
        import convert, jaxvlm.converted_checkpoint, jaxvlm.params
        jax.devices()  # the backend and every module the conversion uses are in the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rc = convert.main([{str(src)!r}, {str(dst)!r}, "--dtype", "bfloat16", "--quiet"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"rc": rc, "increase": (peak - base) * 1024}}))  # ru_maxrss is in KiB on Linux
    """, env={"JAX_PLATFORMS": "cpu"})
    assert result["rc"] == 0
    assert result["increase"] < size, f"peak RSS grew by {result['increase'] / size:.0%} of the checkpoint size"
    ck = converted_checkpoint.open_checkpoint(dst)
    assert ck.dtype == "bfloat16" and ck.config.text.num_layers == _BIG["layers"]
    group = ck.groups["layer_3"]
    assert group["language_model/layers/3/mlp/down_proj/kernel"] == [_BIG["intermediate"], _BIG["hidden"]]
