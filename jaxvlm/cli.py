"""The ``jaxvlm`` command: ``demo``, ``infer`` (resumable batch inference over JSONL), ``chat`` and ``convert``.

Exit codes: 0 success, 1 failure (model not loadable, I/O error, ...), 2 usage error, 130 interrupted.
Failures are reported in one line; set JAXVLM_DEBUG=1 to get the traceback instead. Heavy imports (jax, the
pipeline) happen only once a command needs a model, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["build_parser", "main"]

PROG = "jaxvlm"
DEFAULT_BATCH_SIZE = 1024
# A batch also ends once its input lines reach this many bytes, so inline (base64) images cannot make a batch
# hold gigabytes.
MAX_BATCH_BYTES = 64 * 2**20
FSYNC_EVERY_S = 2.0  # results are fsync'ed at least this often (and after every batch)
DEMO_PROMPT = "describe this image"


class UsageError(Exception):
    """A bad command line; reported like argparse's own errors (exit code 2)."""


# ================================================================================================ parser


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, with a message that says what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"temperature\": 0.7}'")
    return value


def _template_names() -> list[str]:
    from jaxvlm.chat_template import BUILTIN_TEMPLATES

    return sorted([*BUILTIN_TEMPLATES, "hf"])


def _paragraphs(*texts: str) -> str:
    """Epilog text for RawDescriptionHelpFormatter: each paragraph wrapped, a blank line between them."""
    import textwrap

    return "\n\n".join(textwrap.fill(t, width=88) for t in texts)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                   help="tensor-parallel degree: shard the model over N devices (default: 1)")
    g.add_argument("--dp", type=_positive_int, default=1, metavar="N",
                   help="data-parallel replicas of the model (default: 1)")
    g.add_argument("--session-len", type=_positive_int, default=None, metavar="N",
                   help="most tokens of one conversation, prompt and answer together (default: the model's "
                        "max_position_embeddings)")
    g.add_argument("--max-batch-size", type=_positive_int, default=None, metavar="N",
                   help="most sequences decoded at once (default: picked from free device memory)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (default: auto, the checkpoint's own)")
    g.add_argument("--quant-policy", type=int, choices=[0, 8], default=0,
                   help="KV cache: 0 keeps the compute dtype, 8 stores int8 (twice the sequences fit; "
                        "LMDeploy's quant_policy) (default: 0)")
    g.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV cache of a prompt's start that an earlier prompt computed (the same image "
                        "asked about again, the earlier turns of a chat) instead of prefilling it again")
    g.add_argument("--chat-template", choices=_template_names(), default=None, metavar="NAME",
                   help="chat template by name: %(choices)s (default: matched from the model path, else the "
                        "checkpoint's own)")


