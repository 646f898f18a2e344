"""The ``jaxvlm`` command: ``demo``, ``infer`` (resumable batch inference over JSONL), ``chat`` and ``convert``.

Exit codes: 0 success, 1 failure (model not loadable, I/O error, ...), 2 usage error, 130 interrupted.
Failures are reported in one line; set JAXVLM_DEBUG=1 to get the traceback instead. Heavy imports (jax, the
pipeline) happen only once a command needs a model, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from jaxvlm import batch_infer

__all__ = ["build_parser", "main"]

PROG = "jaxvlm"
DEFAULT_BATCH_SIZE = 1024
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


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _input_lines(source: str) -> tuple[BinaryIO, int | None]:
    if source == "-":
        return sys.stdin.buffer, None
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--input {source}: no such file")
    return open(path, "rb"), _count_lines(path)


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
    job = batch_infer.Job(args.model, lambda: _open_pipeline(args), _base_gen_fields(args), args.batch_size,
                          progress=not args.no_progress)
    try:
        stats = batch_infer.run(job, output, source, total)
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
