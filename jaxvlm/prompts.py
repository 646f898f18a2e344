"""Normalising the prompt forms of the pipeline API into one :class:`Conversation`.

Accepted forms (as LMDeploy's VLM pipeline accepts them):

* ``"text"``
* ``(text, image)`` or ``(text, [image, ...])``; also ``(image(s), text)`` as LMDeploy allows
* OpenAI-style messages: ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]``, a part
  being ``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``,
  ``{"type": "image_url", "image_url": "..."}``, ``{"type": "image", "image": PIL | str}`` or
  LMDeploy's ``{"type": "image_data", "image_data": {"data": PIL}}``

where an image is a ``PIL.Image.Image`` or a string that :func:`jaxvlm.vl.load_image` accepts.

Image placement, per turn: if the turn's text contains IMAGE_TOKEN, there must be exactly one per
image of the turn; otherwise the images go first, each followed by ``"\\n"``, then the text (what
LMDeploy does for LLaVA). Several text parts of one turn are joined with ``"\\n"`` (LMDeploy and
vLLM do the same). Images are accepted in user turns only. Missing or ``None`` content is ``""``.
Anything else raises ``ValueError`` saying what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from jaxvlm.vl import IMAGE_TOKEN

__all__ = ["Conversation", "normalize_prompt", "split_batch"]

_ROLES = ("system", "user", "assistant")
_FORMS = ("a prompt must be a str, a (text, image) or (text, [images]) tuple, or a list of "
          "OpenAI-style message dicts {'role': 'system'|'user'|'assistant', 'content': str | [parts]}")


@dataclass
class Conversation:
    """Messages whose content is a str with IMAGE_TOKEN markers, and the images in prompt order."""

    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not turn our ValueError into something else
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_image(value: Any) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, str) and bool(value))


def _looks_like_image(value: Any) -> bool:
    # LMDeploy's test for the (image, text) order: a PIL image, or a URL / data URL string.
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, str):
        return value.startswith(("http://", "https://", "data:image"))
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_looks_like_image(v) for v in value)


def _place(text: str, images: list, where: str) -> str:
    """The turn's content with one IMAGE_TOKEN per image."""
    markers = text.count(IMAGE_TOKEN)
    if markers:
        if markers != len(images):
            raise ValueError(f"{where}: the text has {markers} {IMAGE_TOKEN} markers but the turn has "
                             f"{len(images)} images; give one marker per image, or none to put the images first")
        return text
    return (IMAGE_TOKEN + "\n") * len(images) + text


