"""Requests, sequences and the scheduler that gives them cache slots.

A request waits until a slot is free, is prefilled together with others (up to the prefill token budget), then
decodes one token per step until a stop rule ends it and its slot returns to the pool. Requests that cannot
fit are refused alone, before they take a slot. With prefix caching, a request whose prompt starts like content a
slot holds (`prefix_cache.py`) is prefilled from there on, in a group of such requests.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
from collections import deque

import jax
import numpy as np

from jaxvlm.config import GenerationConfig
from jaxvlm.image_processing import normalize_tiles
from jaxvlm.prefix_cache import PrefixIndex, PromptKeys, prompt_keys, usable


@dataclasses.dataclass
class ImageInput:
    """One image of a prompt, ready for the vision tower: uint8 tiles with the table that normalizes them (from
    the processor; the gather runs on the device), or float32 pixels already normalized (value_table None)."""

    tiles: np.ndarray | jax.Array  # uint8 [n, S, S, C] (host or device) with a value_table, else f32 [n, C, S, S]
    layout: np.ndarray  # i32 [k]: rows of this image's features (tiles * tokens_per_tile, then newline)
    start: int  # the position in the prompt where its k feature tokens begin
    value_table: np.ndarray | None = None  # f32 [C, 256]: the normalized value of each uint8 in each channel
    source: np.ndarray | None = None  # device tiles: the host image they were made from, which names them (prefix
    # caching) without reading them back from the device

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def pixel_values(self) -> np.ndarray:
        """f32 [n, C, S, S] normalized pixels, as transformers' processor gives them."""
        return self.tiles if self.value_table is None else normalize_tiles(self.tiles, self.value_table)


@dataclasses.dataclass
class EngineRequest:
    index: int
    token_ids: np.ndarray  # i32 [L]; image positions hold any id (their embeddings are replaced)
    images: list[ImageInput]
    gen_config: GenerationConfig
    stop_ids: frozenset[int] = frozenset()  # end generation, not part of the output
    stop_strings: tuple[str, ...] = ()  # multi-token stop words, matched on the decoded text
    bad_ids: frozenset[int] = frozenset()  # never generated
    error: str | None = None  # failed before reaching the engine (bad image, template error, ...)
    prefix: PromptKeys | None = None  # its content's block keys, for prefix caching (made where missing)


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclasses.dataclass(eq=False)
class Sequence:
    request: EngineRequest
    max_new_tokens: int
    truncated_by_session: bool  # max_new_tokens was cut to fit session_len
    status: Status = Status.WAITING
    slot: int = -1
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    decode_dispatched: int = 0  # decode steps sent to the device for this sequence
    cached: int = 0  # prompt positions taken from the cache (prefix caching) instead of prefilled
    source: int = -1  # the slot they are copied from
    hit: tuple[int, int, int] | None = None  # (index version, cached, source) of the last lookup while waiting
    finish_reason: str | None = None
    error_message: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.token_ids)

    def images_after(self, cached: int) -> list[ImageInput]:
        """The images with a feature at or past position `cached` (the others lie wholly in a cached prefix, so
        the vision tower need not see them)."""
        return [im for im in self.request.images if im.start + len(im.layout) > cached]


# A continuation row gathers its whole context (cached prefix + chunk) to copy and attend over, so a group's rows x
# context positions stay within this many token budgets. Unbounded, an H200 run's group of 128 rows of ~700
# positions asked XLA for 31 GiB of temporaries, past the memory the cache leaves free.
CONTEXT_BUDGETS = 2


