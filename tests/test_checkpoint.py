"""jaxvlm.checkpoint against torch / safetensors, its refusals, and the tiny-model fixtures it reads."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiny_models
from jaxvlm import checkpoint
from jaxvlm.checkpoint import CheckpointError, iter_tensors, read_tensor_index, resolve_model_dir, weight_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def _np(t: torch.Tensor) -> np.ndarray:
    """The exact numpy value of a torch tensor (bf16 / fp8 through their ml_dtypes twins)."""
    t = t.detach().contiguous()
    special = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
               torch.float8_e5m2: ml_dtypes.float8_e5m2}
    if t.dtype in special:
        bits = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return bits.view(special[t.dtype])
    return t.numpy()


def _assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, ref in want.items():
        ref_np = _np(ref)
        assert got[name].dtype == ref_np.dtype, name
        assert got[name].shape == ref_np.shape, name
        assert got[name].tobytes() == ref_np.tobytes(), name  # bit-exact


def _sample_state() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        f32=torch.randn(3, 5, generator=g),
        f16=torch.randn(4, 2, generator=g).half(),
        bf16=torch.randn(7, generator=g).bfloat16(),
        i64=torch.arange(6, dtype=torch.int64).reshape(2, 3),
        flag=torch.tensor([True, False, True]),
        fp8=torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
    )


# ---------------------------------------------------------------------------------------------- round trips


def test_safetensors_single_round_trip(tmp_path):
    state = _sample_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    got = dict(iter_tensors(tmp_path))
    _assert_same(got, state)
    assert got["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


@pytest.mark.parametrize("dtype", ["float32", np.float16, "bfloat16"])
def test_iter_tensors_converts_dtype(tmp_path, dtype):
    state = OrderedDict(a=torch.randn(4, 3).bfloat16(), b=torch.randn(5).half(), c=torch.randn(2, 2))
    save_file(state, str(tmp_path / "model.safetensors"))
    want = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    for name, arr in iter_tensors(tmp_path, dtype=dtype):
        assert arr.dtype == want
        np.testing.assert_array_equal(arr, _np(state[name]).astype(want))


def test_safetensors_sharded_in_index_order(tmp_path):
    state = _sample_state()
    tiny_models.save_sharded(tmp_path, state, 3, fmt="safetensors")
    files = weight_files(tmp_path)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    got = list(iter_tensors(tmp_path))
    _assert_same(dict(got), state)
    order = [checkpoint.read_tensor_index(tmp_path)[name].file for name, _ in got]
    assert order == sorted(order)  # streamed file by file


def _views_state() -> OrderedDict:
    """Tensors that share storages, with offsets and strides, as state dicts of real models can have."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    half = torch.randn(8, 8).half()
    tagged = torch.randn(4)
    tagged.note = "python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
    return OrderedDict(
        tagged=tagged,
        full=base,
        rows=base[2:5],  # storage offset 20
        cols=base[1:, 3:7],  # offset + row stride 10
        transposed=base.t(),  # strides (1, 10)
        stepped=half[::3, 1::2],  # offset 1, strides (24, 2)
        param=torch.nn.Parameter(torch.randn(3, 2).bfloat16(), requires_grad=False),
        expanded=torch.ones(1, 4).expand(3, 4),  # stride 0
        ids=torch.arange(5)[None],  # int64 like CLIP's position_ids buffer
        flag=torch.tensor([True, False]),
        fp8=torch.randn(5).to(torch.float8_e5m2),
        scalar=torch.tensor(7, dtype=torch.int32),
        empty=torch.zeros(3, 0),
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_bin_round_trip_with_views(tmp_path, legacy):
    state = _views_state()
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    # torch.load itself fails on float8 in legacy files; the saved tensors are the ground truth either way
    reference = state if legacy else torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    got = dict(iter_tensors(tmp_path))
    assert list(got) == list(reference)
    _assert_same(got, reference)
    index = read_tensor_index(tmp_path)
    assert {k: v.shape for k, v in index.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_torch_bin_sharded(tmp_path):
    state = OrderedDict((f"layer.{i}.weight", torch.randn(4, 3).half()) for i in range(5))
    tiny_models.save_sharded(tmp_path, state, 2, fmt="bin")
    assert [f.name for f in weight_files(tmp_path)] == ["pytorch_model-00001-of-00002.bin",
                                                      "pytorch_model-00002-of-00002.bin"]
    _assert_same(dict(iter_tensors(tmp_path)), state)


def test_prefers_safetensors_when_both_exist(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert dict(iter_tensors(tmp_path))["w"].tolist() == [1.0, 1.0]


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8]


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from(_DTYPES),
    start=st.integers(0, 4),
    step=st.integers(1, 3),
    transpose=st.booleans(),
)
def test_views_match_torch_property(tmp_path, shape, dtype, start, step, transpose):
    """Any slice / transpose of a storage reads back exactly as torch.load gives it."""
    base = (torch.arange(int(np.prod(shape)) * 9) % 120).to(dtype).reshape(-1, *shape[1:])
    view = base[start::step]
    if transpose and view.ndim > 1:
        view = view.transpose(0, -1)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"view": view, "base": base}, path)
    _assert_same(dict(iter_tensors(tmp_path)), torch.load(path, weights_only=True))
    save_file({"view": view.contiguous()}, str(tmp_path / "model.safetensors"))
    _assert_same(dict(iter_tensors(tmp_path)), {"view": view.contiguous()})
    (tmp_path / "model.safetensors").unlink()


