"""Chat templates: turning a conversation into the prompt string a LLaVA model was trained on.

The built-in templates reproduce LMDeploy's (``lmdeploy/model.py``: ``BaseChatTemplate``,
``Vicuna``, ``Llavav1``, ``MistralChat``, ``ChatmlDirect``) string for string, including its
multi-turn and system-message rules (``messages2prompt``):

* a default system prompt (``meta_instruction``) is written only when the first message is not
  a system message; a system message is written in place as ``system + content + eosys``;
* every turn is ``box + content + end``: user ``user ... eoh``, assistant
  ``assistant ... eoa + separator``, system ``system ... eosys``;
* the prompt ends with ``assistant`` (the generation prompt), except when the last message is an
  assistant's: then its end marker is left off so the model continues that answer;
* vicuna / llava-v1 drop the trailing space of ``"ASSISTANT: "`` (LMDeploy cuts the last
  character; we cut it only when it is a space, which is the same for the built-in strings).

``hf`` renders the checkpoint's own jinja chat template the way transformers'
``apply_chat_template`` does (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, the
``generation`` tag, ``raise_exception``, ``tojson``, special tokens as variables).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from jaxvlm.vl import IMAGE_TOKEN

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "ChatTemplateConfig",
    "FieldChatTemplate",
    "HFChatTemplate",
    "find_hf_chat_template",
    "match_template_name",
    "resolve_chat_template",
]

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")
_FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator")
# Fields of LMDeploy's ChatTemplateConfig that jaxvlm accepts but does not act on.
_LMDEPLOY_ONLY = ("model_path", "tool", "eotool", "capability")


@dataclass
class ChatTemplateConfig:
    """LMDeploy's ``ChatTemplateConfig``: pick a template by name; set fields override it."""

    model_name: str
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    separator: str | None = None
    stop_words: list[str] | None = None
    model_path: str | None = None
    tool: str | None = None
    eotool: str | None = None
    capability: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"ChatTemplateConfig.model_name must be a non-empty str, got {self.model_name!r}")
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"ChatTemplateConfig.{name} must be a str or None, got {value!r}")
        if self.stop_words is not None:
            if isinstance(self.stop_words, str) or not all(
                    isinstance(w, str) and w for w in self.stop_words):
                raise ValueError(f"ChatTemplateConfig.stop_words must be a list of non-empty str, "
                                 f"got {self.stop_words!r}")
            self.stop_words = list(self.stop_words)
        ignored = [name for name in _LMDEPLOY_ONLY if getattr(self, name) is not None]
        if ignored:
            warnings.warn(f"ChatTemplateConfig fields {ignored} are LMDeploy-only and are ignored by jaxvlm",
                          stacklevel=3)

    def overrides(self) -> dict[str, Any]:
        """The template fields this config sets (those that are not None)."""
        return {name: getattr(self, name) for name in (*_FIELDS, "stop_words") if getattr(self, name) is not None}


