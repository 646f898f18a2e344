"""The `jaxvlm` command line: infer (formats, errors, resume after SIGKILL, bounded memory), chat, convert.

Model-side tests use the tiny llava-hf fixture (CPU). One in-process pipeline is shared by the tests here through
`cli._open_pipeline`, so the model compiles once; the subprocess runs use a private JAX compilation cache.
Tests that only exercise the command's own logic replace the pipeline with `FakePipe`. `jaxvlm chat` driven
through a real process's stdin is tested in test_demo.py, on the demo model.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from jaxvlm import batch_infer, cli
from jaxvlm.config import GenerationConfig, Response

REPO = Path(__file__).resolve().parents[1]
SESSION_LEN = 256


# ------------------------------------------------------------------------------------------------ helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def by_id(records: list[dict]) -> dict:
    """Records by id's JSON text; an id-less line's error record (id = its line number) as "line:N"."""
    out = {}
    for r in records:
        key = f"line:{r['line']}" if "line" in r else json.dumps(r["id"])
        assert key not in out, f"id {key} written twice"
        out[key] = r
    return out


class FakePipe:
    """Stands in for the model: answers every prompt at once, in reverse order within a batch."""

    def __init__(self, max_batch: int | None = None):
        self.batches: list[list] = []
        self.max_batch = max_batch

    def stream_infer(self, prompts, gen_config=None):
        assert isinstance(prompts, list) and len(gen_config) == len(prompts)
        if self.max_batch is not None:
            assert len(prompts) <= self.max_batch
        self.batches.append(list(prompts))
        for i in reversed(range(len(prompts))):
            text = prompts[i] if isinstance(prompts[i], str) else json.dumps(prompts[i], default=str)
            yield Response(text="echo:", generate_token_len=1, input_token_len=2, index=i)  # a first piece
            yield Response(text=text, generate_token_len=3, input_token_len=2, finish_reason="stop", index=i)

    def close(self):
        pass


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jaxvlm-cache")


@pytest.fixture(scope="module")
def shared_pipe(llava15_hf, cache_dir):
    from jaxvlm import pipeline
    from jaxvlm.config import EngineConfig

    # The engine settings that `--session-len 256` gives the subprocesses below, and their compilation cache
    # (JAXVLM_CACHE_DIR/xla): programs compiled here are loaded there instead of being compiled again, where
    # this process has not set up JAX's cache elsewhere already.
    config = EngineConfig(session_len=SESSION_LEN, compilation_cache_dir=str(cache_dir / "xla"))
    with pipeline(str(llava15_hf.path), config) as pipe:
        yield pipe


@pytest.fixture
def use_shared_pipe(monkeypatch, shared_pipe):
    opened = []

    def fake_open(args):
        opened.append(args)
        assert args.session_len == SESSION_LEN
        return shared_pipe

    monkeypatch.setattr(shared_pipe, "close", lambda: None)
    monkeypatch.setattr(cli, "_open_pipeline", fake_open)
    return opened


@pytest.fixture
def fake_pipe(monkeypatch):
    pipe = FakePipe()
    monkeypatch.setattr(cli, "_open_pipeline", lambda args: pipe)
    return pipe


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "stripes.png"
    pixels = Image.new("RGB", (48, 36), (20, 160, 90))
    for x in range(0, 48, 6):
        for y in range(36):
            pixels.putpixel((x, y), (230, 40, 40))
    pixels.save(path)
    return path


def subprocess_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(JAXVLM_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PYTHONIOENCODING="utf-8", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


# ------------------------------------------------------------------------------------------------ usage


def test_help_and_usage_errors(tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a usage error must not load a model")

    monkeypatch.setattr(cli, "_open_pipeline", no_model)
    assert cli.main(["--help"]) == 0
    assert "infer" in capsys.readouterr().out
    assert cli.main(["infer", "--help"]) == 0
    assert "exactly once" in capsys.readouterr().out
    assert cli.main([]) == 2
    out = str(tmp_path / "out.jsonl")
    assert cli.main(["infer", "m", "--input", str(tmp_path / "missing.jsonl"), "--output", out]) == 2
    assert "no such file" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    assert cli.main(["infer", "m", "-i", str(good), "-o", out, "--batch-size", "0"]) == 2
    assert cli.main(["infer", "m", "-i", str(good), "-o", out, "--gen-config", '{"temperature": -1}']) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main(["infer", "m", "-i", str(good), "-o", str(good)]) == 2
    assert cli.main(["chat", "m", "--chat-template", "no-such-template"]) == 2
    assert not Path(out).exists()


def test_failures_exit_1(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise OSError("cannot read the checkpoint")

    monkeypatch.setattr(cli, "_open_pipeline", broken)
    good = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    assert cli.main(["infer", "m", "-i", str(good), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    assert "cannot read the checkpoint" in capsys.readouterr().err


def test_engine_options_reach_the_engine_config(monkeypatch):
    import jaxvlm.api

    seen = []
    monkeypatch.setattr(jaxvlm.api, "pipeline", lambda model, backend_config, **kw: seen.append(backend_config))
    for argv in (["infer", "m", "--input", "i", "--output", "o"],
                 ["chat", "m", "--quant-policy", "8", "--enable-prefix-caching", "--tp", "2"]):
        cli._open_pipeline(cli.build_parser().parse_args(argv))
    assert [(c.tp, c.quant_policy, c.enable_prefix_caching) for c in seen] == [(1, 0, False), (2, 8, True)]


def test_convert_is_delegated(monkeypatch):
    seen = {}

    def convert_main(argv=None, prog="jaxvlm-convert"):
        seen.update(argv=argv, prog=prog)
        return 3

    package = types.ModuleType("convert")
    module = types.ModuleType("convert.cli")
    module.main = convert_main
    package.cli = module
    monkeypatch.setitem(sys.modules, "convert", package)
    monkeypatch.setitem(sys.modules, "convert.cli", module)
    assert cli.main(["convert", "src", "dst", "--dtype", "bfloat16", "--help"]) == 3
    assert seen == {"argv": ["src", "dst", "--dtype", "bfloat16", "--help"], "prog": "jaxvlm convert"}


# ------------------------------------------------------------------------------------------------ infer


def test_infer_mixed_inputs(tmp_path, use_shared_pipe, shared_pipe, picture):
    rows = [
        {"id": 1, "prompt": "hello there"},
        {"id": "b", "prompt": "what is in the picture?", "images": [str(picture)]},
        {"id": 3.5, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": picture.as_uri()}},
            {"type": "text", "text": "describe it"}]}], "gen_config": {"max_new_tokens": 3}},
        "this is not json {",
        {"prompt": "a request without an id"},
        "",
        {"id": 6, "prompt": "x", "gen_config": {"temperature": -1}},
        {"id": 7, "prompt": 42},
        {"id": 8, "prompt": "x", "images": [str(tmp_path / "missing.png")]},
        {"id": 1, "prompt": "a duplicate id"},
        {"id": "s", "messages": [{"role": "user", "content": "tell me a story"}],
         "gen_config": {"do_sample": True, "random_seed": 7, "temperature": 1.0, "max_new_tokens": 5}},
        [1, 2, 3],
        {"id": 12, "prompt": "x", "gen_config": {"no_such_field": 1}},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    dst = tmp_path / "sub" / "out.jsonl"
    assert cli.main(["infer", "llava", "-i", str(src), "-o", str(dst), "--max-new-tokens", "6",
                     "--session-len", str(SESSION_LEN), "--batch-size", "16", "--no-progress"]) == 0
    assert len(use_shared_pipe) == 1
    records = read_jsonl(dst)
    out = by_id(records)
    for r in records:
        assert set(r) - {"line"} == {"id", "text", "finish_reason", "input_token_len", "generate_token_len",
                                     "error_message"}
    # ids keep their JSON type; every id (or line number of an id-less line) exactly once
    assert set(out) == {"1", '"b"', "3.5", "line:4", "line:5", "6", "7", "8", '"s"', "line:12", "12"}
    assert isinstance(out["3.5"]["id"], float) and isinstance(out['"b"']["id"], str)

    # The same requests through the API, as one batch (the shapes the command ran, so nothing recompiles).
    expected = {
        "1": ("hello there", GenerationConfig(max_new_tokens=6)),
        '"b"': (("what is in the picture?", [str(picture)]), GenerationConfig(max_new_tokens=6)),
        "3.5": (rows[2]["messages"], GenerationConfig(max_new_tokens=3)),
        '"s"': (rows[10]["messages"], GenerationConfig(do_sample=True, random_seed=7, temperature=1.0,
                                                       max_new_tokens=5)),
    }
    refs = shared_pipe([p for p, _ in expected.values()], gen_config=[g for _, g in expected.values()])
    for key, ref in zip(expected, refs):
        got = out[key]
        assert (got["text"], got["finish_reason"], got["input_token_len"], got["generate_token_len"]) == \
            (ref.text, ref.finish_reason, ref.input_token_len, ref.generate_token_len), key
        assert got["error_message"] is None
    assert out["3.5"]["generate_token_len"] <= 3 and out['"b"']["input_token_len"] > out["1"]["input_token_len"]

    for key, fragment in [("line:4", "not valid JSON"), ("line:5", 'no "id"'), ("6", "temperature"),
                          ("7", '"prompt"'), ("8", "missing.png"), ("12", "no_such_field"),
                          ("line:12", "expected a JSON object")]:
        assert out[key]["finish_reason"] == "error" and fragment in out[key]["error_message"], out[key]
    # an id-less line is reported under its line number, marked as such: no clash with the request id 12
    assert out["line:4"]["id"] == 4 and out["line:12"]["id"] == 12 and "line" not in out["12"]
    assert "duplicate" not in out["1"]["text"]  # the first line with id 1 is the one that ran


def test_infer_resume_skips_done_and_drops_torn_line(tmp_path, fake_pipe, capsys):
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(10)] + ["broken {", {"id": 3, "prompt": "again"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    dst = tmp_path / "out.jsonl"
    done = [{"id": i, "text": f"old{i}", "finish_reason": "stop", "input_token_len": 2, "generate_token_len": 1,
             "error_message": None} for i in (0, 2, 5)]
    done.append({"id": 11, "line": 11, "text": "", "finish_reason": "error", "input_token_len": 0,
                 "generate_token_len": 0, "error_message": "line 11: not valid JSON"})
    with open(dst, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in done) + '{"id": 7, "text": "half a li')  # torn by a kill

    assert cli.main(["infer", "m", "-i", str(src), "-o", str(dst), "--batch-size", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "torn" in err and "duplicate id 3" in err
    text = dst.read_text()
    assert text.endswith("\n") and "half a li" not in text
    out = by_id(read_jsonl(dst))
    assert set(out) == {str(i) for i in range(10)} | {"line:11"}
    assert out["2"]["text"] == "old2" and out["7"]["text"] == "echo:p7"  # streamed pieces joined
    sent = [p for batch in fake_pipe.batches for p in batch]
    assert sent == [f"p{i}" for i in (1, 3, 4, 6, 7, 8, 9)]
    assert all(len(b) <= 3 for b in fake_pipe.batches)

    # A finished job: nothing is run and no model is loaded.
    fake_pipe.batches.clear()
    assert cli.main(["infer", "m", "-i", str(src), "-o", str(dst), "--no-progress"]) == 0
    assert fake_pipe.batches == [] and len(read_jsonl(dst)) == 11


def test_infer_refuses_an_output_another_job_is_writing(tmp_path, fake_pipe, capsys):
    import fcntl

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    dst = tmp_path / "out.jsonl"
    with open(dst, "ab") as other_job:
        fcntl.flock(other_job.fileno(), fcntl.LOCK_EX)
        assert cli.main(["infer", "m", "-i", str(src), "-o", str(dst), "--no-progress"]) == 1
        assert "another process" in capsys.readouterr().err
    assert fake_pipe.batches == [] and dst.read_text() == ""
    assert cli.main(["infer", "m", "-i", str(src), "-o", str(dst), "--no-progress"]) == 0  # lock released
    assert len(read_jsonl(dst)) == 1


def test_infer_repair_output_unit(tmp_path):
    path = tmp_path / "o.jsonl"
    assert batch_infer.repair_output(path) == 0  # no file yet
    path.write_bytes(b'{"id": 1}\n' + b"x" * 200_000)  # a torn line longer than one scan block
    assert batch_infer.repair_output(path) == 200_000 and path.read_bytes() == b'{"id": 1}\n'
    path.write_bytes(b'{"id": 1')  # nothing complete at all
    assert batch_infer.repair_output(path) == 8 and path.read_bytes() == b""


INFER_BIG_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxvlm import cli
    from jaxvlm.config import Response

    def rss_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    class Fake:
        def stream_infer(self, prompts, gen_config=None):
            assert len(prompts) <= 500 and len(gen_config) == len(prompts)
            for i in reversed(range(len(prompts))):
                yield Response(text="ok", generate_token_len=3, input_token_len=9, finish_reason="stop", index=i)
        def close(self):
            pass

    cli._open_pipeline = lambda args: Fake()
    import tqdm.auto  # imported by the progress bar anyway; not part of what is measured
    base = rss_kb("VmRSS")
    code = cli.main(["infer", "fake-model", "-i", sys.argv[1], "-o", sys.argv[2], "--batch-size", "500"])
    print(json.dumps({"code": code, "base_kb": base, "peak_kb": rss_kb("VmHWM")}))
""")