# ---------------------------------------------------------------------------------------------- refusals


def _zip_with_pickle(path: Path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:  # the shape torch.save gives its archives
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen")])
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_malicious_pickle_refused(tmp_path, module, name, container):
    marker = tmp_path / "pwned"
    # protocol 2: GLOBAL module.name, the argument tuple, REDUCE: what a hostile checkpoint does
    arg = f"touch {marker}" if name != "eval" else f"open({str(marker)!r}, 'w')"
    payload = pickle.dumps(arg, protocol=2)[2:-1]  # the string opcode alone
    pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + payload + b"\x85R."
    path = tmp_path / "pytorch_model.bin"
    if container == "zip":
        _zip_with_pickle(path, pkl)
    else:
        path.write_bytes(pkl)
    with pytest.raises(CheckpointError, match=rf"{module}\.{name}") as err:
        list(iter_tensors(tmp_path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_global_hidden_inside_a_state_dict_refused(tmp_path):
    """A genuine-looking state dict with one hostile entry is still refused, before any tensor is returned."""
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    # replace the final STOP by: push key, push os.system('true'), SETITEM, STOP
    evil = pickle.dumps("x", protocol=2)[2:-1] + b"cos\nsystem\n" + pickle.dumps("true", protocol=2)[2:-1] + b"\x85Rs."
    members[pkl_name] = members[pkl_name][:-1] + evil
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match=r"os\.system"):
        list(iter_tensors(tmp_path))


def test_unknown_storage_dtype_refused(tmp_path):
    torch.save({"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unknown dtype.*ComplexFloatStorage"):
        read_tensor_index(tmp_path)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content,message",
    [
        (lambda good: good[:-10], "truncated"),  # data cut short
        (lambda good: good[:20], "truncated"),  # header cut short
        (lambda good: good[:5], "truncated"),  # not even the length
        (lambda good: struct.pack("<Q", 10) + b"{not json}" + good[18:], "bad safetensors header"),
        (lambda good: struct.pack("<Q", 2**60) + good[8:], "bad safetensors header"),
        (lambda good: _safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
                                         b"\0" * 16), "bad safetensors header"),
        (lambda good: _safetensors_bytes({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
         "unknown dtype 'F4'"),
    ],
    ids=["data", "header", "length", "json", "huge-header", "offsets", "dtype"],
)
def test_bad_safetensors_files(tmp_path, content, message):
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "good.safetensors"))
    good = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "good.safetensors").unlink()
    path = tmp_path / "model.safetensors"
    path.write_bytes(content(good))
    for call in (read_tensor_index, lambda d: list(iter_tensors(d))):
        with pytest.raises(CheckpointError, match=message) as err:
            call(tmp_path)
        assert str(path) in str(err.value)