def _image_list(value: Any, where: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, item in enumerate(items):
        if not _is_image(item):
            raise ValueError(f"{where}: image {i} must be a PIL.Image.Image or a non-empty str "
                             f"(path or URL), got {_short(item)}")
    return items


def _from_pair(prompt: tuple) -> Conversation:
    if len(prompt) != 2:
        raise ValueError(f"a tuple prompt must be (text, image) or (text, [images]); got a tuple of {len(prompt)}")
    text, images = prompt
    if not isinstance(text, str) and isinstance(images, str) and _looks_like_image(text):
        text, images = images, text
    elif isinstance(text, str) and isinstance(images, str) and _looks_like_image(text) \
            and not _looks_like_image(images):
        text, images = images, text
    if not isinstance(text, str):
        raise ValueError(f"a tuple prompt must be (text, image) or (text, [images]); its text is {_short(text)}")
    images = _image_list(images, "tuple prompt")
    return Conversation([{"role": "user", "content": _place(text, images, "tuple prompt")}], images)


def _part_image(part: dict, kind: str, where: str) -> Any:
    value = part.get(kind)
    if isinstance(value, dict):
        value = value.get("url", value.get("data", value.get(kind)))
    if not _is_image(value):
        raise ValueError(f"{where}: a {kind!r} part needs a PIL image or a non-empty URL/path string "
                         f"(e.g. {{'type': 'image_url', 'image_url': {{'url': ...}}}}), got {_short(part)}")
    return value


def _content(content: Any, where: str) -> tuple[str, list]:
    """(text, images) of one message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: content must be a str or a list of parts, got {_short(content)}")
    texts: list[str] = []
    images: list = []
    for j, part in enumerate(content):
        here = f"{where}, part {j}"
        if isinstance(part, str):  # a bare string part is text
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValueError(f"{here}: a part must be a dict with a 'type', got {_short(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{here}: a text part needs a str under 'text', got {_short(text)}")
            texts.append(text)
        elif kind in ("image_url", "image", "image_data"):
            images.append(_part_image(part, kind, here))
        else:
            raise ValueError(f"{here}: unknown part type {_short(kind)}; expected 'text', 'image_url', "
                             f"'image' or 'image_data'")
    return "\n".join(texts), images


def _from_messages(prompt: list) -> Conversation:
    if not prompt:
        raise ValueError("a message list must hold at least one message")
    messages: list[dict] = []
    images: list = []
    for i, message in enumerate(prompt):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be a dict with 'role' and 'content', got {_short(message)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"{where}: role must be one of {list(_ROLES)}, got {_short(role)}")
        text, turn_images = _content(message.get("content"), where)
        if turn_images and role != "user":
            raise ValueError(f"{where}: images are accepted in user messages only, not in {role!r} messages")
        messages.append({"role": role, "content": _place(text, turn_images, where)})
        images.extend(turn_images)
    return Conversation(messages, images)


def _check_conversation(conv: Conversation) -> Conversation:
    # Accept an already normalised conversation (e.g. a chat session's history) after a sanity check.
    if not isinstance(conv.messages, list) or not isinstance(conv.images, list) or not conv.messages:
        raise ValueError("a Conversation needs a non-empty list of messages and a list of images")
    markers = 0
    for i, message in enumerate(conv.messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"Conversation message {i} must be {{'role': one of {list(_ROLES)}, 'content': str}}")
        markers += message["content"].count(IMAGE_TOKEN)
    if markers != len(conv.images):
        raise ValueError(f"the Conversation has {markers} {IMAGE_TOKEN} markers but {len(conv.images)} images")
    _image_list(conv.images, "Conversation")
    return Conversation([dict(m) for m in conv.messages], list(conv.images))


def normalize_prompt(prompt: Any) -> Conversation:
    """One prompt, in any accepted form, as a :class:`Conversation`; ValueError if malformed."""
    if isinstance(prompt, str):
        return Conversation([{"role": "user", "content": _place(prompt, [], "text prompt")}], [])
    if isinstance(prompt, tuple):
        return _from_pair(prompt)
    if isinstance(prompt, list):
        if prompt and not all(isinstance(m, dict) for m in prompt):
            raise ValueError(f"a list prompt must hold only message dicts (a list of prompts is a batch: "
                             f"pass it to the pipeline, not here); got {_short(prompt)}")
        return _from_messages(prompt)
    if isinstance(prompt, Conversation):
        return _check_conversation(prompt)
    if isinstance(prompt, dict):
        raise ValueError("a single message dict must be wrapped in a list: [{'role': ..., 'content': ...}]")
    raise ValueError(f"{_FORMS}; got {_short(prompt)}")


def split_batch(prompts: Any) -> tuple[list, bool]:
    """(list of single prompts, whether the input was a batch).

    A list of message dicts is ONE prompt; a list of anything else (str, tuples, lists of dicts)
    is a batch. The prompts themselves are checked later by :func:`normalize_prompt`.
    """
    if isinstance(prompts, (str, tuple, Conversation)):
        return [prompts], False
    if isinstance(prompts, list):
        if not prompts:
            return [], True
        dicts = [isinstance(p, dict) for p in prompts]
        if all(dicts):
            return [prompts], False
        if any(dicts):
            raise ValueError("a list mixes message dicts with other prompts; a single prompt is a list of "
                             "message dicts, a batch is a list of prompts (e.g. a list of message lists)")
        return list(prompts), True
    if isinstance(prompts, dict):
        raise ValueError("a single message dict must be wrapped in a list: [{'role': ..., 'content': ...}]")
    raise ValueError(f"{_FORMS}, or a list of those (a batch); got {_short(prompts)}")
