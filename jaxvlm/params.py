"""Checkpoint tensors -> a `Llava` module: name mapping, layout transforms, streaming and placement.

Every supported layout (hub llava-hf, transformers 5.0-5.5 and >= 5.6 saves, original LLaVA with the CLIP tower
inside or in a separate directory) is first rewritten to one canonical name, then mapped to a parameter path
with the transform that turns PyTorch's [out, in] weights into our kernels. Tensors stream one at a time from
`checkpoint.iter_tensors`, are cast on the host and placed straight onto their devices (and shards).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm import checkpoint
from jaxvlm.model_config import (
    CLIP_VIT_L_336,
    ConfigError,
    LlavaConfig,
    detect_format,
    llava_config_from_hf,
    llava_config_from_original,
    read_json,
)
from jaxvlm.modeling import Llava

log = logging.getLogger(__name__)
T = TypeVar("T")

# (prefix in the file, canonical prefix); the first match wins, so longer prefixes come first.
_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vt."),  # original LLaVA-1.6
    ("model.vision_tower.vision_model.", "vt."),  # transformers 5.0-5.5
    ("vision_tower.vision_model.", "vt."),  # hub llava-hf (transformers 4.x)
    ("model.vision_tower.", "vt."),  # transformers >= 5.6 in memory
    ("vision_tower.", "vt."),  # transformers >= 5.6 save_pretrained (hub names, no vision_model level)
    ("vision_model.", "vt."),  # a CLIP checkpoint (original LLaVA-1.5's separate tower)
    ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm.lm_head."),
    ("model.language_model.", "lm."),
    ("model.multi_modal_projector.", "proj."),
    ("multi_modal_projector.", "proj."),
    ("model.mm_projector.0.", "proj.linear_1."),
    ("model.mm_projector.2.", "proj.linear_2."),
    ("model.mm_projector.", "proj.linear_1."),  # mm_projector_type "linear"
    ("model.image_newline", "newline"),
    ("image_newline", "newline"),
    ("lm_head.", "lm.lm_head."),
    ("model.", "lm."),  # original LLaVA's LLaMA body
)
# Tensors that exist in checkpoints but that inference never reads.
_UNUSED = re.compile(
    r"^(vt\.post_layernorm\.|text_model\.|logit_scale|visual_projection|text_projection|.*rotary_emb\.inv_freq"
    r"|.*position_ids$)"
)


def canonical_name(name: str) -> str | None:
    for prefix, canon in _PREFIXES:
        if name.startswith(prefix):
            name = canon + name[len(prefix) :]
            break
    return None if _UNUSED.match(name) else name


def _dense(w):
    return w.T


def _identity(w):
    return w


@dataclasses.dataclass(frozen=True)
class Part:
    """Where one tensor goes in a fused parameter. The parameter is assembled in the tensors' own (PyTorch,
    output-major) layout, where each part is a block of whole rows, and turned into the parameter's layout by
    `finish`, a transposed view, once complete: the host never copies a transpose (measured 8x slower)."""

    index: tuple[slice, ...]
    source_shape: tuple[int, ...]
    finish: Callable[[np.ndarray], np.ndarray]


def _layer_table(t) -> dict[str, tuple[tuple, Callable, Part | None]]:
    """Decoder-layer tensor (name within the layer) -> (sub-path, transform, part of a fused parameter)."""
    d, f, hd, kvh = t.hidden_size, t.intermediate_size, t.head_dim, t.num_kv_heads
    g = t.num_heads // kvh
    qkv = lambda start, stop: Part((slice(None), slice(start, stop)), (kvh, g + 2, hd, d),
                                   lambda b: b.transpose(3, 0, 1, 2))
    qkv_bias = lambda start, stop: Part((slice(None), slice(start, stop)), (kvh, g + 2, hd), _identity)
    gate_up = lambda i: Part((slice(i, i + 1),), (2, f, d), lambda b: b.transpose(2, 0, 1))
    gate_up_bias = lambda i: Part((slice(i, i + 1),), (2, f), _identity)
    heads = lambda n: lambda w: w.reshape(kvh, n, hd, *w.shape[1:])  # [(kvh*n*hd), ...] -> [kvh, n, hd, ...]
    return {
        "input_layernorm.weight": (("input_layernorm", "scale"), _identity, None),
        "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), _identity, None),
        "self_attn.q_proj.weight": (("self_attn", "qkv_proj"), heads(g), qkv(0, g)),
        "self_attn.k_proj.weight": (("self_attn", "qkv_proj"), heads(1), qkv(g, g + 1)),
        "self_attn.v_proj.weight": (("self_attn", "qkv_proj"), heads(1), qkv(g + 1, g + 2)),
        "self_attn.o_proj.weight": (("self_attn", "o_proj"),
                                    lambda w: w.reshape(w.shape[0], t.num_heads, -1).transpose(1, 2, 0), None),
        "self_attn.q_proj.bias": (("self_attn", "qkv_bias"), heads(g), qkv_bias(0, g)),
        "self_attn.k_proj.bias": (("self_attn", "qkv_bias"), heads(1), qkv_bias(g, g + 1)),
        "self_attn.v_proj.bias": (("self_attn", "qkv_bias"), heads(1), qkv_bias(g + 1, g + 2)),
        "mlp.gate_proj.weight": (("mlp", "gate_up_proj"), lambda w: w[None], gate_up(0)),
        "mlp.up_proj.weight": (("mlp", "gate_up_proj"), lambda w: w[None], gate_up(1)),
        "mlp.gate_proj.bias": (("mlp", "gate_up_bias"), lambda b: b[None], gate_up_bias(0)),
        "mlp.up_proj.bias": (("mlp", "gate_up_bias"), lambda b: b[None], gate_up_bias(1)),
        "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), _dense, None),
        "mlp.down_proj.bias": (("mlp", "down_proj", "bias"), _identity, None),
    }


def _missing_parts(path: tuple, seen_parts: set[tuple], cfg: LlavaConfig) -> list[str]:
    """The tensors a partly filled fused parameter still lacks, as `layers.{i}.{name}`."""
    i = path[2]
    return [f"layers.{i}.{rest}" for rest, (sub, _, part) in _layer_table(cfg.text).items()
            if ("language_model", "layers", i) + sub == path and (path, str(part.index)) not in seen_parts]


def target(canon: str, cfg: LlavaConfig) -> tuple[tuple, Callable, Part | None] | None:
    """Parameter path, transform and part for a canonical tensor name; None where the model does not use it.

    The part is None when the tensor fills the whole parameter, else where it goes in a fused one (q/k/v into
    `qkv_proj`, gate/up into `gate_up_proj`)."""
    if m := re.fullmatch(r"lm\.layers\.(\d+)\.(.+)", canon):
        i, rest = int(m[1]), m[2]
        base = ("language_model", "layers", i)
        table = _layer_table(cfg.text)
        if rest in table:
            sub, fn, part = table[rest]
            return base + sub, fn, part
        return None
    if m := re.fullmatch(r"vt\.encoder\.layers\.(\d+)\.(.+)", canon):
        i, rest = int(m[1]), m[2]
        if i >= cfg.vision_layers_used:
            return None
        base = ("vision_tower", "layers", i)
        if m2 := re.fullmatch(r"(layer_norm[12])\.(weight|bias)", rest):
            return base + (m2[1], "scale" if m2[2] == "weight" else "bias"), _identity, None
        if m2 := re.fullmatch(r"(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.(weight|bias)", rest):
            weight = m2[2] == "weight"
            return base + (m2[1], "kernel" if weight else "bias"), _dense if weight else _identity, None
        return None
    fixed = {
        "lm.embed_tokens.weight": (("language_model", "embed_tokens"), _identity),
        "lm.norm.weight": (("language_model", "norm", "scale"), _identity),
        "lm.lm_head.weight": (("language_model", "lm_head"), _dense),
        "vt.embeddings.class_embedding": (("vision_tower", "class_embedding"), _identity),
        "vt.embeddings.patch_embedding.weight": (("vision_tower", "patch_embedding"), lambda w: w.reshape(w.shape[0], -1).T),
        "vt.embeddings.position_embedding.weight": (("vision_tower", "position_embedding"), _identity),
        "vt.pre_layrnorm.weight": (("vision_tower", "pre_layrnorm", "scale"), _identity),
        "vt.pre_layrnorm.bias": (("vision_tower", "pre_layrnorm", "bias"), _identity),
        "newline": (("image_newline",), _identity),
    }
    if canon in fixed:
        return (*fixed[canon], None)
    if m := re.fullmatch(r"proj\.(linear_[12])\.(weight|bias)", canon):
        weight = m[2] == "weight"
        return ("multi_modal_projector", m[1], "kernel" if weight else "bias"), _dense if weight else _identity, None
    return None


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    config: LlavaConfig
    model_dir: Path
    weight_dirs: tuple[Path, ...]  # every directory whose tensors make up the model (the CLIP dir too)
    tower_dir: Path | None = None  # original checkpoints: the resolved CLIP directory (its image processor)


def _vision_tower_dir(source: str, override: str | None) -> Path | None:
    """The directory of an original checkpoint's CLIP tower, or None when it cannot be had."""
    source = override or source
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    try:
        return checkpoint.resolve_model_dir(source)
    except Exception as e:  # offline, or not a hub id: the caller decides whether it needs the weights
        log.info("vision tower %s not reachable: %s", source, e)
        return None


