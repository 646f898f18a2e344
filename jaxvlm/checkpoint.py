"""Checkpoint files -> numpy arrays, one tensor at a time, without torch.

Reads the weight files of a model directory: safetensors (single or sharded with `model.safetensors.index.json`)
and PyTorch `.bin` files (the zip format of `torch.save`, and the legacy pre-1.6 stream format), single or sharded
with `pytorch_model.bin.index.json`.

Memory: a tensor is read with plain `seek` + `readinto` into a freshly allocated array, so the process holds at
most the tensor being returned (plus what the caller keeps). Nothing is memory-mapped: touched pages of a mapped
shard count towards RSS and would make a conversion look as large as the shard.

Safety: `.bin` files are pickles. They are read with an unpickler that knows only the globals a tensor state dict
contains (OrderedDict, torch's tensor/parameter rebuild functions, storage and dtype names) and builds plain
descriptions of them; any other global is refused by name, so no code from the file ever runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

# Files worth downloading from a hub repository (weights are chosen separately, see `_hub_patterns`).
_HUB_META_PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
_HUB_SAFETENSORS_PATTERNS = ["model*.safetensors"]
_HUB_BIN_PATTERNS = ["pytorch_model*.bin"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names the file."""


class TensorInfo(NamedTuple):
    """Where a tensor lives and what it is, without its data."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]


# ------------------------------------------------------------------------------------------------ locating


def resolve_model_dir(model_path: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub.

    huggingface_hub honours HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 (read at each call) restricts the lookup to
    the local cache. `download_dir` replaces the cache directory, as LMDeploy's `download_dir` does.
    """
    if not isinstance(model_path, str) or not model_path.strip():
        raise CheckpointError(f"model path must be a non-empty string, got {model_path!r}")
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model_path}: is a file, not a model directory")
    if not _REPO_ID.match(model_path):
        raise CheckpointError(f"{model_path}: no such local directory, and not a hub id of the form 'owner/name'")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        patterns = _hub_patterns(model_path, revision, offline)
        snapshot = snapshot_download(
            model_path,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except Exception as e:  # network, auth, missing repo, not cached while offline: one clear message
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(
            f"{model_path}: no such local directory, and it could not be fetched from the hub{hint}: "
            f"{type(e).__name__}: {e}"
        ) from e
    return Path(snapshot)


def _hub_patterns(repo_id: str, revision: str | None, offline: bool) -> list[str]:
    """Download one weight format only: many repositories ship both .safetensors and .bin copies."""
    if offline:
        return _HUB_META_PATTERNS + _HUB_SAFETENSORS_PATTERNS + _HUB_BIN_PATTERNS
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # unreachable hub: let snapshot_download fall back to the cache (or report the failure)
        return _HUB_META_PATTERNS + _HUB_SAFETENSORS_PATTERNS + _HUB_BIN_PATTERNS
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return _HUB_META_PATTERNS + (_HUB_SAFETENSORS_PATTERNS if has_safetensors else _HUB_BIN_PATTERNS)


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory, in index order; safetensors preferred when both formats exist."""
    return _weight_source(Path(model_dir))[0]


def _weight_source(model_dir: Path) -> tuple[list[Path], Path | None]:
    """(weight files, the shard index they come from or None for a single file)."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_path = model_dir / index_name
        if index_path.is_file():
            names = list(dict.fromkeys(_read_index(index_path).values()))
            paths = [model_dir / name for name in names]
            for p in paths:
                if not p.is_file():
                    raise CheckpointError(f"{p}: shard listed in {index_path} is missing")
            return paths, index_path
        if (model_dir / single_name).is_file():
            return [model_dir / single_name], None
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such directory")
    raise CheckpointError(
        f"{model_dir}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, "
        f"{BIN_SINGLE})"
    )


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
    for name in set(weight_map.values()):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index_path}: shard name {name!r} points outside the model directory")
    return weight_map


# ------------------------------------------------------------------------------------------------ public reading


