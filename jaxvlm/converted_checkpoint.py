"""jaxvlm checkpoints: a `Llava`'s parameters as Orbax checkpoints, already in jaxvlm's layout and dtype.

Layout of a checkpoint directory:
- `config.json` (the source's, with the converted dtype written), tokenizer / processor / chat-template /
  generation-config files copied from the source;
- original-format sources only: `vision_tower/config.json` (the CLIP tower's settings the weights were read
  with) and, where the source had one, `vision_tower/preprocessor_config.json`;
- `weights/<group>/`: one Orbax checkpoint per group of parameters (vision embeddings, each vision layer, the
  projector with image_newline, the token embeddings, each decoder layer, the final norm, the lm_head). Groups
  keep conversion streaming (a group is written as soon as its tensors have arrived, then dropped) and loading
  incremental (one group at a time goes from disk to its devices);
- `jaxvlm_checkpoint.json`: the marker, written last: format version, source format, dtype, and every group's
  parameters with their shapes.

Parameters are stored under their module path (`language_model/layers/0/self_attn/qkv_proj`) in the shapes of
`modeling.py`, so loading restores them with no transform, straight into their shardings.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm import params, sharding
from jaxvlm.chat_template import ChatTemplateConfig, match_template_name
from jaxvlm.model_config import ConfigError, LlavaConfig, llava_config_from_hf, llava_config_from_original, read_json
from jaxvlm.modeling import Llava

MARKER = "jaxvlm_checkpoint.json"
FORMAT = "jaxvlm-checkpoint"
FORMAT_VERSION = 2  # 2: q/k/v and gate/up stored fused (qkv_proj, gate_up_proj)
WEIGHTS_DIR = "weights"
TOWER_DIR = "vision_tower"
DTYPES = ("bfloat16", "float16", "float32")

Path_ = tuple[Any, ...]  # an nnx parameter path such as ("language_model", "layers", 0, "mlp", "down_proj", "kernel")


def param_name(path: Path_) -> str:
    return "/".join(map(str, path))


def group_of(path: Path_) -> str:
    """The Orbax checkpoint (under weights/) that holds a parameter."""
    head = path[0]
    if head == "vision_tower":
        return f"vision_layer_{path[2]}" if path[1] == "layers" else "vision_embeddings"
    if head in ("multi_modal_projector", "image_newline"):
        return "projector"
    if head == "language_model":
        if path[1] == "layers":
            return f"layer_{path[2]}"
        return {"embed_tokens": "embed_tokens", "norm": "final_norm", "lm_head": "lm_head"}[path[1]]
    raise ValueError(f"parameter {param_name(path)} belongs to no checkpoint group")


def is_converted(directory: str | Path) -> bool:
    """True for a finished jaxvlm checkpoint (its marker is written last, so a partial one has none)."""
    marker = Path(directory).expanduser() / MARKER
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _abstract_params(cfg: LlavaConfig, dtype) -> tuple[Any, dict[Path_, nnx.Variable]]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, dtype)))
    return graphdef, dict(nnx.to_flat_state(state))


def _nested(items: dict[Path_, Any]) -> dict:
    """{path: leaf} -> nested dicts with string keys (Orbax's tree, one directory level per path element)."""
    tree: dict = {}
    for path, leaf in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return tree


def _leaf(tree: dict, path: Path_) -> Any:
    for key in path:
        tree = tree[str(key)]
    return tree


def _orbax():
    import orbax.checkpoint as ocp  # imported on use: only conversion and loading of these checkpoints need it

    return ocp


# ------------------------------------------------------------------------------------------------------ writing


class GroupWriter:
    """Receives parameters in any order, buffers them per group and saves each group once it is complete."""

    def __init__(self, weights_dir: Path, slots: dict[Path_, Any]):
        self.weights_dir = weights_dir
        self.pending: dict[str, set[Path_]] = {}
        for path in slots:
            self.pending.setdefault(group_of(path), set()).add(path)
        self.groups = {g: sorted(paths, key=param_name) for g, paths in self.pending.items()}
        self.buffers: dict[str, dict[Path_, np.ndarray]] = {}
        self._ocp = ocp = _orbax()
        # Orbax deep-copies numpy leaves before writing by default (a guard against concurrent modification):
        # a second full copy of every group. Saving here is synchronous and the buffers are never touched
        # again, so that copy is skipped where this Orbax has the option.
        handler_args = {}
        if "deepcopy_host_arrays" in inspect.signature(ocp.type_handlers.NumpyHandler).parameters:
            handler_args["deepcopy_host_arrays"] = False
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(**handler_args)),
            (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # unused; Orbax warns without it
        )
        self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))

    def add(self, path: Path_, array: np.ndarray) -> None:
        group = group_of(path)
        self.buffers.setdefault(group, {})[path] = array
        self.pending[group].discard(path)
        if not self.pending[group]:
            self._flush(group)

    def _flush(self, group: str) -> None:
        arrays = self.buffers.pop(group)  # dropped after saving: the buffer never outlives its group
        # One chunk per array (Orbax's default): smaller chunks cut along the tensor-parallel axis would let a
        # device read only its shard, but made saving ~4x slower and heavier on memory (orbax 0.12).
        self._checkpointer.save(self.weights_dir / group, args=self._ocp.args.PyTreeSave(_nested(arrays)))


