"""Resumable batch inference over JSONL, the job behind ``jaxvlm infer``.

Each input line is one request: {"id": ..., "prompt": text[, "images": [paths or URLs]]} or {"id": ...,
"messages": [OpenAI-style messages]}, with an optional "gen_config" over the command line's. Each id gets one
result line, appended when it finishes (one write() per line, fsync'ed after each batch and every few seconds).
A line that cannot run (not JSON, no usable id, a bad prompt or gen_config) gets an error record and costs the
others nothing. Rerunning the same command resumes: a torn last line is dropped, ids already in the output are
skipped, and the rest run. Duplicate ids run once (the first line wins).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["Job", "Stats", "read_done", "repair_output", "run"]

_NAME = "jaxvlm infer"  # how messages start
# A batch also ends once its input lines reach this many bytes, so inline (base64) images cannot make a batch
# hold gigabytes.
MAX_BATCH_BYTES = 64 * 2**20
FSYNC_EVERY_S = 2.0  # results are fsync'ed at least this often (and after every batch)


# ------------------------------------------------------------------------------------------------ input lines


@dataclass
class _Request:
    id: Any
    prompt: Any  # a pipeline prompt: str, (text, [images]) or a list of message dicts
    gen_config: Any  # GenerationConfig
    size: int  # bytes of its input line


@dataclass
class _Failed:
    record: dict  # a complete error record for the output


def _id_key(value: Any) -> str:
    """The id's canonical JSON text: 1, 1.0 and "1" are three different ids."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _valid_id(value: Any) -> bool:
    """Ids are JSON strings or numbers (bool is an int in Python, but not an id)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _error_record(id_value: Any, message: str, line: int | None = None) -> dict:
    record = {"id": id_value, "text": "", "finish_reason": "error", "input_token_len": 0,
              "generate_token_len": 0, "error_message": message}
    if line is not None:
        record["line"] = line  # the id is a line number: say so, so it cannot be mistaken for a request id
    return record


def _read_line(raw: bytes, line: int) -> tuple[dict, Any] | _Failed | None:
    """(the JSON object, its id) of one input line; an error record when it has no usable id; None if blank."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        return _Failed(_error_record(line, f"line {line}: not valid JSON: {e}", line))
    if not isinstance(obj, dict):
        return _Failed(_error_record(line, f"line {line}: expected a JSON object, got {type(obj).__name__}",
                                     line))
    if "id" not in obj or not _valid_id(obj["id"]):
        what = "has no \"id\"" if "id" not in obj else f"has an invalid id {obj['id']!r} (a string or a number)"
        return _Failed(_error_record(line, f"line {line}: the request {what}", line))
    return obj, obj["id"]


def _make_request(obj: dict, rid: Any, line: int, size: int, base_gen: dict) -> _Request | _Failed:
    """The pipeline request of a parsed line, or its error record (bad prompt or gen_config)."""
    try:
        prompt = _prompt_of(obj)
        gen = _request_gen_config(obj.get("gen_config"), base_gen)
    except ValueError as e:
        return _Failed(_error_record(rid, f"line {line}: {e}"))
    return _Request(rid, prompt, gen, size)


def _prompt_of(obj: dict) -> Any:
    from jaxvlm.prompts import normalize_prompt

    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages == has_prompt:
        raise ValueError('give exactly one of "messages" (OpenAI-style messages) or "prompt" (text, with '
                         'optional "images")')
    if has_messages:
        prompt = obj["messages"]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
        if "images" in obj:
            raise ValueError('"images" goes with "prompt"; with "messages", put images in the content parts')
    else:
        text, images = obj["prompt"], obj.get("images")
        if not isinstance(text, str):
            raise ValueError(f'"prompt" must be a string, got {type(text).__name__}')
        if images is None:
            images = []
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise ValueError('"images" must be a list of image paths or URLs')
        prompt = (text, images) if images else text
    normalize_prompt(prompt)  # a malformed prompt fails here, with its line, rather than in the engine
    return prompt


def _request_gen_config(fields: Any, base: dict):
    from jaxvlm.config import GenerationConfig

    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise ValueError(f'"gen_config" must be a JSON object, got {type(fields).__name__}')
    try:
        return GenerationConfig.from_dict({**base, **fields})
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad gen_config: {e}") from None


# ------------------------------------------------------------------------------------------------ output file