def test_truncated_torch_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        list(iter_tensors(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_named(tmp_path, fmt):
    state = OrderedDict((f"t{i}", torch.full((8,), float(i))) for i in range(4))
    paths = tiny_models.save_sharded(tmp_path, state, 2, fmt=fmt)
    paths[1].unlink()
    for call in (weight_files, read_tensor_index, lambda d: list(iter_tensors(d))):
        with pytest.raises(CheckpointError, match="missing") as err:
            call(tmp_path)
        assert paths[1].name in str(err.value)


def test_index_entry_missing_from_its_shard(tmp_path):
    tiny_models.save_sharded(tmp_path, OrderedDict(a=torch.ones(2), b=torch.ones(3)), 2, fmt="safetensors")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost"):
        read_tensor_index(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        weight_files(tmp_path)


# ---------------------------------------------------------------------------------------------- locating


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """A huggingface_hub cache entry as snapshot_download leaves it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_resolve_local_dir_and_bad_paths(tmp_path):
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a model directory"):
        resolve_model_dir(str(tmp_path / "file.txt"))
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(CheckpointError, match="no such local directory") as err:
        resolve_model_dir(missing)
    assert missing in str(err.value)


def test_resolve_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(tmp_path / "cache", "someone/tiny-llava")
    assert resolve_model_dir("someone/tiny-llava", download_dir=str(tmp_path / "cache")) == snapshot
    with pytest.raises(CheckpointError, match="someone/not-cached.*HF_HUB_OFFLINE"):
        resolve_model_dir("someone/not-cached", download_dir=str(tmp_path / "cache"))


def test_resolve_hub_id_honours_hf_home(tmp_path):
    snapshot = _fake_hub_cache(tmp_path / "home" / "hub", "someone/tiny-llava")
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("HF_HUB_CACHE", None)
    code = "from jaxvlm.checkpoint import resolve_model_dir; print(resolve_model_dir('someone/tiny-llava'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snapshot


# ---------------------------------------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from jaxvlm.checkpoint import iter_tensors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen = []
    for name, a in iter_tensors(sys.argv[1]):
        seen.append((name, a.shape[0], float(a[0, 0]), float(a[-1, -1])))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # control: holding the whole file must show up, or the measurement above proves nothing
    whole = open(sys.argv[2], "rb").read()
    control = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"increase_bytes": (after - before) * 1024, "control_bytes": (control - after) * 1024,
                      "seen": seen}))
""")
_RSS_TENSORS, _RSS_ROWS, _RSS_COLS = 32, 1024, 2048  # 32 tensors of 8 MiB: a 256 MiB file


def _write_big_safetensors(path: Path) -> None:
    """Streams the file out tensor by tensor, so the test itself stays small too."""
    nbytes = _RSS_ROWS * _RSS_COLS * 4
    header = {f"t{i:02d}": {"dtype": "F32", "shape": [_RSS_ROWS, _RSS_COLS],
                            "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(_RSS_TENSORS)}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(_RSS_TENSORS):
            f.write(np.full((_RSS_ROWS, _RSS_COLS), i + 0.5, dtype=np.float32).tobytes())


def _write_big_bin(path: Path) -> None:
    state = OrderedDict((f"t{i:02d}", torch.full((_RSS_ROWS, _RSS_COLS), i + 0.5)) for i in range(_RSS_TENSORS))
    torch.save(state, path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_streaming_peak_rss_stays_near_one_tensor(tmp_path, fmt):
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    (_write_big_safetensors if fmt == "safetensors" else _write_big_bin)(path)
    size = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    # Through a shell that forks: a child exec'd straight from this process would inherit this process's
    # (large) peak RSS as its ru_maxrss floor, which would hide what the reader uses.
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(path)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [s[0] for s in result["seen"]] == [f"t{i:02d}" for i in range(_RSS_TENSORS)]
    assert all(s[2] == s[3] == i + 0.5 for i, s in enumerate(result["seen"]))
    # one tensor is 8 MiB; a reader that maps or loads the whole 256 MiB file would show ~size here
    assert result["control_bytes"] > size / 2, result["control_bytes"]
    assert result["increase_bytes"] < size / 8, (result["increase_bytes"], size)


# ---------------------------------------------------------------------------------------------- fixtures


def _torch_state(directory: Path) -> dict[str, torch.Tensor]:
    """Everything in a checkpoint directory, read by the reference libraries."""
    files = weight_files(directory)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return out


def test_fixture_files_read_exactly(llava15_hf, llava_next_hf, llava15_original, llava16_mistral_original):
    dirs = [llava15_hf.path, llava_next_hf.path, llava15_original.path, llava15_original.vision_tower_path,
            llava16_mistral_original.path]
    for d in dirs:
        _assert_same(dict(iter_tensors(d)), _torch_state(d))


def test_llava_hf_layouts_load_in_transformers(llava15_hf, llava15_hf_layouts, llava_next_hf_layouts):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    reference = LlavaForConditionalGeneration.from_pretrained(llava15_hf.path).state_dict()
    assert llava15_hf.layout in tiny_models.LAYOUTS
    for layouts, cls in ((llava15_hf_layouts, LlavaForConditionalGeneration),
                         (llava_next_hf_layouts, LlavaNextForConditionalGeneration)):
        if cls is LlavaNextForConditionalGeneration:
            reference = cls.from_pretrained(next(iter(layouts.values())).path).state_dict()
        for layout, model in layouts.items():
            names = set(read_tensor_index(model.path))
            assert tiny_models.detect_layout(dict.fromkeys(names)) == layout
            loaded, info = cls.from_pretrained(model.path, output_loading_info=True)
            assert not any(info.values()), (layout, info)
            for key, value in loaded.state_dict().items():
                assert torch.equal(value, reference[key]), (layout, key)


@pytest.mark.parametrize("fixture", ["llava15_original", "llava16_original", "llava16_mistral_original"])
def test_original_weights_equal_their_reference(request, fixture):
    from transformers import AutoModelForImageTextToText, CLIPVisionModel

    model = request.getfixturevalue(fixture)
    ref = AutoModelForImageTextToText.from_pretrained(model.reference_path).state_dict()
    got = dict(iter_tensors(model.path))
    expected = {}
    for key, value in ref.items():
        name = tiny_models._original_key(key, model.version)
        if name is not None:
            expected[name] = value
    _assert_same(got, expected)
    config = json.loads((model.path / "config.json").read_text())
    assert Path(config["mm_vision_tower"]) == model.vision_tower_path.resolve()
    if model.version == "1.5":  # the tower comes from the CLIP dir, as the original code loads it
        tower = CLIPVisionModel.from_pretrained(model.vision_tower_path).state_dict()
        for key, value in tower.items():
            assert torch.equal(value, ref["model.vision_tower." + key]), key
    else:
        assert not _weights_or_none(model.vision_tower_path)


def _weights_or_none(directory: Path):
    try:
        return weight_files(directory)
    except CheckpointError:
        return None


@pytest.mark.filterwarnings("ignore:.*rope_scaling.*:FutureWarning")  # real 1.5 configs carry rope_scaling: null
def test_tokenizers_load_offline_and_agree(llava15_hf_hub, llava15_original):
    from tokenizers import Tokenizer
    from transformers import AutoProcessor, AutoTokenizer

    text = "USER: <image>\nWhat is shown in this image? ASSISTANT: A red bus. émoji 🙂"
    processor = AutoProcessor.from_pretrained(llava15_hf_hub.path)
    hf_tok = processor.tokenizer
    ids = hf_tok(text).input_ids
    assert ids == Tokenizer.from_file(str(llava15_hf_hub.path / "tokenizer.json")).encode(text).ids
    assert ids[0] == 1 and ids.count(llava15_hf_hub.image_token_index) == 1
    assert len(hf_tok) == llava15_hf_hub.tokenizer_size == tiny_models.PAD_TOKEN_INDEX + 1
    assert hf_tok.decode(ids, skip_special_tokens=True) == text.replace("<image>", "")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}], add_generation_prompt=True
    )
    assert prompt == "USER: <image>\nHi? ASSISTANT:"

    orig_tok = AutoTokenizer.from_pretrained(llava15_original.path)
    assert len(orig_tok) == llava15_original.tokenizer_size == tiny_models.BASE_VOCAB
    assert orig_tok.pad_token == "<unk>" and orig_tok.chat_template is None
    orig_ids = orig_tok(text).input_ids
    assert orig_ids[0] == 1 and max(orig_ids) < tiny_models.BASE_VOCAB  # "<image>" is plain text there


def test_tokens_per_image_matches_processors(llava15_hf, llava_next_hf, llava16_original):
    from PIL import Image
    from transformers import AutoProcessor

    for model in (llava15_hf, llava_next_hf):
        processor = AutoProcessor.from_pretrained(model.path)
        for width, height in [(32, 32), (70, 40), (40, 70), (100, 33), (17, 90), (64, 64), (500, 20)]:
            batch = processor(images=Image.new("RGB", (width, height), (90, 20, 200)), text="<image>",
                              return_tensors="pt")
            n = int((batch["input_ids"] == model.image_token_index).sum())
            assert n == model.tokens_per_image(width, height), (model.version, width, height)
    # the original differs from llava-hf only on pinpoint ties and unpad rounding (design-notes.md)
    assert llava16_original.tokens_per_image(70, 40) == llava_next_hf.tokens_per_image(70, 40)
    assert llava16_original.tokens_per_image(1, 8) != llava_next_hf.tokens_per_image(1, 8)


def test_dtype_and_tied_fixtures(llava15_hf_bf16, llava15_hf_tied):
    from transformers import LlavaForConditionalGeneration

    index = read_tensor_index(llava15_hf_bf16.path)
    assert {info.dtype for info in index.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((llava15_hf_bf16.path / "config.json").read_text())["dtype"] == "bfloat16"

    names = set(read_tensor_index(llava15_hf_tied.path))
    assert not any(n.endswith("lm_head.weight") for n in names)
    model = LlavaForConditionalGeneration.from_pretrained(llava15_hf_tied.path)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_reference_processors(llava15_original, llava16_original):
    from transformers import AutoProcessor

    pad = AutoProcessor.from_pretrained(llava15_original.reference_path).image_processor
    assert type(pad).__name__ == "LlavaImageProcessorPil" and pad.do_pad  # the original's "pad" preprocessing
    anyres = AutoProcessor.from_pretrained(llava16_original.reference_path).image_processor
    original = json.loads((llava16_original.path / "config.json").read_text())
    assert anyres.image_grid_pinpoints == original["image_grid_pinpoints"] == llava16_original.grid_pinpoints
    clip = json.loads((llava16_original.vision_tower_path / "preprocessor_config.json").read_text())
    assert clip["crop_size"] == clip["size"] == llava16_original.image_size  # old-style integer sizes


def test_prefetched_loading_keeps_order_raises_in_place_and_stops_early():
    """The loader's read-ahead thread (params._prefetched): items arrive in order; a failure in the files
    surfaces where its item would have, after the items before it; a consumer that stops leaves no worker."""
    import threading
    import time

    from jaxvlm.params import _prefetched

    assert list(_prefetched(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield from (1, 2)
        raise ValueError("truncated shard")

    got = []
    with pytest.raises(ValueError, match="truncated shard"):
        for item in _prefetched(failing(), 1):
            got.append(item)
    assert got == [1, 2]
    items = _prefetched(iter(range(10_000)), 2)
    next(items)
    items.close()
    deadline = time.monotonic() + 5
    while any(t.name == "jaxvlm-load" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "jaxvlm-load" for t in threading.enumerate())
