"""Chat templates: exact strings against LMDeploy's and LLaVA's, path matching, and `hf` against transformers.

LMDeploy is not installable here, so its expected strings are written out below from its source:
InternLM/lmdeploy, lmdeploy/model.py (classes BaseChatTemplate, Vicuna, Llavav1, MistralChat,
ChatmlDirect; method messages2prompt; each class's `match`). The llava-v1 strings are also checked
against haotian-liu/LLaVA llava/conversation.py (conv_llava_v1, conv_vicuna_v1, conv_chatml_direct,
conv_mistral_instruct and Conversation.get_prompt).
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from jaxvlm.chat_template import (
    ChatTemplateConfig,
    FieldChatTemplate,
    HFChatTemplate,
    find_hf_chat_template,
    match_template_name,
    resolve_chat_template,
)
from jaxvlm.vl import IMAGE_TOKEN

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")

ONE_IMAGE = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is in the picture?"}]
MULTI_TURN = [
    {"role": "user", "content": f"{IMAGE_TOKEN}\nDescribe it."},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour?"},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
CONTINUE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]


def template(name: str, **fields):
    return resolve_chat_template("/models/whatever", ChatTemplateConfig(name, **fields))


# ----------------------------------------------------------------------------- built-in strings

# Vicuna: meta_instruction, eosys=' ', user='USER: ', eoh=' ', assistant='ASSISTANT: ', eoa='</s>';
# messages2prompt drops the last character of the generation prompt (the space after "ASSISTANT:").
EXPECTED = {
    "vicuna": {
        "one": f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat is in the picture? ASSISTANT:",
        "multi": (f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nDescribe it. ASSISTANT: A cat.</s>"
                  "USER: What colour? ASSISTANT:"),
        "system": "Be brief. USER: Hi ASSISTANT:",
        "continue": f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello, I",
    },
    # Llavav1(Vicuna) only changes meta_instruction.
    "llava-v1": {
        "one": f"{LLAVA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat is in the picture? ASSISTANT:",
        "multi": (f"{LLAVA_SYSTEM} USER: {IMAGE_TOKEN}\nDescribe it. ASSISTANT: A cat.</s>"
                  "USER: What colour? ASSISTANT:"),
        "system": "Be brief. USER: Hi ASSISTANT:",
        "continue": f"{LLAVA_SYSTEM} USER: Hi ASSISTANT: Hello, I",
    },
    # MistralChat: user='[INST] ', eoh=' [/INST]', eoa='</s>', everything else '' (meta_instruction '' is
    # not None, so an empty "system prompt" is written; a system message is written bare).
    "mistral": {
        "one": f"[INST] {IMAGE_TOKEN}\nWhat is in the picture? [/INST]",
        "multi": f"[INST] {IMAGE_TOKEN}\nDescribe it. [/INST]A cat.</s>[INST] What colour? [/INST]",
        "system": "Be brief.[INST] Hi [/INST]",
        "continue": "[INST] Hi [/INST]Hello, I",
    },
    # ChatmlDirect: system='<|im_start|>system\n', meta_instruction='Answer the questions.',
    # eosys/eoh/eoa='<|im_end|>', user='<|im_start|>user\n', assistant='<|im_start|>assistant\n'.
    "llava-chatml": {
        "one": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                f"{IMAGE_TOKEN}\nWhat is in the picture?<|im_end|><|im_start|>assistant\n"),
        "multi": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                  f"{IMAGE_TOKEN}\nDescribe it.<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
                  "<|im_start|>user\nWhat colour?<|im_end|><|im_start|>assistant\n"),
        "system": "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n",
        "continue": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHi<|im_end|>"
                     "<|im_start|>assistant\nHello, I"),
    },
    # BaseChatTemplate: every field ''.
    "base": {
        "one": f"{IMAGE_TOKEN}\nWhat is in the picture?",
        "multi": f"{IMAGE_TOKEN}\nDescribe it.A cat.What colour?",
        "system": "Be brief.Hi",
        "continue": "HiHello, I",
    },
}
CASES = {"one": ONE_IMAGE, "multi": MULTI_TURN, "system": WITH_SYSTEM, "continue": CONTINUE}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("case", sorted(CASES))
def test_builtin_strings_match_lmdeploy(name, case):
    assert template(name).render(CASES[case]) == EXPECTED[name][case]


def test_contract_form_of_a_single_turn():
    # The contract: "{meta_instruction} USER: <image tokens>\n{text} ASSISTANT:" with no trailing space.
    for name, system in (("vicuna", VICUNA_SYSTEM), ("llava-v1", LLAVA_SYSTEM)):
        prompt = template(name).render([{"role": "user", "content": f"{IMAGE_TOKEN}\nhi"}])
        assert prompt == f"{system} USER: {IMAGE_TOKEN}\nhi ASSISTANT:"


def llava_two_style(system: str, turns: list[tuple[str, str | None]]) -> str:
    """haotian-liu/LLaVA Conversation.get_prompt for SeparatorStyle.TWO (sep ' ', sep2 '</s>')."""
    seps = [" ", "</s>"]
    out = system + seps[0]
    for i, (role, message) in enumerate(turns):
        out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return out


def llava_mpt_style(system: str, turns: list[tuple[str, str | None]]) -> str:
    """haotian-liu/LLaVA Conversation.get_prompt for SeparatorStyle.MPT (sep '<|im_end|>')."""
    out = system + "<|im_end|>"
    for role, message in turns:
        out += f"{role}{message}<|im_end|>" if message else role
    return out


def test_llava_v1_and_vicuna_agree_with_original_llava():
    turns = [("USER", f"{IMAGE_TOKEN}\nDescribe it."), ("ASSISTANT", "A cat."), ("USER", "What colour?"),
             ("ASSISTANT", None)]
    assert template("llava-v1").render(MULTI_TURN) == llava_two_style(LLAVA_SYSTEM, turns)  # conv_llava_v1
    assert template("vicuna").render(MULTI_TURN) == llava_two_style(VICUNA_SYSTEM, turns)  # conv_vicuna_v1


def test_llava_chatml_agrees_with_original_llava():
    turns = [("<|im_start|>user\n", f"{IMAGE_TOKEN}\nDescribe it."), ("<|im_start|>assistant\n", "A cat."),
             ("<|im_start|>user\n", "What colour?"), ("<|im_start|>assistant\n", None)]
    expected = llava_mpt_style("<|im_start|>system\nAnswer the questions.", turns)  # conv_chatml_direct
    assert template("llava-chatml").render(MULTI_TURN) == expected


def test_mistral_single_turn_agrees_with_original_llava():
    # conv_mistral_instruct (LLAMA_2 style, empty system): the first turn is "[INST] {msg} [/INST]".
    # (Later turns differ: LLaVA writes " answer </s>", LMDeploy "answer</s>"; we follow LMDeploy.)
    assert template("mistral").render(ONE_IMAGE) == f"[INST] {IMAGE_TOKEN}\nWhat is in the picture? [/INST]"


def test_stop_words():
    assert template("vicuna").stop_words == ["</s>"]
    assert template("llava-v1").stop_words == ["</s>"]
    assert template("mistral").stop_words == []
    assert template("llava-chatml").stop_words == ["<|im_end|>"]
    assert template("base").stop_words == []


# ----------------------------------------------------------------------------- config overrides

def test_config_fields_override_the_template():
    t = template("llava-v1", meta_instruction="You are a vision assistant.", stop_words=["###"])
    assert t.render([{"role": "user", "content": "hi"}]) == "You are a vision assistant. USER: hi ASSISTANT:"
    assert t.stop_words == ["###"]
    t = template("vicuna", user="Q: ", assistant="A: ", eoh="\n")
    assert t.render([{"role": "user", "content": "hi"}]) == f"{VICUNA_SYSTEM} Q: hi\nA:"
    # Overriding does not change the built-in for later users.
    assert template("vicuna").render([{"role": "user", "content": "hi"}]) == f"{VICUNA_SYSTEM} USER: hi ASSISTANT:"


def test_config_name_wins_over_the_path():
    t = resolve_chat_template("liuhaotian/llava-v1.5-7b", ChatTemplateConfig("mistral"))
    assert t.name == "mistral"


def test_unknown_template_name_lists_builtins():
    with pytest.raises(ValueError) as info:
        template("chatgpt-9")
    for name in ("vicuna", "llava-v1", "llava-chatml", "mistral", "hf", "base"):
        assert repr(name) in str(info.value)


def test_config_validation_and_lmdeploy_only_fields():
    with pytest.raises(ValueError):
        ChatTemplateConfig("vicuna", system=3)
    with pytest.raises(ValueError):
        ChatTemplateConfig("vicuna", stop_words="</s>")
    with pytest.raises(ValueError):
        ChatTemplateConfig("")
    with pytest.warns(UserWarning, match="capability"):
        config = ChatTemplateConfig("vicuna", capability="chat")
    assert resolve_chat_template("/m", config).name == "vicuna"


def test_render_rejects_malformed_messages():
    t = template("vicuna")
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": ["x"]}], ["hi"], "hi"):
        with pytest.raises(ValueError):
            t.render(bad)


# ----------------------------------------------------------------------------- matching

@pytest.mark.parametrize("path, name", [
    ("liuhaotian/llava-v1.5-7b", "llava-v1"),
    ("liuhaotian/llava-v1.5-13b", "llava-v1"),
    ("llava-hf/llava-1.5-7b-hf", "llava-v1"),          # 'llava-1.5'
    ("liuhaotian/llava-v1.6-vicuna-7b", "llava-v1"),   # Vicuna.match refuses paths with 'llava'
    ("llava-hf/llava-v1.6-vicuna-13b-hf", "llava-v1"),
    ("/data/ckpt/LLaVA-V1.6-Vicuna-7B", "llava-v1"),   # matching is case-insensitive
    ("liuhaotian/llava-v1.6-mistral-7b", "mistral"),   # Llavav1.match refuses 'mistral'
    ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral"),
    ("liuhaotian/llava-v1.6-34b", "llava-chatml"),     # Llavav1.match refuses 'v1.6-34b'
    ("llava-hf/llava-v1.6-34b-hf", "llava-chatml"),
    ("lmsys/vicuna-7b-v1.5", "vicuna"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    ("someone/mixtral-8x7b-instruct", "mixtral"),
    ("llava-hf/llama3-llava-next-8b-hf", None),
    ("/models/my-finetune", None),
])
def test_match_from_path(path, name):
    assert match_template_name(path) == name
    if name is not None:
        assert resolve_chat_template(path).name == name


def test_no_match_and_no_template_falls_back_to_base_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "renamed-model")
    assert match_template_name(path) is None
    with caplog.at_level(logging.WARNING, logger="jaxvlm.chat_template"):
        with pytest.warns(UserWarning, match="using 'base'"):
            t = resolve_chat_template(path)
    assert t.name == "base"
    assert "using 'base'" in caplog.text
    assert t.render([{"role": "user", "content": "hi"}]) == "hi"


# ----------------------------------------------------------------------------- hf vs transformers

# Written for these tests in the style of the llava-hf processors' templates: images of a turn first as
# "<image>\n", text parts after, "ASSISTANT:" as the generation prompt, {% generation %} around answers.
LLAVA_STYLE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}: {% endif %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] }} {% endgeneration %}"
    "{% else %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# A LLaVA-NeXT-mistral-like one: system and assistant read content[0]['text'].
NEXT_MISTRAL_STYLE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'][0]['text'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %} [/INST]"
    "{% else %} {{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# A tokenizer-level template that reads content as a string and uses special tokens.
STRING_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "hello": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Checkpoint-like directories saved by transformers: two processors and one tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs, objects = {}, {}
        for key, chat_template in (("llava", LLAVA_STYLE), ("next", NEXT_MISTRAL_STYLE)):
            processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=make_tokenizer(),
                                       chat_template=chat_template, patch_size=14,
                                       vision_feature_select_strategy="default", image_token="<image>")
            path = tmp_path_factory.mktemp(f"proc-{key}")
            processor.save_pretrained(str(path))
            dirs[key], objects[key] = str(path), processor
        tokenizer = make_tokenizer()
        tokenizer.chat_template = STRING_STYLE
        path = tmp_path_factory.mktemp("tok-string")
        tokenizer.save_pretrained(str(path))
        dirs["string"], objects["string"] = str(path), tokenizer
    return dirs, objects


def as_hf_messages(messages: list[dict]) -> list[dict]:
    """Our messages (images first, as IMAGE_TOKEN + newline) as transformers' typed parts."""
    out = []
    for m in messages:
        text, parts = m["content"], []
        while text.startswith(IMAGE_TOKEN + "\n"):
            parts.append({"type": "image"})
            text = text[len(IMAGE_TOKEN) + 1:]
        if text or not parts:
            parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out