def repair_output(path: Path) -> int:
    """Drops a torn last line (a write cut short by a crash or SIGKILL); returns the bytes removed."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back block by block to the last newline; everything after it is the torn line.
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            at = block.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def read_done(path: Path) -> tuple[set[str], set[int], int]:
    """(ids already in the output, line numbers of id-less error records, unreadable lines), streamed."""
    keys: set[str] = set()
    lines: set[int] = set()
    bad = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return keys, lines, bad
    with f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if isinstance(record.get("line"), int):
                    lines.add(record["line"])
                else:
                    keys.add(_id_key(record["id"]))
            except (ValueError, AttributeError, KeyError):
                bad += 1
    return keys, lines, bad


def _lock(fd: int, path: Path) -> None:
    """Two jobs appending to one output would each run the ids the other has not written yet: refuse that.

    The lock is advisory and dies with the process, so a killed job never blocks its rerun.
    """
    try:
        import fcntl
    except ImportError:  # not on POSIX: no advisory locks to take
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"{path} is being written by another process (a jaxvlm infer still running?)") from None


class _ResultWriter:
    """Appends one complete line per record with a single write(); fsyncs after each batch and every few s.

    A process killed between writes leaves only complete lines; one killed inside a write (or a full disk)
    may leave a torn last line, which `repair_output` drops on the next run.
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.last_sync = time.monotonic()
        self.unsynced = False

    def write(self, record: dict) -> None:
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in decoded text: escape it rather than fail
            data = (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.unsynced = True
        if time.monotonic() - self.last_sync > FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        if self.unsynced:
            os.fsync(self.fd)
            self.unsynced = False
        self.last_sync = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self.fd)


# ------------------------------------------------------------------------------------------------ progress


