"""`pipeline()` and `Pipeline`: LMDeploy's VLM pipeline API on top of the jaxvlm engine (as in lmdeploy/api.py).

Prompts are normalised (`prompts.py`), rendered with a chat template, tokenized and their images loaded and
preprocessed on a thread pool (`processor.py`), then streamed through the engine (`engine.py`), whose token
events become `Response`s here. A request that fails (bad image, too long, ...) comes back as a Response with
finish_reason='error'; the others are unaffected.
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import dataclasses
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxvlm.chat_template import ChatTemplateConfig
from jaxvlm.config import EngineConfig, GenerationConfig, Response, VisionConfig
from jaxvlm.detokenize import IncrementalDetokenizer
from jaxvlm.engine import Engine, Event
from jaxvlm.model_loader import LoadedModel, load
from jaxvlm.prefix_cache import prompt_keys
from jaxvlm.prompts import Conversation, normalize_prompt, split_batch
from jaxvlm.scheduler import EngineRequest
from jaxvlm.vl import FetchPolicy

log = logging.getLogger(__name__)

_LMDEPLOY_PIPELINE_ONLY = {"log_level", "max_log_len", "speculative_config", "model_name", "tokenizer_path"}
# Requests prepared ahead of the engine: enough to keep a couple of prefill groups ready, and no more, since the
# preparing threads contend for the GIL with the engine's dispatches (64 ahead delayed the first prefill of 64
# offline requests by 40 ms and cost 3% of their throughput on an H100 host; benchmarks/offline_probe.py).
_PREFETCH = 16
_PREP_WORKERS = 8  # threads preparing them (images load concurrently)


@dataclasses.dataclass
class Session:
    """A multi-turn chat: pass it back to `Pipeline.chat` to continue (earlier images are kept)."""

    messages: list[dict] = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)
    response: Response | None = None

    @property
    def history(self) -> list[tuple[str, str]]:
        """(user text, assistant text) pairs, like LMDeploy's Session.history."""
        turns, user = [], None
        for m in self.messages:
            if m["role"] == "user":
                user = m["content"]
            elif m["role"] == "assistant" and user is not None:
                turns.append((user, m["content"]))
                user = None
        return turns