def test_infer_100k_lines_bounded_memory(tmp_path):
    src = tmp_path / "big.jsonl"
    n = 100_000
    with open(src, "w") as f:
        for i in range(n):
            if i % 2:
                row = {"id": i, "prompt": f"question {i} " + "lorem ipsum " * 40, "images": ["photo.png"]}
            else:
                row = {"id": f"r{i}", "messages": [{"role": "user", "content": "dolor sit amet " * 35}],
                       "gen_config": {"max_new_tokens": 4}}
            f.write(json.dumps(row) + "\n")
    size_mb = src.stat().st_size / 2**20
    dst = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-c", INFER_BIG_SCRIPT, str(src), str(dst)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=subprocess_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["code"] == 0
    growth_mb = (stats["peak_kb"] - stats["base_kb"]) / 1024
    # The input is ~50 MiB; holding it whole would cost more than that. The set of ids seen (for duplicates and
    # resuming) is the only thing that grows with the input: ~10 MiB for 100k ids.
    print(f"input {size_mb:.0f} MiB, peak RSS growth {growth_mb:.1f} MiB")
    assert size_mb > 45 and growth_mb < 35, (size_mb, growth_mb)
    ids = set()
    with open(dst) as f:
        for line in f:
            ids.add(json.loads(line)["id"])
    assert ids == {i if i % 2 else f"r{i}" for i in range(n)}
    assert sum(1 for _ in open(dst)) == n


