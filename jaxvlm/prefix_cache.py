"""Prefix caching (LMDeploy's `enable_prefix_caching`): which cache slot holds which prompt content, so that a
prompt starting like one already in the cache takes those positions' k/v from it instead of prefilling them.

Content is named in blocks of BLOCK positions by chained digests: a block's key covers its tokens and every
block before it, so equal keys mean equal prefixes. Positions of an image are named by a digest of its tiles
and feature layout, so the same picture asked about again matches and another picture never does. A slot's
blocks are replaced when it takes a new sequence (its prompt) and extended when that sequence finishes (by the
tokens it generated, whose k/v are in the cache too), so the next turn of a chat finds its whole history. A
freed slot keeps its content until it is handed out again.

A hit is used only where it leaves a short rest, at most MAX_SUFFIX positions and no more than it saves: the
rest is prefilled attending to the cached prefix through XLA (`kernels.attention.context_attention`), which
materializes its scores, so it suits short continuations (a new question about an image, the next turn).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np

BLOCK = 16
MAX_SUFFIX = 256


@dataclasses.dataclass
class PromptKeys:
    """A prompt's content (int64 per position: token ids, image positions as negative digests) and the keys of
    its full blocks."""

    content: np.ndarray
    keys: list[bytes]

    def extended(self, generated: list[int]) -> list[bytes]:
        """The keys of the prompt followed by `generated` tokens (full blocks only)."""
        content = np.concatenate([self.content, np.asarray(generated, np.int64)])
        done = len(self.keys)
        return self.keys + _chain(content[done * BLOCK:], self.keys[-1] if self.keys else b"")


def prompt_keys(token_ids: np.ndarray, images) -> PromptKeys:
    """`images`: the request's `ImageInput`s (tiles or their source, layout, start)."""
    content = np.asarray(token_ids, np.int64).copy()
    for im in images:
        h = hashlib.blake2b(digest_size=8)
        # Device tiles are named by the host image they were made from (the processor is the engine's own):
        # reading them back would wait for the device's queue.
        for part in (im.tiles if im.source is None else im.source, np.asarray(im.layout)):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        base = np.uint64(int.from_bytes(h.digest(), "little") >> 2)
        n = len(im.layout)
        # -1 - (62-bit digest + offset): never a token id, and distinct for each position of each image
        offsets = (base + np.arange(n, dtype=np.uint64)) & np.uint64((1 << 62) - 1)
        content[im.start : im.start + n] = -1 - offsets.astype(np.int64)
    return PromptKeys(content, _chain(content, b""))


def _chain(content: np.ndarray, previous: bytes) -> list[bytes]:
    keys = []
    for i in range(len(content) // BLOCK):
        previous = hashlib.blake2b(previous + content[i * BLOCK : (i + 1) * BLOCK].tobytes(), digest_size=16).digest()
        keys.append(previous)
    return keys


class PrefixIndex:
    """Block keys -> the slots whose cache holds that prefix. Lives as long as the cache (across
    `Engine.generate` calls)."""

    def __init__(self):
        self._holders: dict[bytes, set[int]] = collections.defaultdict(set)
        self._held: dict[int, list[bytes]] = {}
        self.version = 0  # changes whenever what a slot holds does (lookups before it may be stale)
        self.reused_tokens = 0  # prompt positions taken from the cache instead of prefilled, in all

    def lookup(self, keys: list[bytes]) -> tuple[int, int]:
        """(positions matched, a slot holding them): the longest run of leading blocks that some slot holds.
        Keys are chained, so a slot holding block i holds every block before it."""
        matched, slot = 0, -1
        for i, key in enumerate(keys):
            holders = self._holders.get(key)
            if not holders:
                break
            matched, slot = (i + 1) * BLOCK, slot if slot in holders else min(holders)
        return matched, slot

    def hold(self, slot: int, keys: list[bytes]) -> None:
        """`slot` now holds exactly the prefix that `keys` name (what it held before is gone)."""
        self.version += 1
        for key in self._held.pop(slot, ()):
            holders = self._holders[key]
            holders.discard(slot)
            if not holders:
                del self._holders[key]
        self._held[slot] = list(keys)
        for key in keys:
            self._holders[key].add(slot)


def usable(matched: int, prompt_len: int, max_len: int, chunk_length: Callable[[int], int]) -> int:
    """How much of a `matched` prefix to take from the cache: all of it (but the last prompt token, whose
    logits prefill must compute) if the rest is short (at most MAX_SUFFIX positions, and no more than the
    part reused) and its padded chunk (`chunk_length`) still fits the slot; else nothing."""
    matched = min(matched, prompt_len - 1)
    rest = prompt_len - matched
    if matched <= 0 or rest > min(MAX_SUFFIX, matched) or matched + chunk_length(rest) > max_len:
        return 0
    return matched
