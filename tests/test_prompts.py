"""Prompt normalisation: every form of the contract, image placement, batches, and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxvlm.chat_template import ChatTemplateConfig, resolve_chat_template
from jaxvlm.prompts import Conversation, normalize_prompt, split_batch
from jaxvlm.vl import IMAGE_TOKEN

IMG = Image.new("RGB", (4, 4), (1, 2, 3))
IMG2 = Image.new("RGB", (5, 5), (4, 5, 6))
URL = "https://example.com/cat.png"


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- forms

def test_plain_string():
    conv = normalize_prompt("Hello")
    assert conv == Conversation(user("Hello"), [])


def test_text_image_pair():
    assert normalize_prompt(("Describe.", IMG)) == Conversation(user(f"{IMAGE_TOKEN}\nDescribe."), [IMG])
    assert normalize_prompt(("Describe.", URL)).images == [URL]


def test_text_images_pair_puts_each_image_first_with_a_newline():
    conv = normalize_prompt(("Compare.", [IMG, URL, "/tmp/x.png"]))
    assert conv.messages == user(f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nCompare.")
    assert conv.images == [IMG, URL, "/tmp/x.png"]
    assert normalize_prompt(("No images.", [])) == Conversation(user("No images."), [])


def test_image_first_pair_is_accepted_as_lmdeploy_does():
    assert normalize_prompt((IMG, "Describe.")) == normalize_prompt(("Describe.", IMG))
    assert normalize_prompt(([IMG, IMG2], "Describe.")) == normalize_prompt(("Describe.", [IMG, IMG2]))
    assert normalize_prompt((URL, "Describe.")) == normalize_prompt(("Describe.", URL))


def test_explicit_placement_is_kept():
    text = f"Left: {IMAGE_TOKEN} Right: {IMAGE_TOKEN} Which is bigger?"
    conv = normalize_prompt((text, [IMG, IMG2]))
    assert conv.messages == user(text) and conv.images == [IMG, IMG2]


def test_marker_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"2 <IMAGE_TOKEN> markers but the turn has 1 images"):
        normalize_prompt((f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", IMG))
    with pytest.raises(ValueError, match=r"1 <IMAGE_TOKEN> markers but the turn has 0 images"):
        normalize_prompt(f"{IMAGE_TOKEN} what?")


def test_openai_messages_all_part_kinds():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "First"},
            {"type": "image_url", "image_url": {"url": URL}},
            {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
            {"type": "image", "image": IMG},
            {"type": "image_data", "image_data": {"data": IMG2}},
            {"type": "text", "text": "second"},
        ]},
        {"role": "assistant", "content": "Four images."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}},
                                     {"type": "text", "text": "And this?"}]},
    ]
    conv = normalize_prompt(messages)
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"{IMAGE_TOKEN}\n" * 4 + "First\nsecond"},
        {"role": "assistant", "content": "Four images."},
        {"role": "user", "content": f"{IMAGE_TOKEN}\nAnd this?"},
    ]
    assert conv.images == [URL, "data:image/png;base64,AAAA", IMG, IMG2, "file:///tmp/a.png"]
    assert messages[1]["content"][0] == {"type": "text", "text": "First"}  # the input is not modified


def test_openai_marker_placement_per_turn():
    messages = [{"role": "user", "content": [
        {"type": "text", "text": f"Before {IMAGE_TOKEN} after."}, {"type": "image", "image": IMG}]}]
    assert normalize_prompt(messages).messages == user(f"Before {IMAGE_TOKEN} after.")
    bad = [{"role": "user", "content": [{"type": "text", "text": f"{IMAGE_TOKEN}{IMAGE_TOKEN}"},
                                        {"type": "image", "image": IMG}]}]
    with pytest.raises(ValueError, match="message 0.*2 <IMAGE_TOKEN> markers.*1 images"):
        normalize_prompt(bad)


def test_none_or_missing_content_is_empty():
    conv = normalize_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": None},
                             {"role": "user"}])
    assert [m["content"] for m in conv.messages] == ["q", "", ""]


def test_conversation_passes_through_after_a_check():
    conv = normalize_prompt(("Describe.", IMG))
    again = normalize_prompt(conv)
    assert again == conv and again is not conv
    with pytest.raises(ValueError, match="1 <IMAGE_TOKEN> markers but 0 images"):
        normalize_prompt(Conversation(user(f"{IMAGE_TOKEN}\nx"), []))


@pytest.mark.parametrize("prompt, fragment", [
    (None, "a prompt must be"),
    (42, "a prompt must be"),
    (b"bytes", "a prompt must be"),
    ({"role": "user", "content": "hi"}, "wrapped in a list"),
    (("a", "b", "c"), "tuple of 3"),
    ((3, IMG), "its text is"),
    (("text", 3), "image 0"),
    (("text", [IMG, None]), "image 1"),
    (("text", ""), "image 0"),
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": ["user"], "content": "x"}], "role must be one of"),
    ([{"content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 5}], "content must be a str or a list"),
    ([{"role": "user", "content": [5]}], "part must be a dict"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown part type"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "unknown part type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a str under 'text'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url' part needs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}], "'image_url' part needs"),
    ([{"role": "assistant", "content": [{"type": "image", "image": IMG}]}], "user messages only"),
    ([{"role": "user", "content": "x"}, "not a dict"], "only message dicts"),
    ([["nested"]], "only message dicts"),
])
def test_malformed_prompts_raise_value_error(prompt, fragment):
    with pytest.raises(ValueError, match=fragment):
        normalize_prompt(prompt)


# ----------------------------------------------------------------------------- batches

def test_split_batch():
    messages = [{"role": "user", "content": "hi"}]
    assert split_batch("hi") == (["hi"], False)
    assert split_batch(("hi", IMG)) == ([("hi", IMG)], False)
    assert split_batch(messages) == ([messages], False)  # a list of message dicts is ONE prompt
    assert split_batch([messages, messages]) == ([messages, messages], True)
    assert split_batch(["a", ("b", IMG), messages]) == (["a", ("b", IMG), messages], True)
    assert split_batch([]) == ([], True)
    conv = normalize_prompt("hi")
    assert split_batch(conv) == ([conv], False)
    for bad in (None, 3, {"role": "user", "content": "x"}, [messages[0], "b"]):
        with pytest.raises(ValueError):
            split_batch(bad)


def test_batch_elements_normalise_independently():
    prompts, was_batch = split_batch(["a", ("b", URL), [{"role": "user", "content": "c"}]])
    assert was_batch
    assert [normalize_prompt(p).messages[0]["content"] for p in prompts] == ["a", f"{IMAGE_TOKEN}\nb", "c"]


def test_end_to_end_with_the_llava_v1_template():
    conv = normalize_prompt(("What is shown?", URL))
    prompt = resolve_chat_template("liuhaotian/llava-v1.5-7b").render(conv.messages)
    assert prompt == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                      "gives helpful, detailed, and polite answers to the human's questions. USER: "
                      f"{IMAGE_TOKEN}\nWhat is shown? ASSISTANT:")
    assert resolve_chat_template("x", ChatTemplateConfig("vicuna")).render(conv.messages).count(IMAGE_TOKEN) == 1


# ----------------------------------------------------------------------------- property

KEYS = st.sampled_from(["role", "content", "type", "text", "image_url", "url", "image", "image_data", "data",
                        "name"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.binary(max_size=4),
    st.sampled_from(["system", "user", "assistant", "tool", "text", "image_url", "image", "image_data",
                     IMAGE_TOKEN, "", URL, f"a {IMAGE_TOKEN} b"]),
    st.text(max_size=8), st.just(IMG),
)
KINDS = st.sampled_from(["text", "image_url", "image", "image_data", "video", None])


def near_misses(inner):
    """Shapes close to the real ones (message lists, parts, pairs), filled with ``inner``."""
    part = st.one_of(
        st.builds(lambda kind, value: {"type": kind, kind or "x": value}, KINDS, inner),
        st.builds(lambda kind, value: {"type": kind, kind or "x": {"url": value}}, KINDS, inner),
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=4)),
        st.just({"type": "image", "image": IMG}),
    )
    message = st.fixed_dictionaries({
        "role": st.sampled_from(["user", "user", "assistant", "system", "bot"]),
        "content": st.one_of(st.text(max_size=6), inner, st.lists(part, max_size=3)),
    })
    return st.one_of(st.lists(message, min_size=1, max_size=3),
                     st.tuples(st.text(max_size=6), st.one_of(inner, st.lists(inner, max_size=3))))


JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.tuples(inner),
        st.dictionaries(KEYS, inner, max_size=4),
        near_misses(inner),
    ),
    max_leaves=20,
)
PROMPTS = st.one_of(JUNK, near_misses(JUNK), st.lists(near_misses(JUNK), max_size=3))


def check_conversation(conv: Conversation) -> None:
    assert isinstance(conv, Conversation) and conv.messages
    markers = 0
    for message in conv.messages:
        assert set(message) == {"role", "content"}
        assert message["role"] in ("system", "user", "assistant")
        assert isinstance(message["content"], str)
        markers += message["content"].count(IMAGE_TOKEN)
    assert markers == len(conv.images)
    assert all(isinstance(i, Image.Image) or (isinstance(i, str) and i) for i in conv.images)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PROMPTS)
def test_random_junk_gives_a_conversation_or_value_error(junk):
    try:
        conv = normalize_prompt(junk)
    except ValueError:
        pass
    else:
        check_conversation(conv)
    try:
        prompts, was_batch = split_batch(junk)
    except ValueError:
        return
    assert isinstance(prompts, list) and isinstance(was_batch, bool)
    for prompt in prompts:
        try:
            check_conversation(normalize_prompt(prompt))
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.one_of(st.text(max_size=6), st.lists(st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=6)),
        st.just({"type": "image", "image": IMG}),
        st.just({"type": "image_url", "image_url": {"url": URL}})), max_size=3))}), min_size=1, max_size=4))
def test_wellformed_messages_render_with_every_builtin_template(messages):
    try:
        conv = normalize_prompt(messages)
    except ValueError as exc:  # only images outside user turns, or markers typed in text, are refused
        assert "user messages only" in str(exc) or "markers" in str(exc)
        return
    check_conversation(conv)
    for name in ("vicuna", "llava-v1", "mistral", "llava-chatml", "base"):
        prompt = resolve_chat_template("m", ChatTemplateConfig(name)).render(conv.messages)
        assert prompt.count(IMAGE_TOKEN) == len(conv.images)