def test_infer_resume_after_sigkill(tmp_path, cache_dir, llava15_hf, use_shared_pipe, picture):
    rows = []
    for i in range(24):
        row = {"id": i if i % 3 else f"req-{i}", "prompt": f"question number {i}: what do you see?"}
        if i % 4 == 1:
            row["images"] = [str(picture)]
        if i % 5 == 2:  # seeded sampling must give the same text when rerun in another batch
            row["gen_config"] = {"do_sample": True, "random_seed": 1000 + i, "temperature": 1.0}
        rows.append(row)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--max-new-tokens", "10", "--session-len", str(SESSION_LEN), "--batch-size", "4", "--no-progress"]

    # Uninterrupted reference run (in process, the shared pipeline).
    ref_path = tmp_path / "reference.jsonl"
    assert cli.main(["infer", str(llava15_hf.path), "-i", str(src), "-o", str(ref_path), *args]) == 0
    reference = by_id(read_jsonl(ref_path))
    assert len(reference) == 24 and all(r["finish_reason"] in ("stop", "length") for r in reference.values())

    dst = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "jaxvlm.cli", "infer", str(llava15_hf.path), "-i", str(src), "-o", str(dst),
               *args]
    env = subprocess_env(cache_dir)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env)
    deadline = time.monotonic() + 240
    try:
        while not (dst.exists() and dst.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no result appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = read_jsonl(dst) if dst.read_text().endswith("\n") else None
    first = dst.read_bytes().count(b"\n")
    assert 1 <= first < 24, f"the kill came too late to test resuming ({first} results written)"
    with open(dst, "ab") as f:  # as if the kill had cut a write short
        f.write(b'{"id": "req-0", "text": "torn')

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "torn last line" in resumed.stderr and "resuming" in resumed.stderr
    final = read_jsonl(dst)
    out = by_id(final)  # asserts that no id is written twice
    assert set(out) == set(reference)
    for key, ref in reference.items():
        assert out[key] == ref, key
    if partial is not None:
        assert final[: len(partial)] == partial  # what the killed run wrote is kept as it was


# ------------------------------------------------------------------------------------------------ chat


class _RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed = ""

    def flush(self):
        self.flushed = self.getvalue()


def test_chat_streams_and_keeps_history(monkeypatch, capsys, picture):
    stdout = _RecordingStdout()
    calls = []

    class StreamingFake:
        closed = False

        def stream_infer(self, messages, gen_config=None):
            calls.append(messages)
            text = messages[-1]["content"][-1]["text"]
            if text == "boom":
                yield Response(text="", generate_token_len=0, input_token_len=0, finish_reason="error",
                               error_message="the prompt is too long")
                return
            pieces = ["Hel", "lo ", text]
            for n, piece in enumerate(pieces):
                if n:  # the previous piece is on the screen before the next one is generated
                    assert stdout.flushed.endswith(pieces[n - 1])
                last = n == len(pieces) - 1
                yield Response(text=piece, generate_token_len=n + 1, input_token_len=5,
                               finish_reason="stop" if last else None)

        def close(self):
            StreamingFake.closed = True

    monkeypatch.setattr(cli, "_open_pipeline", lambda args: StreamingFake())
    lines = ["/image /no/such/picture.png", f"/image {picture}", "first", "boom", "second", "/reset",
             "//slash", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["chat", "m", "--gen-config", '{"max_new_tokens": 7}']) == 0
    err = capsys.readouterr().err
    assert "cannot load image" in err and "/no/such/picture.png" in err and "too long" in err
    assert StreamingFake.closed
    assert stdout.getvalue() == ("assistant> Hello first\nassistant> \nassistant> Hello second\n"
                                 "assistant> Hello /slash\n")
    assert len(calls) == 4
    first_turn = calls[0][0]["content"]
    assert [p["type"] for p in first_turn] == ["image", "text"] and isinstance(first_turn[0]["image"], Image.Image)
    # the failed turn is dropped; the next one sees the first turn and its answer, with no image pending
    assert [m["role"] for m in calls[2]] == ["user", "assistant", "user"]
    assert calls[2][1]["content"] == "Hello first" and [p["type"] for p in calls[2][2]["content"]] == ["text"]
    assert len(calls[3]) == 1  # after /reset