def write_weights(
    info: params.CheckpointInfo,
    dtype: str,
    directory: Path,
    tensors: Iterator[tuple[str, str, np.ndarray]] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Streams a source checkpoint's tensors into `directory/weights/<group>` in `dtype`.

    The name mapping, transforms and checks are `params.mapped_tensors`', as for `params.load_model`; here the
    transform, cast and C order are one copy (a cast in the source's memory order would cost Orbax another). Returns the marker's table {group: {parameter name: shape}}.
    """
    np_dtype = jnp.dtype(dtype)
    _, slots = _abstract_params(info.config, np_dtype)
    writer = GroupWriter(Path(directory) / WEIGHTS_DIR, slots)
    for path, value in params.mapped_tensors(info, {p: v.shape for p, v in slots.items()}, tensors):
        writer.add(path, np.ascontiguousarray(value, dtype=np_dtype))  # transform, cast and C order: one copy
    return {g: {param_name(p): list(slots[p].shape) for p in paths} for g, paths in writer.groups.items()}


def write_marker(directory: Path, marker: dict) -> None:
    """The marker goes last: its presence is what makes the directory a checkpoint (`is_converted`)."""
    body = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **marker}, indent=1)
    body = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m[0])), body)  # one shape per line
    (Path(directory) / MARKER).write_text(body + "\n")


# ------------------------------------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    directory: Path
    config: LlavaConfig
    dtype: str  # the stored dtype
    tower_dir: Path | None  # original-format sources: the CLIP tower's config + image processor settings
    groups: dict[str, dict[str, list[int]]]  # group -> {parameter name: shape}
    marker: dict

    def chat_template_config(self, model_path: str) -> ChatTemplateConfig | None:
        """The built-in template the source's name matched, for when this checkpoint's own path matches none
        (a renamed copy should chat as its source did); None leaves the choice to the usual rules."""
        name = self.marker.get("chat_template")
        if name and match_template_name(str(model_path)) is None:
            return ChatTemplateConfig(model_name=name)
        return None


def open_checkpoint(directory: str | Path) -> ConvertedCheckpoint:
    """Reads a checkpoint's marker and config; no weights are read."""
    directory = Path(directory).expanduser()
    if not is_converted(directory):
        raise ConfigError(f"{directory} is not a jaxvlm checkpoint (no valid {MARKER})")
    marker = read_json(directory / MARKER)
    if not isinstance(marker.get("version"), int) or marker["version"] > FORMAT_VERSION:
        raise ConfigError(f"{directory / MARKER}: format version {marker.get('version')!r} is newer than this "
                          f"jaxvlm reads ({FORMAT_VERSION}); upgrade jaxvlm or convert again")
    if marker["version"] < FORMAT_VERSION:
        raise ConfigError(f"{directory / MARKER}: format version {marker['version']} was written by an older jaxvlm "
                          f"(this one reads version {FORMAT_VERSION}); convert the model again")
    raw = read_json(directory / "config.json")
    tower_dir = directory / marker["vision_tower"]["dir"] if marker.get("vision_tower") else None
    if marker.get("source_format") == "original":
        if tower_dir is None:
            raise ConfigError(f"{directory / MARKER}: an original-format checkpoint without its vision tower config")
        cfg = llava_config_from_original(raw, read_json(tower_dir / "config.json"))
    else:
        cfg = llava_config_from_hf(raw)
    return ConvertedCheckpoint(directory, cfg, marker["dtype"], tower_dir, marker["groups"], marker)


def _check_inventory(ck: ConvertedCheckpoint, slots: dict[Path_, nnx.Variable]) -> dict[str, Path_]:
    """The marker must list exactly the model's parameters, in the model's shapes."""
    by_name = {param_name(p): p for p in slots}
    stored = {name: tuple(shape) for entries in ck.groups.values() for name, shape in entries.items()}
    for name, path in by_name.items():
        if name not in stored:
            raise ConfigError(f"{ck.directory}: parameter {name} is missing from {MARKER}")
        if stored[name] != tuple(slots[path].shape):
            raise ConfigError(f"{ck.directory}: parameter {name} is stored with shape {stored[name]}, the config "
                              f"gives {tuple(slots[path].shape)}")
    extra = sorted(set(stored) - set(by_name))
    if extra:
        raise ConfigError(f"{ck.directory}: {MARKER} lists parameters this config has no place for: {extra[:4]}")
    return by_name


def load(
    directory: str | Path,
    dtype,
    place: Callable[[tuple, tuple, np.ndarray], jax.Array] | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Llava:
    """Restores a jaxvlm checkpoint into a `Llava` computing in `dtype`, one group at a time.

    With `mesh`, Orbax restores each parameter directly into its `NamedSharding` (each device receives only
    its shard; no full copy on one device). Otherwise each group is restored to host arrays and
    `place(path, axes, array)` puts every parameter on its devices (default: the default device), as
    `params.load_model` does.
    """
    if mesh is not None and place is not None:
        raise ValueError("pass either mesh or place, not both")
    ck = open_checkpoint(directory)
    dtype = jnp.dtype(dtype)
    graphdef, slots = _abstract_params(ck.config, dtype)
    by_name = _check_inventory(ck, slots)
    ocp = _orbax()
    checkpointer = ocp.PyTreeCheckpointer()
    place = place or (lambda path, axes, a: jax.device_put(a))
    filled: dict[Path_, nnx.Variable] = {}
    for group, entries in ck.groups.items():
        paths = [by_name[name] for name in entries]
        axes = {p: slots[p].get_metadata().get("axes") for p in paths}
        if mesh is not None:
            target = _nested({
                p: jax.ShapeDtypeStruct(slots[p].shape, dtype, sharding=jax.sharding.NamedSharding(
                    mesh, sharding.spec_for(axes[p], slots[p].shape, mesh)))
                for p in paths
            })
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        else:
            restore_args = _nested({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
            args = ocp.args.PyTreeRestore(restore_args=restore_args)
        try:
            restored = checkpointer.restore(ck.directory / WEIGHTS_DIR / group, args=args)
        except FileNotFoundError as e:
            raise ConfigError(f"{ck.directory}: weights of group {group!r} are missing ({e})") from e
        for p in paths:
            value = _leaf(restored, p)
            if mesh is None:
                value = place(p, axes[p], np.asarray(value).astype(dtype, copy=False))
            filled[p] = slots[p].replace(value=value)
        del restored  # host copies of this group go before the next is read
    return nnx.merge(graphdef, nnx.from_flat_state(list(filled.items())))