HF_CASES = [
    ONE_IMAGE,
    MULTI_TURN,
    [{"role": "user", "content": "Just text."}],
    [{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nCompare these."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat?"},
     {"role": "assistant", "content": "A dog."}, {"role": "user", "content": f"{IMAGE_TOKEN}\nAnd this?"}],
]


@pytest.mark.parametrize("key", ["llava", "next"])
@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_hf_matches_processor_apply_chat_template(hf_dirs, key, case):
    dirs, objects = hf_dirs
    messages = HF_CASES[case]
    ours = resolve_chat_template(dirs[key], ChatTemplateConfig("hf")).render(messages)
    reference = objects[key].apply_chat_template(as_hf_messages(messages), add_generation_prompt=True,
                                                 tokenize=False)
    assert ours == reference.replace("<image>", IMAGE_TOKEN)
    assert ours.count(IMAGE_TOKEN) == sum(m["content"].count(IMAGE_TOKEN) for m in messages)


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_hf_string_template_matches_tokenizer_apply_chat_template(hf_dirs, case):
    dirs, objects = hf_dirs
    messages = HF_CASES[case]
    t = resolve_chat_template(dirs["string"], ChatTemplateConfig("hf"))
    assert not t.uses_parts
    reference = objects["string"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reference.startswith("<s>")  # special tokens reach the template
    assert t.render(messages) == reference


def test_hf_continues_a_final_assistant_message(hf_dirs):
    dirs, objects = hf_dirs
    ours = resolve_chat_template(dirs["llava"], ChatTemplateConfig("hf")).render(CONTINUE)
    reference = objects["llava"].apply_chat_template(as_hf_messages(CONTINUE), continue_final_message=True,
                                                     tokenize=False)
    assert ours == reference == "USER: Hi ASSISTANT: Hello, I"


def test_hf_keeps_explicit_image_placement_and_literal_markers(hf_dirs):
    dirs, _ = hf_dirs
    t = resolve_chat_template(dirs["llava"], ChatTemplateConfig("hf"))
    assert t.image_marker == "<image>"
    assert t.render([{"role": "user", "content": f"Left {IMAGE_TOKEN} right {IMAGE_TOKEN}."}]) == \
        f"USER: Left {IMAGE_TOKEN} right {IMAGE_TOKEN}. ASSISTANT:"
    # A user who types the template's marker gets the text, not an image.
    assert t.render([{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat does <image> mean?"}]) == \
        f"USER: {IMAGE_TOKEN}\nWhat does <image> mean? ASSISTANT:"


def test_hf_stop_words_and_overrides(hf_dirs):
    dirs, _ = hf_dirs
    assert resolve_chat_template(dirs["llava"], ChatTemplateConfig("hf")).stop_words == ["</s>"]
    t = resolve_chat_template(dirs["llava"], ChatTemplateConfig("hf", stop_words=["<end>"]))
    assert t.stop_words == ["<end>"]
    with pytest.warns(UserWarning, match="do not apply"):
        resolve_chat_template(dirs["llava"], ChatTemplateConfig("hf", user="Q: "))


def test_hf_is_used_when_the_path_matches_nothing(hf_dirs):
    dirs, _ = hf_dirs
    assert match_template_name(dirs["llava"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        t = resolve_chat_template(dirs["llava"])
    assert isinstance(t, HFChatTemplate) and t.name == "hf"
    # A name match comes first, as in LMDeploy.
    assert isinstance(resolve_chat_template(dirs["llava"] + "/../llava-v1.5-7b", hf_chat_template=LLAVA_STYLE),
                      FieldChatTemplate)


def test_hf_files_are_read_from_model_dir_for_a_hub_id(hf_dirs):
    dirs, _ = hf_dirs
    t = resolve_chat_template("someone/renamed-model", model_dir=dirs["next"])
    assert t.name == "hf" and t.stop_words == ["</s>"] and t.special_tokens["eos_token"] == "</s>"
    assert t.render(CONTINUE[:1]) == "[INST] Hi [/INST]"


def test_hf_template_passed_directly(tmp_path):
    t = resolve_chat_template(str(tmp_path / "plain"), hf_chat_template=LLAVA_STYLE)
    assert t.name == "hf"
    assert t.render(ONE_IMAGE) == f"USER: {IMAGE_TOKEN}\nWhat is in the picture? ASSISTANT:"


def test_find_hf_chat_template_sources(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_STYLE}))
    assert find_hf_chat_template(str(legacy)) == LLAVA_STYLE
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": STRING_STYLE}]}))
    assert find_hf_chat_template(str(named)) == STRING_STYLE
    assert find_hf_chat_template(str(tmp_path / "absent")) is None


def test_hf_failures():
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_chat_template("/nonexistent/model", ChatTemplateConfig("hf"))
    with pytest.raises(ValueError, match="compile"):
        HFChatTemplate("{% for m in messages %}")
    strict = HFChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    assert strict.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ValueError, match="no system role"):
        strict.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    # A template that shows no user text is not used.
    with pytest.warns(UserWarning, match="using 'base'"):
        assert resolve_chat_template("/m/x", hf_chat_template="{{ 'constant' }}").name == "base"