class Scheduler:
    def __init__(self, num_slots: int, session_len: int, max_prefill_tokens: int, max_prefill_tiles: int | None,
                 prefix: PrefixIndex | None = None):
        self.session_len = session_len
        self.prefix = prefix  # None: no prefix caching
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_tiles = max_prefill_tiles
        # A min-heap: the lowest free slot goes first, so that running sequences stay packed at the low slots and
        # a decode step computes only the rows up to the highest one (`Buckets.decode_rows`).
        self.free_slots = list(range(num_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def add(self, request: EngineRequest) -> Sequence:
        """Queues a request, or returns it already finished when it cannot run at all."""
        g = request.gen_config
        room = self.session_len - len(request.token_ids)
        wanted = room if g.max_new_tokens is None else g.max_new_tokens
        seq = Sequence(request, max_new_tokens=max(0, min(wanted, room)), truncated_by_session=wanted > room)
        if request.error is not None:
            self.finish(seq, "error", request.error)
        elif room < 0:
            self.finish(seq, "error", f"the prompt has {len(request.token_ids)} tokens, more than session_len "
                                      f"{self.session_len}; raise EngineConfig(session_len=...) or shorten it")
        elif seq.max_new_tokens == 0:
            self.finish(seq, "length")
        else:
            if self.prefix is not None and request.prefix is None:
                request.prefix = prompt_keys(request.token_ids, request.images)
            self.waiting.append(seq)
        return seq

    def _hit(self, seq: Sequence, length_bucket) -> tuple[int, int]:
        """(cached positions to use, the slot holding them) for a waiting sequence, as the cache is now. Kept on
        the sequence until the index changes: the engine asks for the next group once per request it pulls."""
        if self.prefix is None:
            return 0, -1
        if seq.hit is None or seq.hit[0] != self.prefix.version:
            matched, slot = self.prefix.lookup(seq.request.prefix.keys)
            cached = usable(matched, seq.prompt_len, self.session_len, length_bucket)
            seq.hit = (self.prefix.version, cached, slot if cached else -1)
        return seq.hit[1:]

    def group_size(self, length_bucket) -> int:
        """How many waiting sequences (FIFO) the next prefill takes: as many as fit its token budget (rows padded
        to a power of two, at the longest chunk's bucket), its vision batch and the free slots. The first one
        always goes (a prompt over the budget runs alone), unless no slot is free. A group is all whole prompts or
        all continuations of cached prefixes (one program each), and a continuation's chunk, padded to the
        group's length, must still fit its slot, and the group's contexts fit `CONTEXT_BUDGETS`."""
        longest = tiles = n = furthest = 0
        kind = None
        for seq in itertools.islice(self.waiting, len(self.free_slots)):
            cached, _ = self._hit(seq, length_bucket)
            if kind is None:
                kind = cached > 0
            longest = max(longest, seq.prompt_len - cached)
            furthest = max(furthest, cached)
            rows = 1 << n.bit_length()  # prefill rows are padded to a power of two
            tiles += sum(im.num_tiles for im in seq.images_after(cached))
            too_many_tiles = self.max_prefill_tiles is not None and tiles > self.max_prefill_tiles
            context = furthest + length_bucket(longest)
            if n and ((cached > 0) != kind or length_bucket(longest) * rows > self.max_prefill_tokens
                      or too_many_tiles or context > self.session_len
                      or kind and context * rows > CONTEXT_BUDGETS * self.max_prefill_tokens):
                break
            n += 1
        return n

    def admit(self, length_bucket) -> list[Sequence]:
        """Takes the next prefill group (`group_size`) from the waiting sequences into free slots. Cached
        prefixes are found before any slot is handed out (the prefill copies them before it writes)."""
        group = [self.waiting.popleft() for _ in range(self.group_size(length_bucket))]
        for seq in group:
            seq.cached, seq.source = self._hit(seq, length_bucket)
        for seq in group:
            seq.slot, seq.status = heapq.heappop(self.free_slots), Status.RUNNING
            self.running[seq.slot] = seq
            if self.prefix is not None:
                self.prefix.hold(seq.slot, seq.request.prefix.keys)
                self.prefix.reused_tokens += seq.cached
        return group

    def finish(self, seq: Sequence, reason: str, message: str | None = None) -> None:
        if seq.status == Status.RUNNING:
            del self.running[seq.slot]
            heapq.heappush(self.free_slots, seq.slot)
            if self.prefix is not None:
                # The cache holds k/v for every output token but the last (no step has read that one back).
                self.prefix.hold(seq.slot, seq.request.prefix.extended(seq.output_ids[:-1]))
        seq.status, seq.finish_reason, seq.error_message = Status.FINISHED, reason, message

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