def _add_generation_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=None, metavar="N",
                   help=f"most tokens generated per {what} (default: 512, as GenerationConfig)")
    g.add_argument("--gen-config", type=_json_object, default=None, metavar="JSON",
                   help="GenerationConfig fields as a JSON object, e.g. "
                        "'{\"do_sample\": true, \"temperature\": 0.7, \"random_seed\": 1}'")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``jaxvlm`` command (sub-commands demo, infer, chat, convert)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Offline inference of LLaVA vision-language models (LLaVA-1.5, LLaVA-NeXT) in JAX.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="run a tiny random-weight model on an image (checks the installation)",
        description="Builds (once, then cached) a tiny LLaVA-1.5 model with RANDOM weights and asks it to "
                    f"'{DEMO_PROMPT}'. The answer is meaningless text; the point is to see the whole pipeline "
                    "run on this machine without downloading anything.")
    demo.add_argument("image", nargs="?", default=None,
                      help="an image path or URL (default: a generated gradient picture)")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=24, metavar="N",
                      help="tokens to generate (default: 24)")
    demo.add_argument("--model-dir", default=None, metavar="DIR",
                      help="where to build the demo model (default: $JAXVLM_CACHE_DIR/demo-model or "
                           "~/.cache/jaxvlm/demo-model)")

    infer = sub.add_parser(
        "infer", help="batch inference from a JSONL file (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Offline batch inference. Each input line is one request:\n"
                    '  {"id": ..., "messages": [OpenAI-style messages]}\n'
                    '  {"id": ..., "prompt": "text", "images": ["path-or-url", ...]}\n'
                    'optionally with "gen_config": {GenerationConfig fields}. Each output line is\n'
                    '  {"id", "text", "finish_reason", "input_token_len", "generate_token_len", "error_message"}\n'
                    "appended as soon as its request finishes (so in finishing order), with the id as given.",
        epilog=_paragraphs(
            "Resuming: rerun the same command after an interruption (Ctrl-C, SIGKILL, a crash). The ids "
            "already in the output are skipped and a half-written last line is dropped, so every input id ends "
            "up in the output exactly once.",
            "Errors: a bad line (invalid JSON, no id, bad prompt or gen_config) or a failed request gets an "
            'output line with "finish_reason": "error" and the job goes on; a line without a usable id is '
            'reported under its line number ("id": N, "line": N). To retry failed requests, delete their '
            "output lines and rerun.",
            "Duplicate ids: the first line with an id is run; later lines with the same id are skipped with a "
            "warning.",
            "Relative image paths are resolved against the current directory."))
    infer.add_argument("model", help="model directory or hub id")
    infer.add_argument("--input", "-i", required=True, metavar="FILE", help="requests, JSON Lines ('-': stdin)")
    infer.add_argument("--output", "-o", required=True, metavar="FILE",
                       help="results, JSON Lines; appended to when it exists (resume)")
    infer.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help="requests handed to the engine per batch (default: %(default)s). The engine "
                            "keeps its slots full within a batch and drains at the end of one, so larger is "
                            "faster; results are written as each request finishes either way")
    infer.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_generation_options(infer, "request; a line's own gen_config overrides it")
    _add_engine_options(infer)

    chat = sub.add_parser(
        "chat", help="interactive multi-turn chat in the terminal",
        description="Multi-turn chat; each line of input is one user message, the answer streams as it is "
                    "generated. Commands: /image PATH attaches an image to the next message, /reset starts "
                    "a new conversation, /exit (or end of input) quits, /help. Start a message with '//' to "
                    "send text that begins with '/'. Works with piped input too.")
    chat.add_argument("model", help="model directory or hub id")
    _add_generation_options(chat, "answer")
    _add_engine_options(chat)

    convert = sub.add_parser(
        "convert", help="convert a llava-hf or original LLaVA checkpoint (same as jaxvlm-convert)",
        add_help=False, description="Run 'jaxvlm convert --help' for the converter's options.")
    # Listed for the overview only: main() hands everything after "convert" to the converter unparsed.
    convert.add_argument("args", nargs=argparse.REMAINDER, help="SRC DST [options], see jaxvlm-convert --help")
    return parser


