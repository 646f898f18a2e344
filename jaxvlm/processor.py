"""Prompt -> engine request: chat template, tokenization, image loading and preprocessing, stop rules.

Each checkpoint format is tokenized the way its own reference does it: llava-hf expands `<image>` into one
token per feature and tokenizes the whole string (as `LlavaProcessor` does); original LLaVA tokenizes the text
between images separately and splices the features in (`tokenizer_image_token` in haotian-liu/LLaVA).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from jaxvlm import vl
from jaxvlm.chat_template import ChatTemplate
from jaxvlm.config import GenerationConfig
from jaxvlm.image_processing import ImageProcessor, ProcessedImage
from jaxvlm.model_config import ConfigError, LlavaConfig, read_json
from jaxvlm.prompts import Conversation
from jaxvlm.scheduler import EngineRequest, ImageInput

log = logging.getLogger(__name__)


_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _tokenizer_error(model_dir: Path, cause: str) -> ConfigError:
    found = sorted(p.name for p in Path(model_dir).glob("tokenizer*"))
    return ConfigError(f"{model_dir}: cannot load the tokenizer (tokenizer files there: {found or 'none'}; expected "
                       f"tokenizer.json or tokenizer.model with tokenizer_config.json): {cause}")


def require_tokenizer_files(model_dir: Path) -> None:
    """Fails at once where no vocabulary file is there: the tokenizer itself loads beside the weights."""
    if not any((Path(model_dir) / name).exists() for name in _VOCABULARY_FILES):
        raise _tokenizer_error(model_dir, "no vocabulary file")


class InputProcessor:
    def __init__(self, config: LlavaConfig, tokenizer, image_processor: ImageProcessor, template: ChatTemplate,
                 eos_ids: set[int]):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.eos_ids = frozenset(eos_ids)
        # Limits for loading prompt images; None defers to vl.DEFAULT_FETCH_POLICY at each load.
        self.fetch_policy: vl.FetchPolicy | None = None
        if config.image_token_index is not None:
            self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_index)

    @classmethod
    def from_checkpoint(cls, config: LlavaConfig, model_dir: Path, tower_dir: Path | None,
                        template: ChatTemplate) -> "InputProcessor":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # transformers' own message never says which directory it looked in
            cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise _tokenizer_error(model_dir, f"{type(e).__name__}: {cause}") from e
        raw = read_json(model_dir / "config.json")
        if config.checkpoint_format == "llava-hf":
            pre = model_dir / "preprocessor_config.json"
            if not pre.exists():
                pre = model_dir / "processor_config.json"
            pre_cfg = read_json(pre)
            pre_cfg = pre_cfg.get("image_processor", pre_cfg)
            images = ImageProcessor.from_hf(pre_cfg, raw)
        else:
            clip_pre = tower_dir / "preprocessor_config.json" if tower_dir else None
            images = ImageProcessor.from_original(raw, read_json(clip_pre) if clip_pre and clip_pre.exists() else None)
        # An accelerator resizes in microseconds what PIL takes milliseconds for; a CPU backend keeps PIL.
        images = dataclasses.replace(images, on_device=jax.default_backend() != "cpu")
        eos = set()
        for source in (raw, raw.get("text_config") or {}, _maybe_json(model_dir / "generation_config.json")):
            e = source.get("eos_token_id")
            eos.update(e if isinstance(e, list) else [e] if e is not None else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(config, tokenizer, images, template, eos)

    # -------------------------------------------------------------------------------------- tokens

    def _tokenize(self, prompt: str, counts: list[int]) -> tuple[np.ndarray, list[int]]:
        """Token ids of the rendered prompt (int32), and where each image's feature run starts."""
        parts = prompt.split(vl.IMAGE_TOKEN)
        if len(parts) - 1 != len(counts):
            raise ValueError(f"the rendered prompt has {len(parts) - 1} image markers for {len(counts)} images")
        if self.config.checkpoint_format == "llava-hf":
            # One image token per image, expanded to its feature count afterwards: the same ids as tokenizing the
            # expanded text (a special token splits the text alike once or 2,340 times), much faster.
            ids = self.tokenizer(parts[0] + "".join(self.image_token + p for p in parts[1:])).input_ids
            bos = self.tokenizer.bos_token_id
            if bos is not None and ids[:2] == [bos, bos]:  # a template that writes <s> itself
                ids = ids[1:]
            ids = np.asarray(ids, np.int32)
            marks = np.flatnonzero(ids == self.config.image_token_index)
            if len(marks) != len(counts):
                raise ValueError("the prompt text itself contains the model's image token "
                                 f"{self.image_token!r}; remove it or place images with {vl.IMAGE_TOKEN}")
            # np.repeat expands each image token into its run (thousands of tokens: no Python loop).
            repeats = np.ones(len(ids), np.int64)
            repeats[marks] = counts
            starts = (marks + np.cumsum([0, *counts])[:-1] - np.arange(len(marks))).tolist()
            return np.repeat(ids, repeats), starts
        ids, starts = [], []
        bos = self.tokenizer.bos_token_id
        for i, part in enumerate(parts):
            chunk = self.tokenizer(part).input_ids
            if i == 0 and chunk[:1] == [bos]:
                ids.append(bos)
            ids.extend(chunk[1:] if chunk[:1] == [bos] else chunk)
            if i < len(counts):
                starts.append(len(ids))
                ids.extend([0] * counts[i])
        return np.asarray(ids, np.int32), starts

    def stop_rules(self, g: GenerationConfig) -> tuple[frozenset[int], tuple[str, ...], frozenset[int]]:
        """(stop ids, multi-token stop strings, banned ids). Single-token words become ids (fast path)."""
        stop = set(g.stop_token_ids or ())
        words = list(g.stop_words or ())
        if not g.ignore_eos:  # ignore_eos drops every end-of-turn marker, keeping only the user's stop rules
            stop |= self.eos_ids
            words += self.template.stop_words or ()
        strings = []
        for word in words:
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1:
                stop.add(ids[0])
            elif word:
                strings.append(word)
        bad = set(g.bad_token_ids or ())
        for word in g.bad_words or ():
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1:
                bad.add(ids[0])
            else:
                warnings.warn(f"bad word {word!r} is {len(ids)} tokens; only single-token bad words are banned")
        return frozenset(stop), tuple(strings), frozenset(bad)

    # -------------------------------------------------------------------------------------- images

    def preprocess_image(self, image: Image.Image) -> tuple[ProcessedImage, np.ndarray]:
        processed = self.image_processor(image)
        layout = self.image_processor.layout(
            processed, self.config.vision.patches_per_side, self.config.tokens_per_tile, self.config.anyres
        )
        return processed, layout

    # -------------------------------------------------------------------------------------- request

    def make_request(self, index: int, conv: Conversation, gen: GenerationConfig,
                     images: list[Image.Image] | None = None) -> EngineRequest:
        """`images`: the conversation's images already loaded (else they are loaded here)."""
        _check_encodable(conv.messages)  # before any image is fetched
        if images is None:
            images = [vl.load_image(src, policy=self.fetch_policy) for src in conv.images]
        processed = [self.preprocess_image(im) for im in images]
        prompt = self.template.render(conv.messages)
        ids, starts = self._tokenize(prompt, [len(layout) for _, layout in processed])
        stop, strings, bad = self.stop_rules(gen)
        return EngineRequest(
            index=index,
            token_ids=ids,
            images=[ImageInput(p.tiles, layout, s, p.value_table, p.source) for (p, layout), s in zip(processed, starts)],
            gen_config=gen,
            stop_ids=stop,
            stop_strings=strings,
            bad_ids=bad,
        )


def _check_encodable(messages: list[dict]) -> None:
    """Lone surrogates (e.g. from bytes decoded with errors='surrogateescape') cannot be tokenized; the
    tokenizer's own error does not say why, so name the message, the character and where it is."""
    for i, message in enumerate(messages):
        text = message["content"]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"message {i} is not valid Unicode text: {text[e.start:e.end]!r} at character {e.start} "
                             f"({e.reason}); pass text decoded from UTF-8, not bytes or surrogate escapes") from None


def _maybe_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}