class Pipeline:
    def __init__(self, model_path: str, backend_config: EngineConfig | None = None,
                 chat_template_config: ChatTemplateConfig | None = None, vision_config: VisionConfig | None = None,
                 *, fetch_policy: FetchPolicy | None = None, **kwargs: Any):
        unknown = set(kwargs) - _LMDEPLOY_PIPELINE_ONLY
        if unknown:
            raise TypeError(f"pipeline() got unexpected keyword arguments {sorted(unknown)}")
        if kwargs:
            warnings.warn(f"pipeline(): ignoring LMDeploy-only arguments {sorted(kwargs)}", stacklevel=3)
        if backend_config is not None and not isinstance(backend_config, EngineConfig):
            raise TypeError(f"backend_config must be an EngineConfig (TurbomindEngineConfig), got "
                            f"{type(backend_config).__name__}")
        if fetch_policy is not None and not isinstance(fetch_policy, FetchPolicy):
            raise TypeError(f"fetch_policy must be a jaxvlm.vl.FetchPolicy, got {type(fetch_policy).__name__}")
        self.engine_config = backend_config or EngineConfig()
        self.vision_config = vision_config or VisionConfig()
        self.model: LoadedModel = load(model_path, self.engine_config, chat_template_config)
        self.processor = self.model.processor
        self.processor.fetch_policy = fetch_policy  # None: jaxvlm.vl.DEFAULT_FETCH_POLICY, read at each load
        self.engine = Engine(self.model.runner, self.vision_config.max_batch_size, detokenize=self._decode_ids,
                             prefix_caching=self.engine_config.enable_prefix_caching)
        self._closed = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ requests

    def _gen_configs(self, gen_config, n: int) -> list[GenerationConfig]:
        if gen_config is None:
            return [GenerationConfig()] * n
        if isinstance(gen_config, GenerationConfig):
            return [gen_config] * n
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != n:
                raise ValueError(f"gen_config has {len(gen_config)} entries for {n} prompts")
            if not all(isinstance(g, GenerationConfig) for g in gen_config):
                raise TypeError("gen_config entries must be GenerationConfig")
            return list(gen_config)
        raise TypeError(f"gen_config must be a GenerationConfig or a list of them, got {type(gen_config).__name__}")

    def _prepare(self, index: int, conv: Conversation | Exception, gen: GenerationConfig) -> EngineRequest:
        """Everything host-side for one request; any failure becomes that request's error."""
        try:
            if isinstance(conv, Exception):
                raise conv
            request = self.processor.make_request(index, conv, gen)
            if self.engine.prefix is not None:  # hashing the tiles here keeps it off the engine's thread
                request.prefix = prompt_keys(request.token_ids, request.images)
            return request
        except Exception as e:  # noqa: BLE001 - one bad request must not cost the batch
            return EngineRequest(index, np.zeros(0, np.int32), [], gen, error=f"{type(e).__name__}: {e}")

    def _requests(self, items: Iterable[tuple[int, Conversation | Exception, GenerationConfig]],
                  count: int | None = None) -> Iterator[EngineRequest]:
        """Prepares requests on a thread pool (images load concurrently), in order, a bounded window ahead."""
        if count == 1:  # nothing to overlap with: a pool would only add a thread start and a handoff
            yield from itertools.starmap(self._prepare, items)
            return
        with concurrent.futures.ThreadPoolExecutor(_PREP_WORKERS, thread_name_prefix="jaxvlm-prep") as pool:
            window: collections.deque = collections.deque()
            for item in items:
                window.append(pool.submit(self._prepare, *item))
                if len(window) >= _PREFETCH:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _response(self, event: Event, text: str, token_ids: list[int] | None = None) -> Response:
        seq = event.seq
        req = seq.request
        logprobs = None
        if req.gen_config.logprobs:  # a delta (token_ids given) carries its own tokens' logprobs only
            logprobs = list(seq.logprobs) if token_ids is None else seq.logprobs[len(seq.output_ids) - len(token_ids):]
        return Response(
            text=text,
            generate_token_len=len(seq.output_ids),
            input_token_len=len(req.token_ids),
            finish_reason=seq.finish_reason,
            token_ids=list(seq.output_ids) if token_ids is None else token_ids,
            logprobs=logprobs,
            index=req.index,
            error_message=seq.error_message,
        )

    def _final_text(self, event: Event) -> str:
        seq = event.seq
        g = seq.request.gen_config
        text = self._decode_ids(seq.output_ids, g.skip_special_tokens)
        for stop in seq.request.stop_strings:  # a stop string ends the text, as LMDeploy's stop words do
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def _items(self, prompts, gen_config) -> tuple[Iterable, bool, int | None]:
        """(lazy (index, conversation-or-error, gen_config) items, was_batch, count if known).

        A list is a batch; an iterator (e.g. a generator over a huge file) is a batch consumed lazily, so the
        engine's slots stay full without the prompts ever being held at once."""
        if isinstance(prompts, Conversation):
            single_list, was_batch = [prompts], False
        elif isinstance(prompts, collections.abc.Iterator):
            if not (gen_config is None or isinstance(gen_config, GenerationConfig)):
                raise TypeError("with an iterator of prompts, gen_config must be one GenerationConfig")
            single_list, was_batch = prompts, True
        else:
            single_list, was_batch = split_batch(prompts)
        count = len(single_list) if isinstance(single_list, list) else None
        gens = self._gen_configs(gen_config, count) if count is not None else itertools.repeat(
            gen_config or GenerationConfig())
        if count is not None and not was_batch:  # a malformed single prompt raises here, before any work
            # A Conversation passed in is checked (and copied) too.
            return [(0, normalize_prompt(single_list[0]), gens[0])], False, 1

        def items():
            for i, (p, g) in enumerate(zip(single_list, gens)):
                try:
                    yield i, normalize_prompt(p), g
                except ValueError as e:
                    yield i, e, g  # in a batch, a malformed prompt fails alone

        return items(), was_batch, count

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this pipeline is closed")

    # ------------------------------------------------------------------------------------------ public API

    def infer(self, prompts, gen_config=None, use_tqdm: bool = False, **kwargs) -> Response | list[Response]:
        self._check_open()
        items, was_batch, count = self._items(prompts, gen_config)
        results: dict[int, Response] = {}
        bar = _progress(count) if use_tqdm else None
        for event in self.engine.generate(self._requests(items, count)):
            if event.finished:
                results[event.seq.request.index] = self._response(event, self._final_text(event))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        ordered = [results[i] for i in range(len(results))]
        return ordered if was_batch else ordered[0]

    __call__ = infer
    batch_infer = infer

    def stream_infer(self, prompts, gen_config=None, **kwargs) -> Iterator[Response]:
        """Yields Response deltas: `text`/`token_ids` are the new part, `index` names the prompt.

        Text is detokenized incrementally (a few tokens per step). With stop words, the last characters that
        could be the start of one are held back until the next tokens decide."""
        self._check_open()
        items, _, count = self._items(prompts, gen_config)
        streams: dict[int, IncrementalDetokenizer] = {}
        unsent: dict[int, str] = collections.defaultdict(str)  # decoded text held back near a stop word
        shown: dict[int, str] = collections.defaultdict(str)  # text given out so far
        held: dict[int, list[int]] = collections.defaultdict(list)  # tokens whose text is not out yet
        for event in self.engine.generate(self._requests(items, count)):
            seq = event.seq
            idx = seq.request.index
            held[idx] += event.new_ids
            if event.finished:
                final = self._final_text(event)
                text = final[len(shown[idx]):] if final.startswith(shown[idx]) else final
                for state in (streams, unsent, shown):
                    state.pop(idx, None)
            else:
                if idx not in streams:
                    skip = seq.request.gen_config.skip_special_tokens
                    streams[idx] = IncrementalDetokenizer(lambda ids, skip=skip: self._decode_ids(ids, skip))
                unsent[idx] += streams[idx].step(seq.output_ids)
                keep = max((len(w) for w in seq.request.stop_strings), default=1) - 1
                text = unsent[idx][: len(unsent[idx]) - keep]
                if not text:
                    continue
                unsent[idx] = unsent[idx][len(text):]
                shown[idx] += text
            resp = self._response(event, text, token_ids=held.pop(idx))
            if not event.finished:
                resp.finish_reason = None
            yield resp

    def chat(self, prompt, session: Session | None = None, gen_config: GenerationConfig | None = None,
             **kwargs) -> Session:
        """One turn of a conversation; returns the session with `.response` set and the turn recorded."""
        self._check_open()
        session = session or Session()
        turn = normalize_prompt(prompt)
        conv = Conversation(messages=session.messages + turn.messages, images=session.images + turn.images)
        response = self.infer(conv, gen_config)
        if response.finish_reason != "error":
            session.messages = conv.messages + [{"role": "assistant", "content": response.text}]
            session.images = conv.images
        session.response = response
        return session


def pipeline(model_path: str, backend_config: EngineConfig | None = None,
             chat_template_config: ChatTemplateConfig | None = None, vision_config: VisionConfig | None = None,
             *, fetch_policy: FetchPolicy | None = None, **kwargs: Any) -> Pipeline:
    """Loads a LLaVA checkpoint (local dir, hub id or jaxvlm checkpoint) and returns a Pipeline.

    `fetch_policy` (jaxvlm only) limits how prompt images are fetched: allowed domains, private addresses,
    local files, byte and pixel caps; None uses `jaxvlm.vl.DEFAULT_FETCH_POLICY`.
    """
    return Pipeline(model_path, backend_config, chat_template_config, vision_config, fetch_policy=fetch_policy,
                    **kwargs)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="requests", unit="req")
