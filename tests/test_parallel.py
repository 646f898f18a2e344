"""Tensor and data parallelism: identical greedy tokens for every tp/dp layout, weights and KV cache really
split, clear errors for layouts that do not fit, and a two-process `jax.distributed` run on this machine.

Several devices on one CPU need `XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax starts, and
this pytest process must keep its single device, so the work runs in subprocesses (tests/parallel_worker.py),
each bounded by a timeout, two at a time. Compiling dominates their time, so each layout serves one batch of
two image prompts (one vision call, one prefill, a decode bucket or two).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import parallel_worker  # tests/ is on sys.path (conftest.py): the worker's prompts and sizes
import tiny_models
from jaxvlm import EngineConfig, pipeline

WORKER = Path(__file__).with_name("parallel_worker.py")
REPO = WORKER.parent.parent
DEVICES = 8
TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------- tiny models


def _make_8_heads(directory: Path, kv_heads: int, next_: bool, seed: int) -> tiny_models.TinyModel:
    """A tiny llava-hf checkpoint with 8 query heads (the shared fixtures have 4, which tp=8 cannot split)."""
    config = tiny_models._llava_hf_config("mha", "vicuna", next_, False, tiny_models.TILE, tiny_models.PATCH)
    config.text_config.num_attention_heads = 8
    config.text_config.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration)(config)
    tiny_models._randomize(model, seed)
    with torch.no_grad():  # the same logit scale and dead padding rows as tiny_models.build_llava_hf_model
        head = model.get_output_embeddings().weight
        head.mul_(3.0)
        head[tiny_models.BASE_VOCAB :] = 0.0
    return tiny_models.make_llava_hf(directory, next=next_, model=model.eval())


@pytest.fixture(scope="module")
def llava15_hf_h8(tiny_root) -> tiny_models.TinyModel:
    """LLaVA-1.5, MHA with 8 heads / 8 KV heads: tp=8 splits every head and the KV cache."""
    return _make_8_heads(tiny_root / "llava-1.5-tiny-h8-hf", kv_heads=8, next_=False, seed=20)


@pytest.fixture(scope="module")
def llava_next_hf_h8_kv2(tiny_root) -> tiny_models.TinyModel:
    """LLaVA-NeXT, GQA with 8 query / 2 KV heads: tp=4 and tp=8 exceed the KV heads, which are then replicated."""
    return _make_8_heads(tiny_root / "llava-v1.6-vicuna-tiny-h8kv2-hf", kv_heads=2, next_=True, seed=21)


# ---------------------------------------------------------------------------------------------- subprocesses


def _command(mode: str, model: Path, devices: int, configs: list, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), mode, str(model), "--devices", str(devices),
            "--configs", json.dumps([list(c) for c in configs]), *extra]


def _result(stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no result; stderr tail:\n{stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _run(mode: str, model: Path, configs: list, devices: int = DEVICES) -> dict:
    proc = subprocess.run(_command(mode, model, devices, configs), cwd=REPO,
                          env=parallel_worker.cpu_devices_env(devices), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return _result(proc.stdout, proc.stderr)


def _layouts(result: dict) -> dict[tuple[int, ...], list]:
    return {tuple(map(int, key.split(","))): ids for key, ids in result.items()}


ALL = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2)]
LAYOUTS = {  # fixture -> the (tp, dp) layouts it runs; the longest jobs first (two run at a time)
    "llava15_hf_h8": ALL + [(1, 1, 8), (2, 2, 8)],  # MHA, LLaVA-1.5; the last two with an int8 KV cache
    "llava_next_hf_h8_kv2": ALL,  # GQA, LLaVA-NeXT; tp 4 and 8 exceed its 2 KV heads, which are replicated
    "llava_next_hf": [(1, 1), (4, 1)],  # MHA, LLaVA-NeXT (4 heads: no tp=8)
    "llava15_hf_gqa": [(1, 1), (2, 1), (2, 1, 0, 1)],  # GQA, LLaVA-1.5 (2 KV heads, one per device); prefix caching
}
INSPECT = {  # fixture -> layouts whose shardings (or errors) are read
    "llava15_hf_h8": [(8, 1), (4, 2)],
    "llava_next_hf_h8_kv2": [(8, 1), (2, 4), (3, 1), (16, 1), (4, 4)],
}


@pytest.fixture(scope="module")
def jobs(request):
    """Starts the worker runs that this module's selected tests need, two at a time (one per core), and
    returns their futures by (mode, fixture name)."""
    wanted: set[tuple[str, str]] = set()
    for item in request.session.items:
        if item.module.__name__ != __name__:
            continue
        if item.originalname == "test_every_layout_gives_the_same_greedy_tokens":
            wanted.add(("tokens", item.callspec.params["name"]))
        elif item.originalname == "test_weights_and_cache_are_split":
            wanted |= {("inspect", name) for name in INSPECT}
        elif item.originalname == "test_two_processes_with_jax_distributed":
            wanted.add(("tokens", "llava15_hf_h8"))
    order = [("tokens", n) for n in LAYOUTS] + [("inspect", n) for n in INSPECT]
    wanted_in_order = [job for job in order if job in wanted]
    models = {name: request.getfixturevalue(name) for _, name in wanted_in_order}  # built before any job starts
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {(mode, name): pool.submit(_run, mode, models[name].path,
                                         (LAYOUTS if mode == "tokens" else INSPECT)[name])
               for mode, name in wanted_in_order}
    yield futures
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------- same tokens


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_gives_the_same_greedy_tokens(jobs, name):
    runs = _layouts(jobs[("tokens", name)].result())
    assert set(runs) == set(LAYOUTS[name])
    for layout, ids in runs.items():  # each against tp=1 dp=1 with the same cache (int8: quant_policy=8)
        reference = runs[(1, 1, 8) if layout[2:3] == (8,) else (1, 1)]
        assert [len(r) for r in reference] == [parallel_worker.NEW_TOKENS] * len(parallel_worker.prompts())
        assert reference[0] != reference[1]  # the two prompts are told apart: the images reach the decoder
        assert ids == reference, f"layout (tp, dp[, quant_policy]) {layout} differs from tp=1 dp=1"


# ---------------------------------------------------------------------------------------------- sharding


def test_weights_and_cache_are_split(jobs):
    mha = jobs[("inspect", "llava15_hf_h8")].result()
    gqa = jobs[("inspect", "llava_next_hf_h8_kv2")].result()
    d, f, v, hd, slots = 64, 176, tiny_models.MODEL_VOCAB, 16, parallel_worker.MAX_BATCH
    length = parallel_worker.SESSION_LEN

    def check(info: dict, name: str, spec: list, shard: tuple, tp: int, dp: int):
        got = info[name]
        assert got["spec"] == spec, (name, got)
        assert got["shard_shapes"] == [list(shard)], (name, got)  # every device holds a shard of this shape
        assert got["devices"] == tp * dp
        # `slices`: distinct parts of the array over all devices; tp (or tp x dp for the cache) means truly split
        return got["slices"]

    # tp=8 on 8 heads / 8 KV heads: attention by heads, MLP by hidden, embedding and lm_head by vocabulary.
    m = mha["8,1"]
    # qkv_proj [hidden, kv_heads, q/k/v, head_dim]: each device holds one head's q, k and v.
    assert check(m, "qkv_proj", [None, "model", None, None], (d, 1, 3, hd), 8, 1) == 8
    assert check(m, "o_proj", ["model", None, None], (1, hd, d), 8, 1) == 8
    assert check(m, "gate_up_proj", [None, None, "model"], (d, 2, f // 8), 8, 1) == 8
    assert check(m, "down_proj", ["model", None], (f // 8, d), 8, 1) == 8
    assert check(m, "embed_tokens", ["model", None], (v // 8, d), 8, 1) == 8
    assert check(m, "lm_head", [None, "model"], (d, v // 8), 8, 1) == 8
    for cache in ("k_cache", "v_cache"):  # [slots, kv_heads, len, head_dim]: one KV head per device
        assert check(m, cache, ["data", "model", None, None], (slots, 1, length, hd), 8, 1) == 8
    # The vision tower and projector are replicated: each device holds the whole matrix.
    for name, shape in (("vision_q_proj", (32, 32)), ("vision_fc1", (32, 80)),
                        ("vision_patch_embedding", (3 * 8 * 8, 32)), ("projector", (32, d))):
        assert check(m, name, [None, None], shape, 8, 1) == 1
    assert m["vision_tower_split"] == []

    # dp=2 x tp=4: weights split 4 ways and repeated on both replicas; the cache splits slots over dp too.
    m = mha["4,2"]
    assert check(m, "qkv_proj", [None, "model", None, None], (d, 2, 3, hd), 4, 2) == 4
    assert check(m, "down_proj", ["model", None], (f // 4, d), 4, 2) == 4
    assert check(m, "k_cache", ["data", "model", None, None], (slots // 2, 2, length, hd), 4, 2) == 8
    assert check(m, "k_scale", ["data", "model", None], (slots // 2, 2, length), 4, 2) == 8  # int8 cache scales
    assert check(m, "vision_fc1", [None, None], (32, 80), 4, 2) == 1
    assert m["vision_tower_split"] == []

    # tp=8 with 2 KV heads: o_proj still splits by query head; the fused q/k/v projection (grouped by KV head)
    # and the cache are replicated over tp.
    g = gqa["8,1"]
    assert check(g, "qkv_proj", [None, None, None, None], (d, 2, 6, hd), 8, 1) == 1
    assert check(g, "o_proj", ["model", None, None], (1, hd, d), 8, 1) == 8
    assert check(g, "k_cache", ["data", None, None, None], (slots, 2, length, hd), 8, 1) == 1
    assert check(g, "gate_up_proj", [None, None, "model"], (d, 2, f // 8), 8, 1) == 8
    assert g["vision_tower_split"] == []
    # dp=4 x tp=2 divides the 2 KV heads again: one KV head and one slot per device.
    g = gqa["2,4"]
    assert check(g, "qkv_proj", [None, "model", None, None], (d, 1, 6, hd), 2, 4) == 2
    assert check(g, "k_cache", ["data", "model", None, None], (1, 1, length, hd), 2, 4) == 8

    # Layouts that do not fit: ValueError naming tp and the head or device counts.
    assert gqa["3,1"]["error"] == "tp=3 does not divide the model's 8 attention heads"
    assert "tp=16" in gqa["16,1"]["error"] and "16 devices" in gqa["16,1"]["error"]
    assert "only 8 are available" in gqa["16,1"]["error"]
    assert "tp=4 x dp=4 needs 16 devices" in gqa["4,4"]["error"] and "only 8" in gqa["4,4"]["error"]


def test_more_devices_than_present_is_a_value_error(llava15_hf):
    # This process has one CPU device; the check comes before any weight is read.
    with pytest.raises(ValueError, match=r"tp=2 x dp=1 needs 2 devices, but only 1 are available"):
        pipeline(str(llava15_hf.path), backend_config=EngineConfig(tp=2, session_len=64))


# ---------------------------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed(jobs, llava15_hf_h8, tmp_path):
    """Two processes with 2 CPU devices each form one 4-device mesh (gloo collectives between them): tp=4
    splits every layer and the KV cache across the processes, dp=2 x tp=2 puts one replica in each."""
    layouts = [(4, 1), (2, 2)]
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        out, err = open(tmp_path / f"out{i}.txt", "w+"), open(tmp_path / f"err{i}.txt", "w+")
        logs.append((out, err))
        cmd = _command("multihost", llava15_hf_h8.path, 2, layouts, "--coordinator", f"127.0.0.1:{port}",
                       "--num-processes", "2", "--process-id", str(i))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=parallel_worker.cpu_devices_env(2), stdout=out, stderr=err,
                                      text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # killed below; the return code and stderr tail are reported
    finally:
        for p in procs:  # a process whose peer died waits forever in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    reference = _layouts(jobs[("tokens", "llava15_hf_h8")].result())[(1, 1)]  # single process, tp=1
    results = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close(), err.close()
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{stderr[-4000:]}"
        results.append(_result(stdout, stderr))
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert r["global_devices"] == 4
        for tp, dp in layouts:
            assert r[f"{tp},{dp}"] == reference, f"process {r['process_index']}, tp={tp} dp={dp}"
