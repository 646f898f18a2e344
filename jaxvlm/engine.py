"""The engine loop: continuous batching over the runner's fixed cache slots.

Each iteration admits waiting requests into free slots (one batched vision call and one batched prefill: of whole
prompts, or, with prefix caching, of what follows the prefixes that slots already hold), then dispatches one
decode step for every running slot. Results are read two dispatches late: while the device runs step n the host
processes step n-2 (stop rules, detokenization), so the host never stalls the device. A slot
that finished is thus decoded up to twice more; those tokens are dropped, and the slot is then released (marked
idle on the device, so decode attention stops reading its cache).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import sampling
from jaxvlm.config import MAX_LOGPROBS
from jaxvlm.detokenize import tail_text
from jaxvlm.modeling import NEWLINE
from jaxvlm.prefix_cache import PrefixIndex
from jaxvlm.runner import ModelRunner, PrefillBatch
from jaxvlm.scheduler import EngineRequest, Scheduler, Sequence, Status

log = logging.getLogger(__name__)


def _slot_params(seq: Sequence) -> sampling.SlotParams:
    r = seq.request
    return sampling.SlotParams.from_generation_config(r.gen_config, stop_ids=sorted(r.stop_ids),
                                                      bad_ids=sorted(r.bad_ids))


def _stack_params(rows: list[sampling.SlotParams], total: int) -> sampling.SlotParams:
    """One SlotParams with a leading batch axis; padding rows repeat row 0 (same seed, same token)."""
    rows = rows + [rows[0]] * (total - len(rows))
    width = {f: max(len(getattr(r, f)) for r in rows) for f in ("bad_ids", "stop_ids")}
    pad = lambda a, w: np.concatenate([a, np.full(w - len(a), -1, np.int32)])
    return sampling.SlotParams(**{
        f.name: np.stack([pad(getattr(r, f.name), width[f.name]) if f.name in width else getattr(r, f.name)
                          for r in rows])
        for f in dataclasses.fields(sampling.SlotParams)
    })


@dataclasses.dataclass
class Event:
    """New tokens of one sequence; `finished` on its last event."""

    seq: Sequence
    new_ids: list[int]
    finished: bool


class Engine:
    def __init__(self, runner: ModelRunner, max_vision_tiles: int, detokenize=None, prefix_caching: bool = False):
        self.runner = runner
        self.max_vision_tiles = max_vision_tiles
        self.detokenize = detokenize  # ids -> text, for stop strings
        self.tokens_per_tile = runner.config.tokens_per_tile
        # What the cache slots hold, kept across generate() calls as the cache itself is.
        self.prefix = PrefixIndex() if prefix_caching else None

    # ----------------------------------------------------------------------------------------- prefill

    def _feature_rows(self, group: list[Sequence]) -> tuple[np.ndarray | jax.Array | None, np.ndarray | None,
                                                            np.ndarray]:
        """The group's tiles stacked for one vision call (with their value table, if uint8), and each prompt
        position's feature row. Images wholly inside a cached prefix are left out (their rows stay -1)."""
        rows_of = np.full((len(group), max(s.prompt_len for s in group)), -1, np.int32)
        images, first_tile = [], 0
        for b, seq in enumerate(group):
            for im in seq.images_after(seq.cached):
                local = np.asarray(im.layout)
                newline = local == im.num_tiles * self.tokens_per_tile
                rows = np.where(newline, NEWLINE, local + first_tile * self.tokens_per_tile)
                rows_of[b, im.start : im.start + len(local)] = rows
                images.append(im)
                first_tile += im.num_tiles
        if not images:
            return None, None, rows_of
        table = images[0].value_table
        if table is not None and all(im.value_table is not None and np.array_equal(im.value_table, table)
                                     for im in images):
            tiles = [im.tiles for im in images]  # uint8: normalized on the device
        else:
            table, tiles = None, [im.pixel_values.astype(np.float32, copy=False) for im in images]
        xp = jnp if any(isinstance(t, jax.Array) for t in tiles) else np  # tiles the processor made on the device
        return tiles[0] if len(tiles) == 1 else xp.concatenate(tiles), table, rows_of

    def _prefill(self, group: list[Sequence]) -> sampling.SampleOutput:
        """One prefill of the group's chunks: whole prompts, or (all members alike, `Scheduler.group_size`) what
        follows each one's cached prefix."""
        buckets = self.runner.buckets
        length = buckets.prefill_length(max(s.prompt_len - s.cached for s in group))
        continued = group[0].cached > 0
        context_len = buckets.kv_length(max(s.cached for s in group) + length) if continued else None
        members = group + [group[0]] * (buckets.prefill_batch(len(group), length) - len(group))
        pixels, value_table, rows_of = self._feature_rows(group)
        tokens = np.zeros((len(members), length), np.int32)
        index = np.full((len(members), length), -1, np.int32)
        seen = np.full((len(members), context_len or length), -1, np.int32)
        for b, seq in enumerate(group):
            ids, start = seq.request.token_ids, seq.cached
            tokens[b, : len(ids) - start] = np.maximum(ids[start:], 0)
            index[b, : len(ids) - start] = rows_of[b, start : len(ids)]
            # The repetition penalty counts the prompt's text tokens only (all of them, cached or not).
            text = np.ones(len(ids), bool)
            for im in seq.request.images:
                text[im.start : im.start + len(im.layout)] = False
            seen[b, : len(ids)] = np.where(text, ids, -1)
        tokens[len(group) :], index[len(group) :], seen[len(group) :] = tokens[0], index[0], seen[0]
        column = lambda values: np.asarray(values, np.int32)
        # numpy arrays: the jitted prefill takes them in its own transfer (jnp.asarray would dispatch a device op
        # per field, ~2 ms of host time per prefill on an H100 host).
        batch = PrefillBatch(
            tokens=tokens,
            feature_index=index,
            slots=column([s.slot for s in members]),
            lengths=column([s.prompt_len for s in members]),
            min_new=column([s.request.gen_config.min_new_tokens or 0 for s in members]),
            params=_stack_params([_slot_params(s) for s in group], len(members)),
            seen_ids=seen,
            starts=column([s.cached for s in members]) if continued else None,
            sources=column([s.source for s in members]) if continued else None,
        )
        features = None if pixels is None else self.runner.encode_images(pixels, value_table)
        return self.runner.prefill(batch, features, self._num_logprobs(group), context_len)

    @staticmethod
    def _num_logprobs(seqs) -> int:
        return MAX_LOGPROBS if any(s.request.gen_config.logprobs for s in seqs) else 0

    # ----------------------------------------------------------------------------------------- results

    def _append(self, sched: Scheduler, seq: Sequence, token: int, logprob_row) -> Event | None:
        if seq.status != Status.RUNNING:
            return None
        g = seq.request.gen_config
        n = len(seq.output_ids)
        min_new = g.min_new_tokens or 0
        if token in seq.request.stop_ids and n >= min_new:
            sched.finish(seq, "stop")
            return Event(seq, [], True)
        seq.output_ids.append(token)
        if logprob_row is not None and g.logprobs:
            ids, lps = logprob_row
            seq.logprobs.append({int(i): float(p) for i, p in zip(ids[: g.logprobs], lps[: g.logprobs])})
        if seq.request.stop_strings and self.detokenize is not None:
            # Only the tail can hold a stop word that this token completed (earlier ones were checked before).
            text = tail_text(self.detokenize, seq.output_ids, max(map(len, seq.request.stop_strings)))
            if any(s in text for s in seq.request.stop_strings):
                sched.finish(seq, "stop")
                return Event(seq, [token], True)
        if len(seq.output_ids) >= seq.max_new_tokens:
            sched.finish(seq, "length")
            return Event(seq, [token], True)
        return Event(seq, [token], False)

    def _process(self, sched: Scheduler, owners: list[Sequence | None], out: sampling.SampleOutput) -> list[Event]:
        tokens = np.asarray(out.tokens)
        top = None
        if out.top_ids.shape[-1]:
            top_ids, top_lp = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
        events = []
        for row, seq in enumerate(owners):
            if seq is None:
                continue
            if out.top_ids.shape[-1]:
                top = (top_ids[row], top_lp[row])
            ev = self._append(sched, seq, int(tokens[row]), top)
            if ev is not None:
                events.append(ev)
        if done := [ev.seq.slot for ev in events if ev.finished]:
            self.runner.release(done)
        return events

    # ----------------------------------------------------------------------------------------- loop

    def generate(self, requests: Iterable[EngineRequest]) -> Iterator[Event]:
        """Runs requests to completion, yielding token events as results arrive (requests stream in lazily)."""
        r = self.runner
        # The cache length per slot is the session length.
        sched = Scheduler(r.buckets.num_slots, r.buckets.max_len, r.buckets.max_prefill_tokens, self.max_vision_tiles,
                          self.prefix)
        incoming = iter(requests)
        exhausted = False
        pending: collections.deque = collections.deque()
        while True:
            # Queue requests only until the next prefill group is complete (one more is waiting than it takes, or
            # it fills the free slots): huge inputs are never held whole, and the first prefill starts as soon
            # as its own requests are prepared, not the whole batch's.
            while not exhausted and (not sched.waiting or sched.group_size(r.buckets.prefill_length)
                                     == len(sched.waiting) < len(sched.free_slots)):
                req = next(incoming, None)
                if req is None:
                    exhausted = True
                    break
                seq = sched.add(req)
                if seq.status == Status.FINISHED:
                    yield Event(seq, [], True)
            if not sched.has_work() and not pending:
                if exhausted:
                    return
                continue
            dispatched = False
            group = sched.admit(r.buckets.prefill_length)
            if group:
                try:
                    pending.append((list(group), self._prefill(group)))
                except BaseException:
                    if self.prefix is not None:  # admit recorded content that these slots never received
                        for seq in group:
                            self.prefix.hold(seq.slot, [])
                    raise
                dispatched = True
            # Prefill gives each sequence its first token: only those wanting more need a decode step.
            running = [s for s in sched.running.values() if 1 + s.decode_dispatched < s.max_new_tokens]
            if running:
                for s in running:
                    s.decode_dispatched += 1
                longest = max(s.prompt_len + s.decode_dispatched for s in running)
                greedy = not any(s.request.gen_config.do_sample for s in running)
                out = r.decode(longest, 1 + max(s.slot for s in running), greedy, self._num_logprobs(running))
                owners: list[Sequence | None] = [None] * out.tokens.shape[0]  # the rows the step computed
                for s in running:
                    owners[s.slot] = s
                pending.append((owners, out))
                dispatched = True
            while pending and (len(pending) > 2 or not dispatched):
                owners, out = pending.popleft()
                yield from self._process(sched, owners, out)