# ================================================================================================ main


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxvlm`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        # Everything after "convert" belongs to the converter, options and --help included (argparse would
        # claim option-like arguments of a REMAINDER for itself).
        return _cmd_convert(argparse.Namespace(command="convert", args=argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return _exit_code(e.code)
    commands = {"demo": _cmd_demo, "infer": _cmd_infer, "chat": _cmd_chat, "convert": _cmd_convert}
    try:
        return commands[args.command](args)
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line reports failures, it does not dump tracebacks
        if os.environ.get("JAXVLM_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message") means failure with that message
    return 1


def _open_pipeline(args: argparse.Namespace):
    """The pipeline for a command's model and engine options (tests replace this to stub the model side)."""
    from jaxvlm.api import pipeline
    from jaxvlm.chat_template import ChatTemplateConfig
    from jaxvlm.config import EngineConfig

    engine = EngineConfig(tp=args.tp, dp=args.dp, session_len=args.session_len,
                          max_batch_size=args.max_batch_size, dtype=args.dtype, quant_policy=args.quant_policy,
                          enable_prefix_caching=args.enable_prefix_caching)
    template = ChatTemplateConfig(model_name=args.chat_template) if args.chat_template else None
    return pipeline(args.model, backend_config=engine, chat_template_config=template)


def _base_gen_fields(args: argparse.Namespace) -> dict:
    """GenerationConfig fields given on the command line (--gen-config, then --max-new-tokens on top)."""
    fields = dict(args.gen_config or {})
    if args.max_new_tokens is not None:
        fields["max_new_tokens"] = args.max_new_tokens
    return fields


def _gen_config(fields: dict):
    from jaxvlm.config import GenerationConfig

    try:
        return GenerationConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--gen-config: {e}") from None


# ================================================================================================ demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from jaxvlm.config import EngineConfig, GenerationConfig
    from jaxvlm.demo import make_demo_model
    from jaxvlm.vl import load_image

    if args.image is None:
        image, described = _gradient_image(), "a generated 64x48 gradient picture"
    else:
        image, described = load_image(args.image), args.image  # a bad image fails before any model work
    started = time.perf_counter()
    model_dir = make_demo_model(args.model_dir)
    print(f"{PROG} demo: tiny LLaVA-1.5 model with RANDOM weights at {model_dir}", flush=True)

    from jaxvlm.api import pipeline

    with pipeline(str(model_dir), backend_config=EngineConfig()) as pipe:
        loaded = time.perf_counter()
        response = pipe((DEMO_PROMPT, image), gen_config=GenerationConfig(max_new_tokens=args.max_new_tokens))
    done = time.perf_counter()
    if response.finish_reason == "error":
        print(f"{PROG} demo: the request failed: {response.error_message}", file=sys.stderr)
        return 1
    print(f"image:  {described}")
    print(f"prompt: {DEMO_PROMPT}")
    print(f"answer: {response.text}")
    print(f"        ({response.input_token_len} prompt tokens, {response.generate_token_len} generated, "
          f"finish_reason={response.finish_reason}; load {loaded - started:.1f} s, generate "
          f"{done - loaded:.1f} s including compilation)")
    print()
    print("The weights are random, so the answer above is meaningless: this demo only shows that jaxvlm runs\n"
          "on this machine. To run a real model (downloaded from the Hugging Face hub), try:\n"
          f"  {PROG} chat llava-hf/llava-1.5-7b-hf\n"
          "  python -c \"from jaxvlm import pipeline; pipe = pipeline('llava-hf/llava-1.5-7b-hf'); "
          "print(pipe(('describe this image', 'photo.jpg')).text)\"")
    return 0


def _gradient_image():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 255 // 63, y * 255 // 47, (63 - x) * 255 // 63], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)  # uint8 height x width x 3: RGB


# ================================================================================================ convert


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        from convert.cli import main as convert_main
    except ImportError as e:
        print(f"{PROG} convert: the converter is not available ({e})", file=sys.stderr)
        return 1
    import inspect

    # The converter names itself in its messages; tell it how it was invoked when it lets us.
    extra = {"prog": f"{PROG} convert"} if "prog" in inspect.signature(convert_main).parameters else {}
    try:
        code = convert_main(list(args.args), **extra)
    except SystemExit as e:
        return _exit_code(e.code)
    return _exit_code(code)


# ================================================================================================ infer


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


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


# ------------------------------------------------------------------------------------------------ the job


@dataclass
class _Stats:
    results: int = 0
    errors: int = 0
    resumed: int = 0
    duplicates: int = 0


class _InferJob:
    def __init__(self, args: argparse.Namespace, writer: _ResultWriter, progress: _Progress,
                 done_keys: set[str], done_lines: set[int]):
        self.args = args
        self.writer = writer
        self.progress = progress
        self.done_keys = done_keys  # ids in the output before this run
        self.done_lines = done_lines
        self.seen: set[str] = set()  # ids met in the input during this run (the first one wins)
        self.stats = _Stats()
        self.pipe = None

    def _pipeline(self):
        if self.pipe is None:  # loaded on the first request that needs it: a finished job loads nothing
            self.progress.write(f"{PROG} infer: loading {self.args.model} ...")
            self.pipe = _open_pipeline(self.args)
            self.progress.restart_clock()
        return self.pipe

    def run(self, lines: Iterator[bytes]) -> None:
        base = _base_gen_fields(self.args)
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
            if len(batch) >= self.args.batch_size or batch_bytes >= MAX_BATCH_BYTES:
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
                self.progress.write(f"{PROG} infer: line {line}: duplicate id {key} skipped (the first line "
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


def _input_lines(source: str) -> tuple[BinaryIO, int | None]:
    if source == "-":
        return sys.stdin.buffer, None
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--input {source}: no such file")
    return open(path, "rb"), _count_lines(path)


def _resume_state(output: Path) -> tuple[set[str], set[int]]:
    """Repairs the output after a crash and reads what it already holds."""
    torn = repair_output(output)
    if torn:
        print(f"{PROG} infer: dropped a torn last line ({torn} bytes) from {output}", file=sys.stderr)
    done_keys, done_lines, unreadable = read_done(output)
    if unreadable:
        print(f"{PROG} infer: {unreadable} unreadable line(s) in {output} ignored; their ids are run again",
              file=sys.stderr)
    if done_keys or done_lines:
        print(f"{PROG} infer: resuming: {len(done_keys) + len(done_lines)} result(s) already in {output}",
              file=sys.stderr)
    return done_keys, done_lines


def _cmd_infer(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.input != "-" and output.exists() and Path(args.input).exists() \
            and os.path.samefile(args.input, output):
        raise UsageError("--input and --output are the same file")
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory")
    _gen_config(_base_gen_fields(args))  # a bad --gen-config is a usage error, before any work
    started = time.perf_counter()
    source, total = _input_lines(args.input)
    try:
        stats = _run_infer(args, output, source, total)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if stats is None:
        return 130
    elapsed = time.perf_counter() - started
    print(f"{PROG} infer: {stats.results} result(s) and {stats.errors} error(s) written to {output} in "
          f"{elapsed:.1f} s; {stats.resumed} already there, {stats.duplicates} duplicate id(s) skipped",
          file=sys.stderr)
    return 0


def _run_infer(args: argparse.Namespace, output: Path, source: BinaryIO, total: int | None) -> _Stats | None:
    """Runs the job; returns its counts, or None when interrupted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = _ResultWriter(output)  # locks the output first: nothing else may append while it is repaired
    progress = None
    job = None
    try:
        done_keys, done_lines = _resume_state(output)
        progress = _Progress(total, enabled=not args.no_progress)
        job = _InferJob(args, writer, progress, done_keys, done_lines)
        job.run(iter(source))
    except KeyboardInterrupt:
        print(f"\n{PROG} infer: interrupted; finished results are in {output}: rerun the same command to "
              "resume", file=sys.stderr)
        return None
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        if job is not None and job.pipe is not None:
            job.pipe.close()
    return job.stats


# ================================================================================================ chat

_CHAT_HELP = ("commands: /image PATH (attach an image to the next message), /reset (new conversation), "
              "/exit (quit), /help; start a message with // to send text beginning with /")


def _cmd_chat(args: argparse.Namespace) -> int:
    from jaxvlm.vl import load_image

    gen = _gen_config(_base_gen_fields(args))
    print(f"{PROG} chat: loading {args.model} ...", file=sys.stderr, flush=True)
    pipe = _open_pipeline(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = []  # the conversation so far, as OpenAI-style messages (images as PIL parts)
    pending: list = []  # images for the next user message
    print(f"{PROG} chat: {_CHAT_HELP}", file=sys.stderr, flush=True)
    try:
        for line in _chat_lines(interactive):
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                command, _, rest = text.partition(" ")
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    messages, pending = [], []
                    print("(new conversation)", file=sys.stderr, flush=True)
                elif command == "/image":
                    source = rest.strip().strip("'\"")
                    if not source:
                        print("usage: /image PATH", file=sys.stderr, flush=True)
                        continue
                    try:
                        pending.append(load_image(source))
                    except Exception as e:  # noqa: BLE001 - tell the user and keep chatting
                        print(f"cannot load image: {e}", file=sys.stderr, flush=True)
                        continue
                    print(f"(image {source} attached to the next message)", file=sys.stderr, flush=True)
                elif command == "/help":
                    print(_CHAT_HELP, file=sys.stderr, flush=True)
                else:
                    print(f"unknown command {command}; {_CHAT_HELP}", file=sys.stderr, flush=True)
                continue
            if text.startswith("//"):
                text = text[1:]
            parts = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": text}]
            turn = messages + [{"role": "user", "content": parts}]
            answer = _stream_answer(pipe, turn, gen)
            if answer is not None:
                messages = turn + [{"role": "assistant", "content": answer}]
                pending = []
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        pipe.close()
    return 0


def _chat_lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:
        pass
    while True:
        try:
            yield input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return


def _stream_answer(pipe, messages: list[dict], gen) -> str | None:
    """Streams one answer to stdout; returns its text, or None when it failed or was interrupted."""
    out = sys.stdout
    out.write("assistant> ")
    out.flush()
    text, final = "", None
    try:
        for delta in pipe.stream_infer(messages, gen_config=gen):
            if delta.text:
                out.write(delta.text)
                out.flush()
                text += delta.text
            if delta.finish_reason is not None:
                final = delta
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        print("(interrupted; this turn is dropped)", file=sys.stderr, flush=True)
        return None
    out.write("\n")
    out.flush()
    if final is None or final.finish_reason == "error":
        reason = final.error_message if final is not None else "no result"
        print(f"error: {reason} (this turn is dropped; /reset starts over)", file=sys.stderr, flush=True)
        return None
    return text


if __name__ == "__main__":
    sys.exit(main())