class _Progress:
    """Lines handled out of the input's, with this run's request and generated-token rates."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = None
        self.started = time.perf_counter()
        self.requests = self.tokens = 0
        if enabled:
            from tqdm.auto import tqdm

            # tqdm's own rate would count skipped and failed lines too; the postfix carries the real rates.
            fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} lines [{elapsed}<{remaining}{postfix}]"
                   if total else "{desc}: {n_fmt} lines [{elapsed}{postfix}]")
            self.bar = tqdm(total=total, desc="infer", file=sys.stderr, dynamic_ncols=True, bar_format=fmt)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def restart_clock(self) -> None:
        """Rates count from here (after the model has loaded and before the first batch runs)."""
        self.started = time.perf_counter()
        self.requests = self.tokens = 0

    def line(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def result(self, generated: int) -> None:
        self.requests += 1
        self.tokens += generated
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.requests / elapsed:.2f} req/s, {self.tokens / elapsed:.1f} tok/s",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class Job:
    """What a run takes from the command line."""

    model: str  # named in messages
    open_pipeline: Callable[[], Any]  # called once, when the first request needs the model
    base_gen: dict  # GenerationConfig fields; a line's own "gen_config" goes on top
    batch_size: int  # requests per engine call (a batch also ends at MAX_BATCH_BYTES of input)
    progress: bool  # a progress bar on stderr


@dataclass
class Stats:
    results: int = 0
    errors: int = 0
    resumed: int = 0
    duplicates: int = 0


class _InferJob:
    """One run of a Job: reads the lines, batches the requests, writes each result as it finishes."""

    def __init__(self, job: Job, writer: _ResultWriter, progress: _Progress, done_keys: set[str],
                 done_lines: set[int]):
        self.job = job
        self.writer = writer
        self.progress = progress
        self.done_keys = done_keys  # ids in the output before this run
        self.done_lines = done_lines
        self.seen: set[str] = set()  # ids met in the input during this run (the first one wins)
        self.stats = Stats()
        self.pipe = None

    def _pipeline(self):
        if self.pipe is None:  # loaded on the first request that needs it: a finished job loads nothing
            self.progress.write(f"{_NAME}: loading {self.job.model} ...")
            self.pipe = self.job.open_pipeline()
            self.progress.restart_clock()
        return self.pipe

    def run(self, lines: Iterator[bytes]) -> None:
        base = self.job.base_gen
        batch: list[_Request] = []
        batch_bytes = 0
        for number, raw in enumerate(lines, 1):
            head = _read_line(raw, number)
            if head is None:  # a blank line
                self.progress.line()
                continue
            if isinstance(head, _Failed):  # no usable id: reported under its line number, once
                if number in self.done_lines:
                    self.stats.resumed += 1
                    self.progress.line()
                else:
                    self._error(head.record)
                continue
            obj, rid = head
            key = _id_key(rid)
            if self._skip(key, number):  # before the prompt is checked: resuming skips done lines fast
                self.progress.line()
                continue
            item = _make_request(obj, rid, number, len(raw), base)
            if isinstance(item, _Failed):
                self._error(item.record)
                continue
            batch.append(item)
            batch_bytes += item.size
            if len(batch) >= self.job.batch_size or batch_bytes >= MAX_BATCH_BYTES:
                self._run_batch(batch)
                batch, batch_bytes = [], 0
        if batch:
            self._run_batch(batch)

    def _skip(self, key: str, line: int) -> bool:
        """Whether this id is already in the output, or was met earlier in the input (the first one wins)."""
        if key in self.done_keys:
            self.stats.resumed += 1
            return True
        if key in self.seen:
            self.stats.duplicates += 1
            if self.stats.duplicates <= 10:
                self.progress.write(f"{_NAME}: line {line}: duplicate id {key} skipped (the first line "
                                    "with this id is the one run)")
            return True
        self.seen.add(key)
        return False

    def _error(self, record: dict) -> None:
        self.writer.write(record)
        self.stats.errors += 1
        self.progress.line()

    def _run_batch(self, batch: list[_Request]) -> None:
        pipe = self._pipeline()
        partial: dict[int, Any] = {}
        finished: set[int] = set()
        # stream_infer hands each request's final piece over as soon as it finishes, so results are written
        # in finishing order while the rest of the batch keeps the engine busy.
        for delta in pipe.stream_infer([r.prompt for r in batch], gen_config=[r.gen_config for r in batch]):
            index = delta.index
            so_far = partial.get(index)
            if so_far is None:
                partial[index] = so_far = delta
            else:
                so_far.extend(delta)
            if so_far.finish_reason is not None:
                del partial[index]
                finished.add(index)
                self._result(batch[index], so_far)
        for index, request in enumerate(batch):
            if index not in finished:  # should not happen; never leave an id without a line
                self._result_record(request, _error_record(request.id, "the engine returned no result"))
        self.writer.sync()

    def _result(self, request: _Request, response: Any) -> None:
        record = {"id": request.id, "text": response.text, "finish_reason": response.finish_reason,
                  "input_token_len": response.input_token_len, "generate_token_len": response.generate_token_len,
                  "error_message": response.error_message}
        self._result_record(request, record)

    def _result_record(self, request: _Request, record: dict) -> None:
        self.writer.write(record)
        if record["finish_reason"] == "error":
            self.stats.errors += 1
        else:
            self.stats.results += 1
        self.progress.result(record["generate_token_len"] or 0)


def _resume_state(output: Path) -> tuple[set[str], set[int]]:
    """Repairs the output after a crash and reads what it already holds."""
    torn = repair_output(output)
    if torn:
        print(f"{_NAME}: dropped a torn last line ({torn} bytes) from {output}", file=sys.stderr)
    done_keys, done_lines, unreadable = read_done(output)
    if unreadable:
        print(f"{_NAME}: {unreadable} unreadable line(s) in {output} ignored; their ids are run again",
              file=sys.stderr)
    if done_keys or done_lines:
        print(f"{_NAME}: resuming: {len(done_keys) + len(done_lines)} result(s) already in {output}",
              file=sys.stderr)
    return done_keys, done_lines


def run(job: Job, output: Path, source: BinaryIO, total: int | None) -> Stats | None:
    """Runs the lines of `source` (`total` of them, if known) into `output`, resuming what it holds; returns
    the counts, or None when interrupted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = _ResultWriter(output)  # locks the output first: nothing else may append while it is repaired
    progress = runner = None
    try:
        done_keys, done_lines = _resume_state(output)
        progress = _Progress(total, enabled=job.progress)
        runner = _InferJob(job, writer, progress, done_keys, done_lines)
        runner.run(iter(source))
    except KeyboardInterrupt:
        print(f"\n{_NAME}: interrupted; finished results are in {output}: rerun the same command to "
              "resume", file=sys.stderr)
        return None
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        if runner is not None and runner.pipe is not None:
            runner.pipe.close()
    return runner.stats