class ChatTemplate(ABC):
    """Renders ``[{"role", "content"}]`` (content already holding IMAGE_TOKEN markers) to a prompt.

    The prompt ends with the assistant's prefix (the generation prompt); when the last message is an
    assistant's, it ends inside that message so the model continues it.
    """

    name: str
    stop_words: list[str]

    @abstractmethod
    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages``; ValueError if they are malformed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {list(_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a str (normalise prompts first), "
                             f"got {type(content).__name__}")
    return list(messages)


@dataclass(frozen=True)
class _Fields:
    system: str = ""
    meta_instruction: str | None = ""
    eosys: str = ""
    user: str = ""
    eoh: str = ""
    assistant: str = ""
    eoa: str = ""
    separator: str = ""
    stop_words: tuple[str, ...] = ()
    # Vicuna-style templates end the generation prompt with "ASSISTANT:" (no trailing space).
    trim_generation_space: bool = False


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# Strings from InternLM/lmdeploy lmdeploy/model.py; the llava-v1 system prompt and separators agree
# with haotian-liu/LLaVA llava/conversation.py conv_llava_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>").
_VICUNA = _Fields(meta_instruction=_VICUNA_SYSTEM, eosys=" ", user="USER: ", eoh=" ", assistant="ASSISTANT: ",
                  eoa="</s>", stop_words=("</s>",), trim_generation_space=True)
_MISTRAL = _Fields(user="[INST] ", eoh=" [/INST]", eoa="</s>")
BUILTIN_TEMPLATES: dict[str, _Fields] = {
    "base": _Fields(),
    "vicuna": _VICUNA,
    "llava-v1": dataclasses.replace(_VICUNA, meta_instruction=_LLAVA_V1_SYSTEM),
    "mistral": _MISTRAL,
    "mixtral": _MISTRAL,
    # conv_chatml_direct (LLaVA-1.6-34B). LMDeploy sets no stop word; the original LLaVA stops at
    # "<|im_end|>" (its conv.sep), and so do we, in case the checkpoint's EOS is another token.
    "llava-chatml": _Fields(system="<|im_start|>system\n", meta_instruction="Answer the questions.",
                            eosys="<|im_end|>", user="<|im_start|>user\n", eoh="<|im_end|>",
                            assistant="<|im_start|>assistant\n", eoa="<|im_end|>",
                            stop_words=("<|im_end|>",)),
}
_ALL_NAMES = (*BUILTIN_TEMPLATES, "hf")


class FieldChatTemplate(ChatTemplate):
    """A template made of fixed strings, rendered as LMDeploy's ``BaseChatTemplate.messages2prompt``."""

    def __init__(self, name: str, fields: _Fields):
        self.name = name
        self.fields = fields
        self.stop_words = list(fields.stop_words)

    def render(self, messages: list[dict]) -> str:
        messages = _check_messages(messages)
        f = self.fields
        box = {"user": f.user, "assistant": f.assistant, "system": f.system}
        end = {"user": f.eoh, "assistant": f.eoa + f.separator, "system": f.eosys}
        parts = []
        if f.meta_instruction is not None and messages[0]["role"] != "system":
            parts.append(f"{f.system}{f.meta_instruction}{f.eosys}")
        for message in messages:
            role = message["role"]
            parts.append(f"{box[role]}{message['content']}{end[role]}")
        prompt = "".join(parts)
        if messages[-1]["role"] == "assistant":
            # Continue the last answer: leave its end marker off.
            return prompt[: len(prompt) - len(end["assistant"])]
        prompt += f.assistant
        if f.trim_generation_space and prompt.endswith(" "):
            prompt = prompt[:-1]
        return prompt


# ----------------------------------------------------------------------------- hf (jinja)

_SENTINEL = "jaxvlm-sentinel-7f3a"
_LITERAL_MARKER = "\x00jaxvlm-literal-marker\x00"
_LITERAL_IMAGE_TOKEN = "\x00jaxvlm-literal-image-token\x00"


def _compile_jinja(source: str):
    """Compile like transformers' ``_compile_jinja_template`` (same environment and helpers)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # jinja2 comes with transformers
        raise ValueError("the 'hf' chat template needs jinja2 (pip install jinja2)") from exc

    class _GenerationTag(Extension):
        # transformers marks assistant text with {% generation %}; it renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"cannot compile the chat template: {exc}") from exc


def _inserted(longer: str, shorter: str) -> str:
    """The text that ``longer`` has and ``shorter`` lacks (common prefix and suffix removed)."""
    limit = min(len(longer), len(shorter))
    start = 0
    while start < limit and longer[start] == shorter[start]:
        start += 1
    end = 0
    while end < limit - start and longer[-1 - end] == shorter[-1 - end]:
        end += 1
    return longer[start: len(longer) - end]


class HFChatTemplate(ChatTemplate):
    """The jinja chat template shipped with a tokenizer or processor.

    How images reach the template:

    * Templates that read content as a list of parts (llava-hf's) get a turn whose images come
      first (``<IMAGE_TOKEN>\\n...<IMAGE_TOKEN>\\ntext``, the default placement) as image parts plus
      one text part, so the template lays images out itself; its image marker (e.g. ``<image>``)
      is then mapped to IMAGE_TOKEN. The result is what transformers' processor renders.
    * A turn that places images elsewhere in its text keeps IMAGE_TOKEN inline in a text part, so
      the placement the user asked for is kept (llava-hf templates would move images first).
    * Templates that read content as a string get the string with IMAGE_TOKEN inline.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 image_marker: str | None = None, stop_words: list[str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the hf chat template is empty")
        self.name = "hf"
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self._template = _compile_jinja(source)
        self.uses_parts = self._probe_parts()
        self.image_layout = self._probe_image_layout() if self.uses_parts else ""
        self.image_marker = self._pick_marker(image_marker)
        self.assistant_end = self._probe_assistant_end()
        if stop_words is None:
            eos = self.special_tokens.get("eos_token")
            stop_words = [eos] if eos else []
        self.stop_words = list(stop_words)

    # -- probing, once, with sentinel text (as LMDeploy's HFChatTemplate does)

    def _raw(self, messages: list[dict], add_generation_prompt: bool) -> str:
        # Special tokens the checkpoint does not name render as "" rather than failing the template.
        variables = {"bos_token": "", "eos_token": "", **self.special_tokens}
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)

    def _probe_parts(self) -> bool:
        """Whether the template reads content as a list of parts rather than as a string."""
        def rendered(content) -> str | None:
            try:
                return self._raw([{"role": "user", "content": content}], False)
            except Exception:
                return None

        as_string = rendered(_SENTINEL)
        as_parts = rendered([{"type": "text", "text": _SENTINEL}])
        if as_parts is None or _SENTINEL not in as_parts:
            return False
        # A string template shows a list as its repr, which also contains the sentinel; a template
        # that handles both forms renders them alike.
        return as_string is None or _SENTINEL not in as_string or as_string == as_parts

    def _probe_image_layout(self) -> str:
        try:
            text_only = self._raw([{"role": "user", "content": [{"type": "text", "text": _SENTINEL}]}], False)
            with_image = self._raw([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": _SENTINEL}]}], False)
        except Exception:
            return ""
        return _inserted(with_image, text_only)

    def _pick_marker(self, requested: str | None) -> str | None:
        layout = self.image_layout
        if requested:
            return requested if requested in layout else None
        # The rendering of one image part, less the template's own whitespace around it.
        return layout.strip() or None

    def _probe_assistant_end(self) -> str:
        content = [{"type": "text", "text": _SENTINEL}] if self.uses_parts else _SENTINEL
        user = [{"type": "text", "text": "hi"}] if self.uses_parts else "hi"
        try:
            out = self._raw([{"role": "user", "content": user}, {"role": "assistant", "content": content}], False)
        except Exception:
            return ""
        at = out.rfind(_SENTINEL)
        return out[at + len(_SENTINEL):] if at >= 0 else ""

    # -- rendering

    def _message_for_template(self, message: dict) -> tuple[dict, int]:
        """(message as the template wants it, number of image parts given to it)."""
        text = message["content"]
        if not self.uses_parts:
            return {"role": message["role"], "content": text}, 0
        leading = 0
        rest = text
        while rest.startswith(IMAGE_TOKEN):
            leading += 1
            rest = rest[len(IMAGE_TOKEN):]
            if rest.startswith("\n"):  # the default placement's newline; the template adds its own
                rest = rest[1:]
        if leading and self.image_marker and IMAGE_TOKEN not in rest:
            parts: list[dict] = [{"type": "image"} for _ in range(leading)]
            if rest:
                parts.append({"type": "text", "text": self._protect(rest)})
            return {"role": message["role"], "content": parts}, leading
        return {"role": message["role"], "content": [{"type": "text", "text": self._protect(text)}]}, 0

    def _protect(self, text: str) -> str:
        # Text that already spells the template's marker must not turn into an image.
        text = text.replace(IMAGE_TOKEN, _LITERAL_IMAGE_TOKEN)
        if self.image_marker:
            text = text.replace(self.image_marker, _LITERAL_MARKER)
        return text

    def render(self, messages: list[dict]) -> str:
        messages = _check_messages(messages)
        converted, n_parts = [], 0
        for message in messages:
            item, n = self._message_for_template(message)
            converted.append(item)
            n_parts += n
        continuing = messages[-1]["role"] == "assistant"
        try:
            prompt = self._raw(converted, add_generation_prompt=not continuing)
        except Exception as exc:
            raise ValueError(f"the hf chat template failed to render: {type(exc).__name__}: {exc}") from exc
        if continuing and self.assistant_end and prompt.endswith(self.assistant_end):
            prompt = prompt[: len(prompt) - len(self.assistant_end)]
        if n_parts:
            prompt = prompt.replace(self.image_marker, IMAGE_TOKEN)
        if self.uses_parts:
            prompt = prompt.replace(_LITERAL_IMAGE_TOKEN, IMAGE_TOKEN)
            if self.image_marker:
                prompt = prompt.replace(_LITERAL_MARKER, self.image_marker)
        expected = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if prompt.count(IMAGE_TOKEN) != expected:
            raise ValueError(f"the hf chat template rendered {prompt.count(IMAGE_TOKEN)} image markers for "
                             f"{expected} images")
        return prompt


# ----------------------------------------------------------------------------- finding templates

def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _default_template(value: object) -> str | None:
    # tokenizer_config.json may hold one template or named ones ({"name", "template"} list or dict).
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        value = [{"name": k, "template": v} for k, v in value.items()]
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                return item["template"]
    return None


def find_hf_chat_template(model_path: str) -> str | None:
    """The chat template saved in a checkpoint directory, or None.

    Looked up in the order transformers and LMDeploy use: the tokenizer's (``chat_template.jinja``,
    ``tokenizer_config.json``), then the processor's (``chat_template.json``, ``processor_config.json``).
    """
    if not isinstance(model_path, str) or not os.path.isdir(model_path):
        return None
    jinja_file = os.path.join(model_path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        try:
            with open(jinja_file, encoding="utf-8") as fp:
                text = fp.read()
            if text.strip():
                return text
        except OSError:
            pass
    for filename in ("tokenizer_config.json", "chat_template.json", "processor_config.json"):
        data = _read_json(os.path.join(model_path, filename))
        if data is not None:
            template = _default_template(data.get("chat_template"))
            if template:
                return template
    return None


def _special_tokens(model_path: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    if not isinstance(model_path, str) or not os.path.isdir(model_path):
        return tokens
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(os.path.join(model_path, filename)) or {}
        for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            value = data.get(key)
            if isinstance(value, dict):  # serialised AddedToken
                value = value.get("content")
            if isinstance(value, str) and key not in tokens:
                tokens[key] = value
    return tokens


def _image_marker(model_path: str) -> str | None:
    if not isinstance(model_path, str) or not os.path.isdir(model_path):
        return None
    for filename in ("processor_config.json", "tokenizer_config.json"):
        value = (_read_json(os.path.join(model_path, filename)) or {}).get("image_token")
        if isinstance(value, str) and value:
            return value
    return None


def _is_vicuna(path: str) -> bool:
    return "vicuna" in path and "llava" not in path


def _is_llava_v1(path: str) -> bool:
    return ("llava" in path and "v1" in path and "v1.6-34b" not in path and "mistral" not in path) \
        or "llava-1.5" in path


def _mistral_name(path: str) -> str | None:
    if "instruct" in path or "llava" in path:
        if "mistral" in path:
            return "mistral"
        if "mixtral" in path:
            return "mixtral"
    return None


def _is_llava_chatml(path: str) -> bool:
    return "llava" in path and "v1.6-34b" in path


# In LMDeploy's registry order (lmdeploy/model.py), each rule its class's ``match``.
_MATCHERS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("vicuna", _is_vicuna),
    ("llava-v1", _is_llava_v1),
    ("mistral", lambda p: _mistral_name(p) == "mistral"),
    ("mixtral", lambda p: _mistral_name(p) == "mixtral"),
    ("llava-chatml", _is_llava_chatml),
)


def match_template_name(model_path: str) -> str | None:
    """The built-in template LMDeploy would pick from the model path's name, or None."""
    path = str(model_path).lower()
    for name, matches in _MATCHERS:
        if matches(path):
            return name
    return None


def _build_hf(model_dir: str, hf_chat_template: str | None, stop_words: list[str] | None) -> HFChatTemplate | None:
    source = hf_chat_template if hf_chat_template is not None else find_hf_chat_template(model_dir)
    if source is None:
        return None
    template = HFChatTemplate(source, special_tokens=_special_tokens(model_dir),
                              image_marker=_image_marker(model_dir), stop_words=stop_words)
    # Like LMDeploy, the template counts only if it renders a plain user turn (and shows its text).
    if _SENTINEL not in template.render([{"role": "user", "content": _SENTINEL}]):
        raise ValueError("the chat template does not show the text of a user message")
    return template


def resolve_chat_template(model_path: str, config: ChatTemplateConfig | None = None,
                          hf_chat_template: str | None = None, *, model_dir: str | None = None) -> ChatTemplate:
    """Pick the chat template for a model.

    With ``config``: its ``model_name`` (a built-in name or ``hf``), with its set fields overriding.
    Without: the name matched from ``model_path`` as LMDeploy matches it, else the checkpoint's own
    jinja template (``hf_chat_template`` or the one saved in the checkpoint), else ``base`` with a
    warning. ``model_dir`` is the local checkpoint directory, when ``model_path`` is a hub id; the
    template, special tokens and image marker of ``hf`` are read from it.
    """
    model_dir = model_path if model_dir is None else model_dir
    if config is not None:
        if not isinstance(config, ChatTemplateConfig):
            raise ValueError(f"chat_template_config must be a ChatTemplateConfig, got {type(config).__name__}")
        return _from_config(model_path, model_dir, config, hf_chat_template)
    name = match_template_name(model_path)
    if name is not None:
        logger.info("chat template %r matched from the model path %s", name, model_path)
        return FieldChatTemplate(name, BUILTIN_TEMPLATES[name])
    try:
        hf = _build_hf(model_dir, hf_chat_template, None)
    except ValueError as exc:
        logger.warning("the checkpoint's chat template is unusable: %s", exc)
        hf = None
    if hf is not None:
        logger.info("using the checkpoint's own chat template (hf) for %s", model_path)
        return hf
    message = (f"no chat template matches {model_path!r} and it has no usable chat template of its own; "
               f"using 'base' (the text as is). Pass ChatTemplateConfig(model_name=...) with one of "
               f"{list(_ALL_NAMES)} to choose one.")
    logger.warning(message)
    warnings.warn(message, stacklevel=2)
    return FieldChatTemplate("base", BUILTIN_TEMPLATES["base"])


def _from_config(model_path: str, model_dir: str, config: ChatTemplateConfig,
                 hf_chat_template: str | None) -> ChatTemplate:
    overrides = config.overrides()
    if config.model_name == "hf":
        ignored = [k for k in overrides if k != "stop_words"]
        if ignored:
            warnings.warn(f"ChatTemplateConfig fields {ignored} do not apply to the 'hf' template and are ignored",
                          stacklevel=3)
        hf = _build_hf(model_dir, hf_chat_template, overrides.get("stop_words"))
        if hf is None:
            raise ValueError(f"ChatTemplateConfig(model_name='hf') but {model_path!r} has no chat template")
        return hf
    if config.model_name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {config.model_name!r}; built-in names are {list(_ALL_NAMES)}")
    fields = BUILTIN_TEMPLATES[config.model_name]
    if "stop_words" in overrides:
        overrides["stop_words"] = tuple(overrides["stop_words"])
    return FieldChatTemplate(config.model_name, dataclasses.replace(fields, **overrides))