def inspect_checkpoint(model_dir: Path, vision_tower_path: str | None = None) -> CheckpointInfo:
    """Reads the config of a local checkpoint directory of either format."""
    cfg = read_json(model_dir / "config.json")
    try:
        fmt = detect_format(cfg)
    except ConfigError as e:  # say which config.json: the model path may be a hub id resolved to a cache dir
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None
    if fmt == "llava-hf":
        return CheckpointInfo(llava_config_from_hf(cfg), model_dir, (model_dir,))
    source = cfg.get("mm_vision_tower") or ""
    tower_dir = _vision_tower_dir(source, vision_tower_path) if (source or vision_tower_path) else None
    tower_cfg = read_json(tower_dir / "config.json") if tower_dir and (tower_dir / "config.json").exists() else None
    if tower_cfg is None:
        if "clip-vit-large-patch14-336" not in str(source):
            raise ConfigError(
                f"{model_dir / 'config.json'}: the vision tower {source!r} (mm_vision_tower) is not reachable; "
                "pass EngineConfig(vision_tower_path=...) pointing at a local CLIP directory"
            )
        tower_cfg = CLIP_VIT_L_336
    llava = llava_config_from_original(cfg, tower_cfg)
    names = checkpoint.read_tensor_index(model_dir)
    tower_inside = any(n.startswith("model.vision_tower.") for n in names)
    if tower_inside:
        return CheckpointInfo(llava, model_dir, (model_dir,), tower_dir)
    if tower_dir is None:
        raise ConfigError(
            f"{model_dir} has no vision tower weights and its tower {source!r} is not reachable; "
            "pass EngineConfig(vision_tower_path=...) pointing at a local CLIP directory"
        )
    return CheckpointInfo(llava, model_dir, (model_dir, tower_dir), tower_dir)