def read_tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor's (file, dtype, shape), read from headers only; no tensor data is loaded."""
    model_dir = Path(model_dir)
    files, index_path = _weight_source(model_dir)
    out: dict[str, TensorInfo] = {}
    for path in files:
        for name, entry in _file_entries(path).items():
            if name in out:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {out[name].file}")
            out[name] = TensorInfo(path, entry.dtype, entry.shape)
    if index_path is not None:
        for name, file_name in _read_index(index_path).items():
            info = out.get(name)
            if info is None or info.file.name != Path(file_name).name:
                raise CheckpointError(f"{model_dir / file_name}: lacks tensor {name!r} that {index_path} lists there")
    return out


def iter_tensors(model_dir: Path, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor of the directory, one at a time, in file order.

    bfloat16 / float8 tensors come as ml_dtypes arrays; `dtype` (a numpy dtype or a name such as "bfloat16")
    converts each array on the way out.
    """
    target = _as_dtype(dtype) if dtype is not None else None
    index = read_tensor_index(model_dir)  # validates every header (and the shard index) before any data is read
    files = list(dict.fromkeys(info.file for info in index.values()))
    for path in files:
        reader = _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)
        with reader:
            for name, array in reader.tensors():
                if target is not None and array.dtype != target:
                    array = array.astype(target)
                yield name, array


def _as_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
        return np.dtype(getattr(ml_dtypes, dtype))
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e


def _file_entries(path: Path) -> dict[str, _Entry]:
    reader = _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)
    with reader:
        return reader.entries


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the first element the tensor reads, inside `source`
    strides: tuple[int, ...] | None  # element strides for views; None means contiguous
    source: str  # torch zip: the storage's member name (`start` is relative to it); otherwise "" (absolute)


def _read_exact(f, offset: int, nbytes: int, path: Path, what: str) -> np.ndarray:
    """`nbytes` bytes at `offset` as a fresh uint8 array; a short read means a truncated file."""
    buf = np.empty(nbytes, dtype=np.uint8)
    f.seek(offset)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path}: truncated file ({what} needs bytes {offset}..{offset + nbytes}, "
                                  f"file ends after {offset + got})")
        got += n
    return buf


# ------------------------------------------------------------------------------------------------ safetensors

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class _SafetensorsFile:
    """One safetensors file: the header is parsed and checked on open, tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None
        self.entries: dict[str, _Entry] = {}

    def __enter__(self) -> _SafetensorsFile:
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e})") from e
        try:
            self._parse_header()
        except BaseException:
            self._f.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def _parse_header(self) -> None:
        path, f = self.path, self._f
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated file (no safetensors header: {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER:
            raise CheckpointError(f"{path}: bad safetensors header (claims {header_len} bytes)")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated file (header needs {8 + header_len} bytes, file has {size})")
        raw = f.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad safetensors header (not JSON: {e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: bad safetensors header (not a JSON object)")
        data_start = 8 + header_len
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = self._entry(name, spec, data_start, size)

    def _entry(self, name: str, spec: Any, data_start: int, size: int) -> _Entry:
        path = self.path
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: bad safetensors header entry for {name!r}: {spec!r}") from e
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise CheckpointError(f"{path}: bad safetensors header entry for {name!r}: {spec!r}")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: bad safetensors header: tensor {name!r} ({dtype_name}{list(shape)}) spans bytes "
                f"{begin}..{end}, expected {nbytes} bytes"
            )
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated file (tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size})")
        return _Entry(dtype, shape, data_start + begin, None, "")

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, e in sorted(self.entries.items(), key=lambda kv: kv[1].start):  # sequential reads
            nbytes = int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize
            raw = _read_exact(self._f, e.start, nbytes, self.path, f"tensor {name!r}")
            yield name, raw.view(e.dtype).reshape(e.shape)


# ------------------------------------------------------------------------------------------------ torch .bin

# torch storage class names (as pickled) and torch dtype names -> numpy dtypes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
# torch dtypes with no numpy counterpart here: named as an unknown dtype rather than a refused global.
_OTHER_TORCH_DTYPES = {"complex32", "complex64", "complex128", "float8_e4m3fnuz", "float8_e5m2fnuz",
                       "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "bits8"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType(NamedTuple):
    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _TensorRef(NamedTuple):
    storage: _Storage
    dtype: np.dtype
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, storage.dtype, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> _TensorRef:
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("tensor without a storage or dtype")
    return _TensorRef(storage, dtype, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> Any:
    return data


def _rebuild_from_type(func, new_type, args, state) -> Any:
    # tensor subclasses (e.g. a Parameter with Python attributes): `func` can only be one of the functions
    # of _ALLOWED_GLOBALS, since nothing else is resolvable; the subclass itself is dropped
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "Tensor"): "Tensor",  # type markers only: never instantiated
    ("torch", "Tensor"): "Tensor",
    ("torch.nn.parameter", "Parameter"): "Parameter",
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items() if n != "UntypedStorage"},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", _STORAGE_DTYPES["UntypedStorage"]),
    **{("torch", n): d for n, d in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of tensor state dicts; storages become `_Storage` descriptions."""

    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            if module == "torch" and (name.endswith("Storage") or name in _OTHER_TORCH_DTYPES):
                raise CheckpointError(f"{self.path}: unknown dtype (storage type torch.{name})") from None
            raise CheckpointError(
                f"{self.path}: refusing to unpickle global '{module}.{name}': only tensor state dicts are read"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # zip format: ('storage', type, key, location, numel); legacy adds a view-metadata field
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.path}: legacy storage views are not supported")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def _collect_tensors(obj: Any, path: Path) -> dict[str, _TensorRef]:
    """The state dict inside an unpickled object (a dict of tensors, possibly under 'state_dict' / 'model')."""
    if isinstance(obj, dict) and obj and all(isinstance(v, _TensorRef) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, dict) and not obj:
        return {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _collect_tensors(obj[key], path)
        bad = next(k for k, v in obj.items() if not isinstance(v, _TensorRef))
        raise CheckpointError(f"{path}: not a tensor state dict (entry {bad!r} is {type(obj[bad]).__name__})")
    raise CheckpointError(f"{path}: not a tensor state dict (top level is {type(obj).__name__})")


class _TorchFile:
    """A `torch.save` file: zip archive (data.pkl + data/<key>) or the legacy single-stream format."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, tuple[int, int] | None] = {}  # storage key -> (data start, size) if stored
        self._prefix = ""
        self._big_endian = False
        self.entries: dict[str, _Entry] = {}
        self._refs: dict[str, _TensorRef] = {}
        self._legacy_offsets: dict[str, int] = {}

    def __enter__(self) -> _TorchFile:
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e})") from e
        try:
            if zipfile.is_zipfile(self._f):
                self._open_zip()
            else:
                self._open_legacy()
            self._make_entries()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._f is not None:
            self._f.close()

    # -- zip format
    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self._f)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{self.path}: damaged zip archive ({e})") from e
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{self.path}: not a torch.save archive (found {len(pkls)} data.pkl entries)")
        self._prefix = pkls[0][: -len("data.pkl")]
        if self._prefix + "byteorder" in names:
            self._big_endian = self._zip.read(self._prefix + "byteorder").strip() == b"big"
        try:
            raw = self._zip.read(pkls[0])
            obj = _RestrictedUnpickler(io.BytesIO(raw), self.path).load()
        except CheckpointError:
            raise
        except Exception as e:  # damaged pickle or zip member
            raise CheckpointError(f"{self.path}: cannot read data.pkl ({type(e).__name__}: {e})") from e
        self._refs = _collect_tensors(obj, self.path)

    def _member(self, key: str) -> zipfile.ZipInfo:
        name = f"{self._prefix}data/{key}"
        try:
            return self._zip.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {name!r} is missing from the archive") from None

    def _stored_span(self, info: zipfile.ZipInfo) -> tuple[int, int] | None:
        """(absolute data offset, size) of an uncompressed member, read from its local header."""
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        local = _read_exact(self._f, info.header_offset, 30, self.path, "a zip local header").tobytes()
        if local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: damaged zip archive (bad local header of {info.filename!r})")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_len + extra_len, info.file_size

    # -- legacy format (torch.save(..., _use_new_zipfile_serialization=False))
    def _open_legacy(self) -> None:
        f = self._f
        f.seek(0)
        if f.read(2) == b"PK":  # a zip archive whose central directory is gone
            raise CheckpointError(f"{self.path}: truncated or damaged zip archive (no central directory)")
        f.seek(0)
        try:
            unpickler = lambda: _RestrictedUnpickler(f, self.path)  # noqa: E731
            magic = unpickler().load()
            if magic != _LEGACY_MAGIC:
                raise CheckpointError(f"{self.path}: not a PyTorch checkpoint (neither zip nor legacy format)")
            unpickler().load()  # protocol version
            sys_info = unpickler().load()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                self._big_endian = True
            obj = unpickler().load()
            keys = unpickler().load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
        self._refs = _collect_tensors(obj, self.path)
        storages = {r.storage.key: r.storage for r in self._refs.values()}
        size = os.fstat(f.fileno()).st_size
        pos = f.tell()
        for key in keys:  # each storage: int64 element count, then its bytes, in this order
            count_raw = _read_exact(f, pos, 8, self.path, f"storage {key!r}").tobytes()
            (count,) = struct.unpack(">q" if self._big_endian else "<q", count_raw)
            st = storages.get(str(key))
            itemsize = st.dtype.itemsize if st is not None else 1
            if st is not None and count != st.numel:
                raise CheckpointError(f"{self.path}: storage {key!r} holds {count} elements, its tensors "
                                      f"expect {st.numel}")
            self._legacy_offsets[str(key)] = pos + 8
            pos += 8 + count * itemsize
            if pos > size:
                raise CheckpointError(f"{self.path}: truncated file (storage {key!r} ends at byte {pos}, "
                                      f"file has {size})")

    # -- common
    def _make_entries(self) -> None:
        for name, ref in self._refs.items():
            st = ref.storage
            itemsize = ref.dtype.itemsize
            if any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.strides) or len(ref.shape) != len(ref.strides):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a bad shape/stride {ref.shape}/{ref.strides}")
            numel = int(np.prod(ref.shape, dtype=np.int64))
            extent = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides))
            if (ref.offset + extent) * itemsize > st.numel * st.dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} reaches past the end of its storage {st.key!r}")
            contiguous = ref.strides == _contiguous_strides(ref.shape)
            if self._zip is not None:
                info = self._member(st.key)
                if info.file_size < st.numel * st.dtype.itemsize:
                    raise CheckpointError(f"{self.path}: truncated storage {info.filename!r}")
                if st.key not in self._members:
                    self._members[st.key] = self._stored_span(info)
                source = info.filename
                start = ref.offset * itemsize
            else:
                source = ""
                if st.key not in self._legacy_offsets:
                    raise CheckpointError(f"{self.path}: storage {st.key!r} is missing")
                start = self._legacy_offsets[st.key] + ref.offset * itemsize
            self.entries[name] = _Entry(ref.dtype, ref.shape, start, None if contiguous else ref.strides, source)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, e in self.entries.items():
            yield name, self._read(name, e)

    def _read(self, name: str, e: _Entry) -> np.ndarray:
        itemsize = e.dtype.itemsize
        numel = int(np.prod(e.shape, dtype=np.int64))
        strides = e.strides or _contiguous_strides(e.shape)
        extent = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(e.shape, strides))
        nbytes = extent * itemsize
        if self._zip is None:
            raw = _read_exact(self._f, e.start, nbytes, self.path, f"tensor {name!r}")
        else:
            key = e.source[len(self._prefix) + len("data/"):]
            span = self._members.get(key)
            if span is not None:
                raw = _read_exact(self._f, span[0] + e.start, nbytes, self.path, f"tensor {name!r}")
            else:  # a compressed member (re-zipped by a tool): zipfile decompresses while seeking
                with self._zip.open(e.source) as member:
                    raw = _read_exact(member, e.start, nbytes, self.path, f"tensor {name!r}")
        swap = self._big_endian and itemsize > 1 and e.dtype.kind in "fiu"  # numpy's own dtypes only
        dtype = e.dtype.newbyteorder(">") if swap else e.dtype
        flat = raw.view(dtype)
        if e.strides is None:
            arr = flat.reshape(e.shape)
        else:  # a view: gather the strided elements into a fresh contiguous array
            arr = np.lib.stride_tricks.as_strided(
                flat, shape=e.shape, strides=tuple(s * itemsize for s in e.strides), writeable=False
            ).copy()
        if dtype is not e.dtype:
            arr = arr.astype(e.dtype)
        return arr


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))
