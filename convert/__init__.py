"""`jaxvlm-convert`: llava-hf / original LLaVA checkpoints -> jaxvlm checkpoints (see jaxvlm.converted_checkpoint).

The conversion streams: tensors are read one at a time, transformed, cast and buffered only until their group
(one decoder layer, the embeddings, ...) is complete, then written and dropped. Everything is written into a
hidden temporary directory beside the destination, which is renamed into place only when finished, so an
interrupted conversion never leaves a directory that loads.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxvlm import checkpoint
from jaxvlm.chat_template import match_template_name
from jaxvlm.model_config import read_json

if TYPE_CHECKING:
    from jaxvlm.params import CheckpointInfo

# JAX-dependent modules (jaxvlm.params, jaxvlm.converted_checkpoint) are imported inside the functions: this
# package is imported by `--help` and by the CLI before it picks JAX's platform, which JAX reads on import.

__all__ = ["ConvertError", "convert_checkpoint", "main"]

# Non-weight files a checkpoint needs at inference (globs, top level of the source directory).
META_FILES = (
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "*.tiktoken", "preprocessor_config.json", "processor_config.json", "chat_template*",
)
META_DIRS = ("additional_chat_templates",)  # transformers 5 keeps extra named chat templates here


class ConvertError(ValueError):
    """A conversion that cannot or should not run (bad destination, unsupported dtype, ...)."""


def main(argv: list[str] | None = None) -> int:
    from convert.cli import main as cli_main  # the CLI module imports this one; resolved at call time

    return cli_main(argv)


def convert_checkpoint(
    source: str,
    destination: str | Path,
    dtype: str | None = None,
    *,
    vision_tower_path: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    download_dir: str | None = None,
    progress: bool = True,
) -> Path:
    """Converts `source` (a local directory or a hub id) into a jaxvlm checkpoint at `destination`.

    `dtype` None keeps the source's own dtype. A non-empty destination is refused unless `overwrite`.
    Returns the destination path.
    """
    from jaxvlm import converted_checkpoint, params

    src_dir = checkpoint.resolve_model_dir(str(source), revision, download_dir)
    if converted_checkpoint.is_converted(src_dir):
        raise ConvertError(f"{source} is already a jaxvlm checkpoint")
    info = params.inspect_checkpoint(src_dir, vision_tower_path)
    cfg = info.config
    dtype = dtype or cfg.dtype
    if dtype not in converted_checkpoint.DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not supported ({', '.join(converted_checkpoint.DTYPES)}); "
                           "pass --dtype")
    dst = Path(destination).expanduser().absolute()
    _check_destination(dst, info, overwrite)

    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(dst)
    work = dst.with_name(f".{dst.name}.converting-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    work.mkdir()  # not mkdtemp: its 0700 mode would stay on the finished checkpoint
    try:
        files = _copy_metadata(src_dir, work)
        raw = read_json(src_dir / "config.json")
        (work / "config.json").write_text(json.dumps(_with_dtype(raw, dtype), indent=2) + "\n")
        tower = _write_tower(info, work) if cfg.checkpoint_format == "original" else None
        groups = converted_checkpoint.write_weights(info, dtype, work, _progress(info, progress))
        converted_checkpoint.write_marker(work, {
            "source": str(source),
            "source_format": cfg.checkpoint_format,
            "dtype": dtype,
            "chat_template": match_template_name(str(source)),  # a renamed copy still chats as its source
            "files": ["config.json", *files],
            "vision_tower": tower,
            "groups": groups,
        })
        _move_into_place(work, dst)
    except BaseException:  # KeyboardInterrupt too: leave nothing half-written behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _remove_abandoned_work(dst: Path) -> None:
    """Deletes the work directories of earlier conversions to `dst` that were killed (SIGKILL, power loss) before
    they could clean up: those named after this host and a process that no longer runs. A conversion still
    running, or one from another host sharing the filesystem, is left alone."""
    prefix = f".{dst.name}.converting-{socket.gethostname()}-"
    for work in dst.parent.glob(f"{glob.escape(prefix)}*"):
        pid = work.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _check_destination(dst: Path, info: CheckpointInfo, overwrite: bool) -> None:
    for d in info.weight_dirs:
        src = Path(d).resolve()
        if dst.resolve() == src or dst.resolve() in src.parents:
            raise ConvertError(f"destination {dst} would replace the source checkpoint {src}")
    if dst.is_dir() and not any(dst.iterdir()):
        return
    if dst.exists() and not overwrite:
        raise ConvertError(f"destination {dst} exists and is not empty; pass --overwrite to replace it")


def _move_into_place(work: Path, dst: Path) -> None:
    """Renames the finished directory to `dst`; an existing `dst` is moved aside first and deleted after."""
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
    os.rename(work, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _copy_metadata(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    for pattern in META_FILES:
        for f in sorted(src_dir.glob(pattern)):
            if f.is_file() and f.name not in copied:
                shutil.copy(f, dst_dir / f.name)  # follows hub-cache symlinks: the copy holds the content
                copied.append(f.name)
    for name in META_DIRS:
        if (src_dir / name).is_dir():
            shutil.copytree(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def _with_dtype(raw: dict, dtype: str) -> dict:
    """The source config with the converted dtype in every dtype field it has (torch_dtype at least)."""
    out = dict(raw)
    out["torch_dtype"] = dtype
    if "dtype" in out:
        out["dtype"] = dtype
    for sub in ("text_config", "vision_config"):
        if isinstance(out.get(sub), dict):
            out[sub] = {k: dtype if k in ("torch_dtype", "dtype") else v for k, v in out[sub].items()}
    return out


def _write_tower(info: CheckpointInfo, work: Path) -> dict:
    """Original checkpoints keep the CLIP tower's settings apart: store the ones the weights were read with, and
    its image processor config, so loading never needs the tower's source again."""
    from jaxvlm.converted_checkpoint import TOWER_DIR

    cfg = info.config
    v = cfg.vision
    tower = work / TOWER_DIR
    tower.mkdir()
    clip = {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
        "num_channels": v.num_channels,
    }
    (tower / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
    pre = info.tower_dir / "preprocessor_config.json" if info.tower_dir else None
    has_pre = bool(pre and pre.is_file())
    if has_pre:
        shutil.copy(pre, tower / "preprocessor_config.json")
    return {"dir": TOWER_DIR, "source": cfg.vision_tower_source, "preprocessor_config": has_pre}


def _progress(info: CheckpointInfo, show: bool) -> Iterator[tuple[str, str, np.ndarray]]:
    """The source's tensors, counted in bytes on a progress bar."""
    from tqdm import tqdm

    from jaxvlm import params

    total = sum(
        int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        for d in info.weight_dirs
        for name, t in checkpoint.read_tensor_index(d).items()
        if params.canonical_name(name) is not None
    )
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not show) as bar:
        for item in params.iter_model_tensors(info):
            yield item
            bar.update(item[2].nbytes)
