"""From a model path to a ready runner and input processor: resolve, read config, load weights, size the cache."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxvlm import checkpoint, converted_checkpoint, kv_cache, params, sharding
from jaxvlm.chat_template import ChatTemplateConfig, resolve_chat_template
from jaxvlm.config import EngineConfig
from jaxvlm.model_config import LlavaConfig
from jaxvlm.processor import InputProcessor, require_tokenizer_files
from jaxvlm.runner import ModelRunner

log = logging.getLogger(__name__)

DEFAULT_SLOTS_WITHOUT_MEMORY_STATS = 8  # CPU backends report no free memory
MAX_SLOTS = 256


@dataclasses.dataclass
class LoadedModel:
    config: LlavaConfig
    runner: ModelRunner
    processor: InputProcessor
    session_len: int
    model_dir: Path


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent cache: a second process start loads compiled programs instead of recompiling."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small programs too: none recompiles


def plan_slots(cfg: LlavaConfig, session_len: int, cache_dtype, engine: EngineConfig, mesh) -> int:
    """Concurrent sequences the KV cache holds: `cache_max_entry_count` of the free device memory after the
    weights, divided by one full-length sequence's cache (capped by max_batch_size)."""
    t = cfg.text
    per_slot = kv_cache.bytes_per_token(t, cache_dtype) * session_len
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        slots = engine.max_batch_size or DEFAULT_SLOTS_WITHOUT_MEMORY_STATS
        return max(engine.dp, slots - slots % engine.dp)
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    shards = sharding.kv_shards(mesh, t.num_kv_heads)  # the cache is split over tensor-parallel devices
    slots = int(free * engine.cache_max_entry_count * shards // per_slot)
    if slots < 1:
        raise ValueError(
            f"the KV cache for one sequence of session_len={session_len} needs {per_slot / 2**30:.2f} GiB but "
            f"only {free * engine.cache_max_entry_count / 2**30:.2f} GiB is available "
            f"(cache_max_entry_count={engine.cache_max_entry_count}); lower session_len or raise tp")
    slots = min(slots, engine.max_batch_size or MAX_SLOTS)
    slots = max(engine.dp, slots - slots % engine.dp)  # dp replicas split the slots evenly
    log.info("KV cache: %d slots of %d tokens (%.1f GiB)", slots, session_len, slots * per_slot / 2**30)
    return slots


def load(model_path: str, engine: EngineConfig, template_config: ChatTemplateConfig | None = None) -> LoadedModel:
    enable_compilation_cache(engine.compilation_cache_dir)
    model_dir = checkpoint.resolve_model_dir(str(model_path), engine.revision, engine.download_dir)
    # Everything cheap (configs, tokenizer files, template, device count) is checked before any weight is read, so
    # a missing tokenizer or a bad tp fails in a second rather than after loading gigabytes.
    if converted_checkpoint.is_converted(model_dir):  # jaxvlm-convert output: Orbax groups, restored sharded
        converted = converted_checkpoint.open_checkpoint(model_dir)
        cfg, tower_dir = converted.config, converted.tower_dir
        template_config = template_config or converted.chat_template_config(str(model_path))
        load_weights = lambda: converted_checkpoint.load(model_dir, dtype, mesh=mesh)
    else:
        info = params.inspect_checkpoint(model_dir, engine.vision_tower_path)
        cfg, tower_dir = info.config, info.tower_dir
        load_weights = lambda: params.load_model(info, dtype, place=sharding.placer(mesh))
    dtype = params.resolve_dtype(engine.dtype, cfg.dtype)
    mesh = sharding.make_mesh(engine.tp, engine.dp, cfg)
    template = resolve_chat_template(str(model_path), template_config, model_dir=str(model_dir))
    require_tokenizer_files(model_dir)

    limit = cfg.text.max_position_embeddings
    session_len = engine.session_len or limit
    if session_len > limit:
        warnings.warn(f"session_len={session_len} exceeds the model's max_position_embeddings={limit}; "
                      "quality past that length is not what the model was trained for", stacklevel=3)
    if cfg.text.sliding_window and session_len > cfg.text.sliding_window:
        raise ValueError(f"session_len={session_len} exceeds the model's sliding_window="
                         f"{cfg.text.sliding_window}, which jaxvlm does not implement; lower session_len")
    # The tokenizer loads on a thread beside the weights: transformers' AutoTokenizer imports torch, 8.6 s of the
    # 19.5 s from process start to first answer on an H100 (benchmarks/start_probe.py), which the weights' reads
    # and transfers would otherwise wait behind.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxvlm-tokenizer") as pool:
        processor = pool.submit(InputProcessor.from_checkpoint, cfg, model_dir, tower_dir, template)
        model = load_weights()
        processor = processor.result()
    cache_dtype = jnp.int8 if engine.quant_policy == 8 else dtype
    slots = plan_slots(cfg, session_len, cache_dtype, engine, mesh)
    runner = ModelRunner(model, slots, session_len, cache_dtype, engine.max_prefill_token_num,
                         engine.prefill_buckets or (), mesh=mesh)
    return LoadedModel(cfg, runner, processor, session_len, model_dir)