def resolve_dtype(dtype: str, checkpoint_dtype: str):
    """'auto' computes in the checkpoint's own dtype; float16 becomes bfloat16 on TPU (no fast fp16 there)."""
    name = checkpoint_dtype if dtype == "auto" else dtype
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {name!r} is not supported (float32, bfloat16, float16)")
    if name == "float16" and dtype == "auto" and jax.default_backend() == "tpu":
        name = "bfloat16"
    return jnp.dtype(name)


def iter_model_tensors(info: CheckpointInfo) -> Iterator[tuple[str, str, np.ndarray]]:
    """(file-name, canonical-name, array) for every tensor the model uses, streamed one at a time."""
    for d in info.weight_dirs:
        for name, array in checkpoint.iter_tensors(d):
            canon = canonical_name(name)
            if canon is not None:
                yield name, canon, array


def param_name(path: tuple) -> str:
    return ".".join(map(str, path))


def mapped_tensors(info: CheckpointInfo, shapes: dict[tuple, tuple],
                   tensors: Iterator[tuple[str, str, np.ndarray]] | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(parameter path, value in the parameter's layout) for every tensor the model uses, in file order.

    Checks that every tensor has a place, appears once and fits its parameter's shape (`shapes`), and at the
    end that no parameter was left without a tensor; each error names the tensor or parameter. The value may be
    a view of the source array (a transpose), so the caller decides when and how to copy it.
    """
    cfg = info.config
    done: set[tuple] = set()
    seen_parts: set[tuple] = set()
    partial: dict[tuple, tuple[np.ndarray, int]] = {}  # fused parameters being assembled: buffer, values filled
    for name, canon, array in tensors if tensors is not None else iter_model_tensors(info):
        hit = target(canon, cfg)
        if hit is None:
            if canon.startswith("vt.encoder.layers.") or canon == "lm.lm_head.weight" and cfg.text.tie_word_embeddings:
                continue  # layers past the selected feature layer; a tied head saved anyway
            raise ConfigError(f"unexpected tensor {name!r} in {info.model_dir}")
        path, transform, part = hit
        if path not in shapes:
            raise ConfigError(f"tensor {name!r} has no place in this model config (parameter {param_name(path)})")
        key = (path, str(part and part.index))
        if path in done or key in seen_parts:
            raise ConfigError(f"tensor {name!r} appears twice in {info.model_dir}")
        value = np.asarray(transform(array))
        # A part's shape: that of its slice of the buffer (a broadcast view, nothing allocated).
        want = tuple(shapes[path]) if part is None else np.broadcast_to(0, part.source_shape)[part.index].shape
        if value.shape != want:
            raise ConfigError(
                f"tensor {name!r} has shape {tuple(array.shape)}, which does not fit parameter "
                f"{param_name(path)} of shape {tuple(shapes[path])} (config {info.model_dir / 'config.json'})"
            )
        if part is not None:  # copy into the fused buffer; hand it on once every part has arrived
            seen_parts.add(key)
            buffer, filled = partial.pop(path, None) or (np.empty(part.source_shape, value.dtype), 0)
            buffer[part.index] = value
            if filled + value.size < buffer.size:
                partial[path] = (buffer, filled + value.size)
                continue
            value = part.finish(buffer)
        done.add(path)
        yield path, value
    missing = [param_name(p) + (f" ({', '.join(_missing_parts(p, seen_parts, cfg))})" if p in partial else "")
               for p in shapes if p not in done]
    if missing:
        raise ConfigError(f"checkpoint {info.model_dir} lacks tensors for: {', '.join(missing[:8])}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def load_model(
    info: CheckpointInfo,
    dtype,
    place: Callable[[tuple, tuple, np.ndarray], jax.Array] | None = None,
    tensors: Iterator[tuple[str, str, np.ndarray]] | None = None,
) -> Llava:
    """Builds the model abstractly, then fills each parameter from the checkpoint's tensors.

    `place(path, axes, host_array)` puts one parameter on its devices (default: the default device); the tensor
    parallel engine passes one that shards. Missing, unexpected-shape or duplicate tensors are errors that name
    the tensor (`mapped_tensors`).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(info.config, dtype)))
    slots = {path: var for path, var in nnx.to_flat_state(state)}
    place = place or (lambda path, axes, a: jax.device_put(a))
    # Three stages overlap, each on its own thread: reading the files, assembling parameters, and the transfers
    # to the device (run here). File reads, numpy copies and transfers all release the GIL. On an H100 host the
    # three took 5.2, 2.8 and 2.1 s one after another for a 7B checkpoint.
    tensors = tensors if tensors is not None else _prefetched(iter_model_tensors(info), depth=4)
    filled = {
        path: slots[path].replace(value=place(path, slots[path].get_metadata().get("axes"), value.astype(dtype)))
        for path, value in _prefetched(mapped_tensors(info, {p: v.shape for p, v in slots.items()}, tensors), 2)
    }
    return nnx.merge(graphdef, nnx.from_flat_state([(p, filled[p]) for p in slots]))


def _prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items`, produced on a worker thread up to `depth` ahead. The worker's exception is raised here, in
    order; if the consumer stops early, the worker stops at its next item."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:  # handed to the consumer, which raises it where the item would have been
            offer((done, e))

    worker = threading.Thread(target=produce, name="jaxvlm-load", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
