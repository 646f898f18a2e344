"""jaxvlm.config: LMDeploy-compatible fields, defaults and validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jaxvlm.config import (
    LMDEPLOY_ONLY_ENGINE_FIELDS,
    EngineConfig,
    GenerationConfig,
    PytorchEngineConfig,
    Response,
    TurbomindEngineConfig,
    VisionConfig,
    default_compilation_cache_dir,
)

# The contract's defaults (/work/shared/api-contract.md), which are LMDeploy's.
GEN_DEFAULTS = dict(n=1, max_new_tokens=512, do_sample=False, top_p=1.0, top_k=50, min_p=0.0, temperature=0.8,
                    repetition_penalty=1.0, ignore_eos=False, random_seed=None, stop_words=None, bad_words=None,
                    stop_token_ids=None, bad_token_ids=None, min_new_tokens=None, skip_special_tokens=True,
                    spaces_between_special_tokens=True, logprobs=None)
ENGINE_DEFAULTS = dict(tp=1, dp=1, session_len=None, max_batch_size=None, cache_max_entry_count=0.8,
                       dtype="auto", max_prefill_token_num=8192, download_dir=None, revision=None,
                       prefill_buckets=None, vision_tower_path=None)


def test_generation_config_defaults_and_field_order():
    cfg = GenerationConfig()
    assert dataclasses.asdict(cfg) == GEN_DEFAULTS
    # same order as LMDeploy, so positional use keeps working
    assert [f.name for f in dataclasses.fields(GenerationConfig)] == list(GEN_DEFAULTS)


@pytest.mark.parametrize("field_name,value", [
    ("n", 2), ("n", 0), ("n", 1.0),
    ("max_new_tokens", -1), ("max_new_tokens", 3.5), ("max_new_tokens", "10"),
    ("do_sample", 1), ("do_sample", "yes"),
    ("top_p", -0.1), ("top_p", 1.01), ("top_p", math.nan), ("top_p", "0.9"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("temperature", -0.5), ("temperature", math.nan), ("temperature", math.inf), ("temperature", None),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("ignore_eos", None),
    ("random_seed", -1), ("random_seed", 2**32), ("random_seed", 1.5),
    ("stop_words", "###"), ("stop_words", ["ok", 3]), ("stop_words", [""]), ("bad_words", [None]),
    ("stop_token_ids", 2), ("stop_token_ids", [2, "3"]), ("stop_token_ids", [-1]),
    ("bad_token_ids", [1.0]), ("bad_token_ids", "13"),
    ("min_new_tokens", -1), ("min_new_tokens", 513),
    ("skip_special_tokens", "false"), ("spaces_between_special_tokens", 0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
])
def test_generation_config_rejects_bad_values_naming_the_field(field_name, value):
    with pytest.raises(ValueError) as info:
        GenerationConfig(**{field_name: value})
    assert field_name in str(info.value)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_generation_config_accepts_edge_values_and_normalises_types():
    cfg = GenerationConfig(top_p=0.0, temperature=0.0, min_p=1.0, top_k=0, max_new_tokens=0, min_new_tokens=0,
                           random_seed=2**32 - 1, logprobs=20, repetition_penalty=1e-3)
    assert cfg.top_p == 0.0 and cfg.random_seed == 2**32 - 1
    cfg = GenerationConfig(max_new_tokens=None, min_new_tokens=10_000)  # None: up to session_len
    assert cfg.max_new_tokens is None
    cfg = GenerationConfig(top_p=np.float32(0.5), top_k=np.int64(5), temperature=1, do_sample=np.bool_(True),
                           stop_token_ids=(np.int32(2), 7), stop_words=("###",), random_seed=np.uint32(9))
    assert type(cfg.top_p) is float and type(cfg.top_k) is int and type(cfg.temperature) is float
    assert cfg.do_sample is True and cfg.stop_token_ids == [2, 7] and cfg.stop_words == ["###"]
    assert type(cfg.random_seed) is int
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_validate_rechecks_after_mutation():
    cfg = GenerationConfig()
    cfg.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        cfg.validate()


def test_generation_config_from_dict():
    job = json.loads('{"max_new_tokens": 64, "do_sample": true, "top_p": 0.9, "random_seed": 7, '
                     '"stop_words": ["</s>"], "min_new_tokens": null}')
    cfg = GenerationConfig.from_dict(job)
    assert cfg == GenerationConfig(max_new_tokens=64, do_sample=True, top_p=0.9, random_seed=7, stop_words=["</s>"])
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg
    assert GenerationConfig.from_dict({}) == GenerationConfig()
    with pytest.raises(ValueError) as info:
        GenerationConfig.from_dict({"max_tokens": 5, "top_p": 0.5})
    message = str(info.value)
    assert "'max_tokens'" in message and "max_new_tokens" in message and "logprobs" in message
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig.from_dict({"top_p": 2})
    with pytest.raises(ValueError):
        GenerationConfig.from_dict([("top_p", 0.5)])


# ------------------------------------------------------------------------------------------------ engine


def test_engine_config_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXVLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = EngineConfig()
    assert {k: getattr(cfg, k) for k in ENGINE_DEFAULTS} == ENGINE_DEFAULTS
    assert cfg.compilation_cache_dir == os.path.join(str(tmp_path), "jaxvlm", "xla")
    assert cfg.ignored_fields == {}


def test_compilation_cache_dir_env_default_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXVLM_CACHE_DIR", str(tmp_path / "cache"))
    assert EngineConfig().compilation_cache_dir == str(tmp_path / "cache" / "xla")
    assert default_compilation_cache_dir() == str(tmp_path / "cache" / "xla")
    monkeypatch.delenv("JAXVLM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert EngineConfig().compilation_cache_dir == str(tmp_path / "home" / ".cache" / "jaxvlm" / "xla")
    assert EngineConfig(compilation_cache_dir=None).compilation_cache_dir is None
    assert EngineConfig(compilation_cache_dir=tmp_path / "x").compilation_cache_dir == str(tmp_path / "x")
    assert EngineConfig(compilation_cache_dir="~/xla").compilation_cache_dir == str(tmp_path / "home" / "xla")


def test_engine_config_accepts_valid_values():
    cfg = EngineConfig(tp=2, dp=2, session_len=4096, max_batch_size=64, cache_max_entry_count=1.0,
                       dtype="float32", max_prefill_token_num=1, download_dir="/models", revision="main",
                       prefill_buckets=[1024, 256, 512, 256], vision_tower_path="/models/clip")
    assert cfg.prefill_buckets == (256, 512, 1024)
    for dtype in ("auto", "bfloat16", "float16", "float32"):
        assert EngineConfig(dtype=dtype).dtype == dtype
    assert dataclasses.replace(cfg, tp=4).tp == 4


@pytest.mark.parametrize("field_name,value", [
    ("tp", 0), ("tp", 1.5), ("dp", 0), ("dp", None),
    ("session_len", 0), ("session_len", "2048"),
    ("max_batch_size", 0), ("max_batch_size", -4),
    ("cache_max_entry_count", 0.0), ("cache_max_entry_count", 1.2), ("cache_max_entry_count", -0.5),
    ("cache_max_entry_count", math.nan),
    ("dtype", "fp16"), ("dtype", "int8"), ("dtype", None),
    ("max_prefill_token_num", 0), ("max_prefill_token_num", 8192.0),
    ("download_dir", 3), ("revision", 5), ("compilation_cache_dir", ""),
    ("prefill_buckets", []), ("prefill_buckets", [0, 512]), ("prefill_buckets", "512"),
    ("prefill_buckets", [256.0]), ("vision_tower_path", ["a"]), ("enable_prefix_caching", 1),
    ("enable_prefix_caching", "yes"),
])
def test_engine_config_rejects_bad_values_naming_the_field(field_name, value):
    with pytest.raises(ValueError) as info:
        EngineConfig(**{field_name: value})
    assert field_name in str(info.value)


def test_lmdeploy_only_fields_warn_and_are_not_acted_on():
    with pytest.warns(UserWarning) as record:
        cfg = TurbomindEngineConfig(tp=1, session_len=2048, cache_block_seq_len=64, num_gpu_blocks=100)
    message = " ".join(str(w.message) for w in record)
    for name in ("cache_block_seq_len", "num_gpu_blocks"):
        assert name in message
    assert cfg.session_len == 2048
    assert cfg.ignored_fields == {"cache_block_seq_len": 64, "num_gpu_blocks": 100}
    assert not hasattr(cfg, "cache_block_seq_len")
    # a config with ignored fields equals one without: they change nothing
    assert cfg == EngineConfig(session_len=2048)
    with pytest.warns(UserWarning, match="block_size"):
        PytorchEngineConfig(block_size=64, eager_mode=True)


def test_prefix_caching_is_lmdeploys_field_and_refuses_dp():
    assert EngineConfig().enable_prefix_caching is False  # LMDeploy's default
    assert TurbomindEngineConfig(enable_prefix_caching=True).enable_prefix_caching is True
    assert EngineConfig(tp=2, enable_prefix_caching=True).ignored_fields == {}
    with pytest.raises(ValueError, match="enable_prefix_caching.*dp > 1"):
        EngineConfig(dp=2, enable_prefix_caching=True)


def test_no_warning_without_lmdeploy_only_fields():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EngineConfig(tp=1, max_batch_size=8)


def test_unknown_engine_field_is_an_error_with_a_suggestion():
    with pytest.raises(TypeError, match="sesion_len.*session_len"):
        EngineConfig(sesion_len=2048)
    with pytest.raises(TypeError, match="no_such_option"):
        EngineConfig(no_such_option=1)
    assert "session_len" not in LMDEPLOY_ONLY_ENGINE_FIELDS and "tp" not in LMDEPLOY_ONLY_ENGINE_FIELDS


def test_engine_aliases_are_one_class():
    assert TurbomindEngineConfig is EngineConfig and PytorchEngineConfig is EngineConfig
    assert isinstance(PytorchEngineConfig(tp=1), TurbomindEngineConfig)


# ---------------------------------------------------------------------------------------- vision, response


def test_vision_config():
    assert dataclasses.asdict(VisionConfig()) == {"max_batch_size": 16, "thread_safe": False}
    assert VisionConfig(max_batch_size=1, thread_safe=True).thread_safe is True
    for kwargs in ({"max_batch_size": 0}, {"max_batch_size": 2.0}, {"thread_safe": "no"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            VisionConfig(**kwargs)


def test_response_fields_repr_and_extend():
    r = Response(text="Hello", generate_token_len=2, input_token_len=617, finish_reason=None,
                 token_ids=[15043, 29892])
    assert (r.logprobs, r.index, r.error_message) == (None, 0, None)
    text = repr(r)
    for part in ("text='Hello'", "input_token_len=617", "generate_token_len=2", "finish_reason=None",
                 "token_ids=[15043, 29892]"):
        assert part in text
    assert "error_message" not in text
    r.extend(Response(text=" world", generate_token_len=3, input_token_len=617, finish_reason="stop",
                      token_ids=[3186], logprobs=[{3186: -0.1}], index=4))
    assert (r.text, r.token_ids, r.finish_reason, r.index, r.generate_token_len) == \
        ("Hello world", [15043, 29892, 3186], "stop", 4, 3)
    assert r.logprobs == [{3186: -0.1}]

    long = Response(text="x", generate_token_len=100, input_token_len=1, token_ids=list(range(100)),
                    finish_reason="length")
    assert "(100 items)" in repr(long) and "50" not in repr(long)
    failed = Response(text="", generate_token_len=0, input_token_len=0, finish_reason="error",
                      error_message="cannot read image 'a.png'")
    assert "error_message=\"cannot read image 'a.png'\"" in repr(failed)


def test_config_module_does_not_import_jax():
    code = "import sys, jaxvlm.config; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_quant_policy_is_lmdeploys_kv_quantization():
    assert EngineConfig().quant_policy == 0
    assert TurbomindEngineConfig(quant_policy=8).quant_policy == 8
    with pytest.warns(UserWarning, match="int4"):  # not implemented: the nearest, int8, with a warning
        assert EngineConfig(quant_policy=4).quant_policy == 8
    for bad in (1, 16, "8", 8.0, True):
        with pytest.raises(ValueError, match="quant_policy"):
            EngineConfig(quant_policy=bad)
