"""User-facing configuration objects, with LMDeploy's field names and defaults.

Plain Python on purpose (no jax import): building a config must not initialise an accelerator backend.
Every check raises ValueError naming the field and the offending value, when the object is made.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# OpenAI's API caps top logprobs at 20 too; more is rarely useful and costs a top-k per step.
MAX_LOGPROBS = 20

_DTYPES = ("auto", "bfloat16", "float16", "float32")


# --------------------------------------------------------------------------------------------------------
# Field checks. Each returns the value normalised to a plain Python type (numpy scalars are accepted, since
# values often come out of arrays) or raises ValueError("<Class>.<field> ..., got <value>").


def _error(owner: str, name: str, requirement: str, value: Any) -> ValueError:
    return ValueError(f"{owner}.{name} {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: Any) -> bool:
    # numpy.bool_ is not a bool subclass but is a fine flag; ints are refused so that 2 is not "True".
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _error(owner, name, "must be a bool", value)


def _check_int(owner: str, name: str, value: Any, low: int | None = None, high: int | None = None,
               optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value):
        raise _error(owner, name, "must be an int" + (" or None" if optional else ""), value)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            requirement = f"must be >= {low}"
        elif low is None:
            requirement = f"must be <= {high}"
        else:
            requirement = f"must be in [{low}, {high}]"
        raise _error(owner, name, requirement, value)
    return value


def _check_float(owner: str, name: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _error(owner, name, "must be a number", value)
    value = float(value)
    if not math.isfinite(value):
        raise _error(owner, name, "must be a finite number", value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high == math.inf else f"{high}]"
        raise _error(owner, name, f"must be in {lo}, {hi}", value)
    return value


def _check_str_list(owner: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    # A bare string is the classic slip (stop_words="###"); iterating it would stop on every character.
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _error(owner, name, "must be a list of str or None", value)
    for item in value:
        if not isinstance(item, str):
            raise _error(owner, name, "must be a list of str or None", value)
        if not item:
            # An empty stop string would match at every position.
            raise _error(owner, name, "must not contain empty strings", value)
    return list(value)


def _check_id_list(owner: str, name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _error(owner, name, "must be a list of int or None", value)
    for item in value:
        if not _is_int(item):
            raise _error(owner, name, "must be a list of int or None", value)
        if item < 0:
            raise _error(owner, name, "must contain non-negative token ids", value)
    return [int(item) for item in value]


def _check_path(owner: str, name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _error(owner, name, "must be a path (str or os.PathLike) or None", value)
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise _error(owner, name, "must be a non-empty path or None", value)
    return os.path.expanduser(path)


# --------------------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """How to generate one response; fields and defaults are LMDeploy's.

    Decisions where LMDeploy is loose or silent:
    - ``n`` must be 1: jaxvlm returns one sequence per request (LMDeploy supports only 1 as well).
    - ``top_p`` is accepted in [0, 1] like LMDeploy's own check; 0 keeps only the most likely token.
    - ``temperature`` has no upper bound (LMDeploy asserts <= 2); 0 with ``do_sample`` means greedy.
    - ``max_new_tokens=None`` means "up to session_len minus the prompt" (the API contract).
    - ``logprobs`` (top log-probabilities per output token) is limited to [0, 20].
    - Token ids must be non-negative; stop/bad words must be non-empty strings.
    Values are normalised to plain Python types (numpy scalars are accepted). Mutating fields afterwards
    is allowed (LMDeploy does it); call :meth:`validate` again if you do.
    """

    n: int = 1
    max_new_tokens: int | None = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (raising ValueError naming it) and normalise the values in place."""
        o = "GenerationConfig"
        if not _is_int(self.n) or self.n != 1:
            raise _error(o, "n", "must be 1 (jaxvlm returns one sequence per request)", self.n)
        self.n = 1
        self.max_new_tokens = _check_int(o, "max_new_tokens", self.max_new_tokens, low=0, optional=True)
        self.do_sample = _check_bool(o, "do_sample", self.do_sample)
        self.top_p = _check_float(o, "top_p", self.top_p, 0.0, 1.0)
        self.top_k = _check_int(o, "top_k", self.top_k, low=0)
        self.min_p = _check_float(o, "min_p", self.min_p, 0.0, 1.0)
        self.temperature = _check_float(o, "temperature", self.temperature, 0.0)
        self.repetition_penalty = _check_float(o, "repetition_penalty", self.repetition_penalty, 0.0,
                                               low_open=True)
        self.ignore_eos = _check_bool(o, "ignore_eos", self.ignore_eos)
        self.random_seed = _check_int(o, "random_seed", self.random_seed, low=0, high=2**32 - 1, optional=True)
        self.stop_words = _check_str_list(o, "stop_words", self.stop_words)
        self.bad_words = _check_str_list(o, "bad_words", self.bad_words)
        self.stop_token_ids = _check_id_list(o, "stop_token_ids", self.stop_token_ids)
        self.bad_token_ids = _check_id_list(o, "bad_token_ids", self.bad_token_ids)
        self.min_new_tokens = _check_int(o, "min_new_tokens", self.min_new_tokens, low=0, optional=True)
        if (self.min_new_tokens is not None and self.max_new_tokens is not None
                and self.min_new_tokens > self.max_new_tokens):
            raise _error(o, "min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})",
                         self.min_new_tokens)
        self.skip_special_tokens = _check_bool(o, "skip_special_tokens", self.skip_special_tokens)
        self.spaces_between_special_tokens = _check_bool(o, "spaces_between_special_tokens",
                                                         self.spaces_between_special_tokens)
        self.logprobs = _check_int(o, "logprobs", self.logprobs, low=0, high=MAX_LOGPROBS, optional=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationConfig:
        """Build from a JSON object (e.g. a job file's ``gen_config``); unknown keys raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"GenerationConfig.from_dict expects a JSON object (dict), got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"unknown GenerationConfig field(s) {', '.join(map(repr, unknown))}; "
                             f"valid fields: {', '.join(valid)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------

# Fields of LMDeploy's TurbomindEngineConfig / PytorchEngineConfig (any release) that jaxvlm has no use
# for. They are accepted so LMDeploy code runs unchanged, reported in a warning, and never acted on.
LMDEPLOY_ONLY_ENGINE_FIELDS = frozenset({
    "adapters", "async_", "attn_cp_size", "attn_dp_size", "attn_tp_size", "block_size", "cache_block_seq_len",
    "cache_checkpoint_interval", "cache_chunk_size", "cache_generation", "cache_prompt",
    "cache_prompt_boundary_skip", "communicator", "cp", "cudagraph_capture_batch_sizes", "custom_module_map",
    "device_num", "device_type", "devices", "disable_vision_encoder", "dist_init_addr",
    "distributed_executor_backend", "dllm_block_length", "dllm_confidence_threshold", "dllm_denoising_steps",
    "dllm_unmasking_strategy", "dp_rank", "eager_mode", "empty_init", "enable_eplb", "enable_metrics",
    "enable_microbatch", "enable_mp_engine", "enable_return_routed_experts",
    "enable_transfer_obj_ref", "ep", "eviction_type", "hf_overrides", "kernel_block_size",
    "language_model_only", "logprobs_mode", "max_prefill_iters", "migration_backend", "mlp_dp_size",
    "mlp_tp_size", "model_format", "model_name", "moe_tp_size", "mp_engine_backend", "nnodes", "node_rank",
    "num_cpu_blocks", "num_gpu_blocks", "num_tokens_per_iter", "outer_dp_size", "prefill_interval",
    "prefix_cache_decode_state_interval", "prefix_cache_state_budget", "role",
    "rope_scaling_factor", "should_execute_dummy_batch", "thread_safe", "use_logn_attn",
})


def default_compilation_cache_dir() -> str:
    """``$JAXVLM_CACHE_DIR/xla``, else ``$XDG_CACHE_HOME/jaxvlm/xla``, else ``~/.cache/jaxvlm/xla``."""
    root = os.environ.get("JAXVLM_CACHE_DIR")
    if not root:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache_home, "jaxvlm")
    return os.path.join(os.path.expanduser(root), "xla")


class _DefaultCacheDir:
    """Sentinel: "use default_compilation_cache_dir() at construction" (so the env is read then)."""

    def __repr__(self) -> str:
        return "<$JAXVLM_CACHE_DIR/xla or ~/.cache/jaxvlm/xla>"


_DEFAULT_CACHE_DIR: Any = _DefaultCacheDir()


@dataclass(init=False)
class EngineConfig:
    """Engine settings; the LMDeploy fields keep LMDeploy's names and defaults.

    jaxvlm's own fields:
    - ``compilation_cache_dir``: JAX's persistent compilation cache, so a second run skips XLA compiles.
      Defaults to :func:`default_compilation_cache_dir`; ``None`` turns the cache off.
    - ``prefill_buckets``: prompt lengths that prefill pads to (each a compiled shape); None lets the
      engine choose. Stored sorted and de-duplicated.
    - ``vision_tower_path``: a local CLIP checkpoint for original LLaVA-1.5 checkpoints, whose config names
      a hub tower (``mm_vision_tower``) that is not inside the checkpoint.
    Unlike LMDeploy, ``dtype='float32'`` is allowed and ``cache_max_entry_count=1`` is accepted.
    ``quant_policy`` is LMDeploy's KV-cache quantization: 0 keeps the model's dtype, 8 stores int8 with a scale
    per token and head (twice the sequences in the same memory); 4 (int4) is not implemented and runs as 8,
    with a warning. ``enable_prefix_caching`` (LMDeploy's name and default, off) lets a prompt that starts like
    content still in the KV cache (the same image asked about again, the next turn of a chat) reuse those
    positions instead of prefilling them (`prefix_cache.py`); it is not yet supported with ``dp`` > 1. Any other
    LMDeploy engine field (``cache_block_seq_len``, ...) is accepted with a warning
    and kept, unused, in ``ignored_fields``; a name that is neither raises TypeError.
    """

    tp: int = 1
    dp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    dtype: str = "auto"
    max_prefill_token_num: int = 8192
    quant_policy: int = 0
    enable_prefix_caching: bool = False
    download_dir: str | None = None
    revision: str | None = None
    compilation_cache_dir: str | None = field(default_factory=default_compilation_cache_dir)
    prefill_buckets: tuple[int, ...] | None = None
    vision_tower_path: str | None = None
    ignored_fields: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __init__(self, *, tp: int = 1, dp: int = 1, session_len: int | None = None,
                 max_batch_size: int | None = None, cache_max_entry_count: float = 0.8, dtype: str = "auto",
                 max_prefill_token_num: int = 8192, quant_policy: int = 0, enable_prefix_caching: bool = False,
                 download_dir: str | os.PathLike | None = None,
                 revision: str | None = None,
                 compilation_cache_dir: str | os.PathLike | None = _DEFAULT_CACHE_DIR,
                 prefill_buckets: Sequence[int] | None = None,
                 vision_tower_path: str | os.PathLike | None = None, **lmdeploy_only: Any) -> None:
        o = "EngineConfig"
        unknown = [k for k in lmdeploy_only if k not in LMDEPLOY_ONLY_ENGINE_FIELDS]
        if unknown:
            # Behave like any Python callable given a bad keyword: a typo must not pass silently.
            name = unknown[0]
            valid = [f.name for f in dataclasses.fields(self) if f.init]
            close = difflib.get_close_matches(name, valid + sorted(LMDEPLOY_ONLY_ENGINE_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{o}() got an unexpected keyword argument {name!r}{hint}")

        self.tp = _check_int(o, "tp", tp, low=1)
        self.dp = _check_int(o, "dp", dp, low=1)
        self.session_len = _check_int(o, "session_len", session_len, low=1, optional=True)
        self.max_batch_size = _check_int(o, "max_batch_size", max_batch_size, low=1, optional=True)
        self.cache_max_entry_count = _check_float(o, "cache_max_entry_count", cache_max_entry_count,
                                                  0.0, 1.0, low_open=True)
        if dtype not in _DTYPES:
            raise _error(o, "dtype", f"must be one of {', '.join(map(repr, _DTYPES))}", dtype)
        self.dtype = dtype
        self.max_prefill_token_num = _check_int(o, "max_prefill_token_num", max_prefill_token_num, low=1)
        if not _is_int(quant_policy) or quant_policy not in (0, 4, 8):
            raise _error(o, "quant_policy", "must be 0 (no KV quantization), 8 (int8 KV) or 4", quant_policy)
        if quant_policy == 4:
            warnings.warn(f"{o}: quant_policy=4 (int4 KV cache) is not implemented; using int8 (quant_policy=8)",
                          UserWarning, stacklevel=2)
            quant_policy = 8
        self.quant_policy = int(quant_policy)
        self.enable_prefix_caching = _check_bool(o, "enable_prefix_caching", enable_prefix_caching)
        if self.enable_prefix_caching and self.dp > 1:
            raise _error(o, "enable_prefix_caching", "is not supported with dp > 1 (dp splits the cache slots across "
                         "devices, and a prefix would be copied between them); use dp=1", enable_prefix_caching)
        self.download_dir = _check_path(o, "download_dir", download_dir)
        if revision is not None and not isinstance(revision, str):
            raise _error(o, "revision", "must be a str (branch, tag or commit) or None", revision)
        self.revision = revision
        if compilation_cache_dir is _DEFAULT_CACHE_DIR:
            compilation_cache_dir = default_compilation_cache_dir()
        self.compilation_cache_dir = _check_path(o, "compilation_cache_dir", compilation_cache_dir)
        self.prefill_buckets = _check_buckets(o, prefill_buckets)
        self.vision_tower_path = _check_path(o, "vision_tower_path", vision_tower_path)

        self.ignored_fields = dict(lmdeploy_only)
        if lmdeploy_only:
            listed = ", ".join(f"{k}={v!r}" for k, v in lmdeploy_only.items())
            warnings.warn(f"{o}: ignoring LMDeploy-only field(s) that jaxvlm does not implement: {listed}",
                          UserWarning, stacklevel=2)


def _check_buckets(owner: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise _error(owner, "prefill_buckets", "must be a non-empty list of positive ints or None", value)
    for item in value:
        if not _is_int(item) or item < 1:
            raise _error(owner, "prefill_buckets", "must be a non-empty list of positive ints or None", value)
    return tuple(sorted({int(item) for item in value}))


# LMDeploy code picks a backend by class; jaxvlm has one engine, so both names are the same class.
TurbomindEngineConfig = EngineConfig
PytorchEngineConfig = EngineConfig


# --------------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """Vision-stage settings. ``max_batch_size`` counts image tiles per vision-tower call (a LLaVA-NeXT
    image is several tiles); ``thread_safe`` is LMDeploy's flag for using one pipeline from many threads."""

    max_batch_size: int = 16
    thread_safe: bool = False

    def __post_init__(self) -> None:
        self.max_batch_size = _check_int("VisionConfig", "max_batch_size", self.max_batch_size, low=1)
        self.thread_safe = _check_bool("VisionConfig", "thread_safe", self.thread_safe)


# --------------------------------------------------------------------------------------------------------


@dataclass
class Response:
    """The result of one request (or, when streaming, one delta of it).

    ``finish_reason`` is 'stop', 'length', 'error' or None (still running); ``error_message`` says why a
    request failed. ``logprobs`` holds, per output token, a dict of token id -> log-probability.
    """

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    error_message: str | None = None

    def __repr__(self) -> str:
        # One field per line, as LMDeploy prints it, with long id lists shortened so a batch stays legible.
        lines = [
            f"text={self.text!r}",
            f"input_token_len={self.input_token_len}",
            f"generate_token_len={self.generate_token_len}",
            f"finish_reason={self.finish_reason!r}",
            f"token_ids={_short_list(self.token_ids)}",
            f"logprobs={_short_list(self.logprobs)}",
            f"index={self.index}",
        ]
        if self.error_message is not None:
            lines.append(f"error_message={self.error_message!r}")
        return "Response(\n  " + "\n  ".join(lines) + "\n)"

    def extend(self, other: Response) -> Response:
        """Append a streamed delta: text, token ids and logprobs concatenate, the rest is taken from it."""
        self.text += other.text
        self.token_ids = list(self.token_ids) + list(other.token_ids)
        if other.logprobs:
            self.logprobs = list(self.logprobs or []) + list(other.logprobs)
        self.generate_token_len = other.generate_token_len
        self.input_token_len = other.input_token_len
        self.finish_reason = other.finish_reason
        self.index = other.index
        self.error_message = other.error_message
        return self


def _short_list(items: list | None, keep: int = 8) -> str:
    if items is None or len(items) <= 2 * keep:
        return repr(items)
    head = ", ".join(map(repr, items[:keep]))
    tail = ", ".join(map(repr, items[-keep:]))
    return f"[{head}, ..., {tail}] ({len(items)} items)"
