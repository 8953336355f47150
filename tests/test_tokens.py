"""Token counting: offline encodings, model mapping, OpenAI's chat framing, odd inputs."""

from __future__ import annotations

import base64
import dataclasses
import socket
from unittest import mock

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens

# OpenAI cookbook, "How to count tokens with tiktoken": these messages are
# 129 prompt tokens for gpt-3.5-turbo-0613 / gpt-4 and 124 for gpt-4o.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("token counting tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def encodings_dir(tmp_path):
    """An encodings directory for the test; the packaged-only setup comes back afterwards."""
    yield tmp_path
    tokens.set_encodings_dir(None)


def write_byte_vocabulary(path):
    """A valid .tiktoken file whose tokens are the 256 single bytes: one token per byte."""
    lines = [base64.b64encode(bytes([b])) + b" " + str(b).encode() for b in range(256)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def enc(name: str) -> tiktoken.Encoding:
    return tokens.get_encoding(name)


# --- loading ----------------------------------------------------------------


def test_packaged_encodings_load_without_network(no_network):
    fresh, from_user_file = tokens._load("cl100k_base")
    assert fresh.n_vocab == 100277 and not from_user_file
    tokens.preload()
    assert enc("o200k_base").n_vocab == 200019


def test_known_token_ids():
    assert enc("o200k_base").encode("hello world") == [24912, 2375]
    assert enc("cl100k_base").encode("hello world") == [15339, 1917]
    assert enc("o200k_base").encode("<|endoftext|>", allowed_special="all") == [199999]
    assert enc("cl100k_base").encode("<|endoftext|>", allowed_special="all") == [100257]


def test_encodings_are_loaded_once():
    assert tokens.get_encoding("o200k_base") is tokens.get_encoding("o200k_base")
    assert tokens.encoding_for_model("gpt-4o") is tokens.encoding_for_model("gpt-5")


def test_packaged_file_failing_its_hash_is_refused(monkeypatch):
    wrong_hash = dataclasses.replace(tokens._KNOWN_ENCODINGS["cl100k_base"], sha256="0" * 64)
    monkeypatch.setitem(tokens._KNOWN_ENCODINGS, "cl100k_base", wrong_hash)
    monkeypatch.setattr(tokens, "_loaded", {})
    with pytest.raises(tokens.EncodingError, match="sha256"):
        tokens.get_encoding("cl100k_base")


def test_unknown_encoding_name():
    with pytest.raises(KeyError):
        tokens.get_encoding("no_such_encoding")


def test_encodings_dir_adds_a_named_encoding(encodings_dir):
    write_byte_vocabulary(encodings_dir / "bytes.tiktoken")
    tokens.set_encodings_dir(encodings_dir)
    encoding = tokens.get_encoding("bytes")
    assert len(encoding.encode_ordinary("héllo")) == len("héllo".encode())
    # Special tokens (o200k's names) sit past the vocabulary, never on a byte.
    assert min(encoding._special_tokens.values()) == 256


def test_encodings_dir_overrides_a_packaged_encoding_and_reload_rereads(encodings_dir):
    packaged = tokens.encoding_for_model("gpt-4")
    write_byte_vocabulary(encodings_dir / "cl100k_base.tiktoken")
    tokens.set_encodings_dir(encodings_dir)
    assert tokens.count_text("gpt-4", "hello world") == 11
    assert tokens.count_text("gpt-4o", "hello world") == 2  # o200k is not overridden
    # Setting the directory again (a config reload) reads edited files afresh.
    (encodings_dir / "cl100k_base.tiktoken").unlink()
    tokens.set_encodings_dir(encodings_dir)
    assert tokens.count_text("gpt-4", "hello world") == 2
    tokens.set_encodings_dir(None)
    assert tokens.encoding_for_model("gpt-4o") is tokens.get_encoding("o200k_base")
    assert tokens.encoding_for_model("gpt-4").encode("hello world") == packaged.encode("hello world")


def test_corrupt_user_files_are_encoding_errors(encodings_dir):
    (encodings_dir / "broken.tiktoken").write_text("not base64 at all\n")
    # Duplicate ranks would make tiktoken's Rust core panic instead of raising.
    (encodings_dir / "duplicate.tiktoken").write_text("YQ== 0\nYg== 0\n")
    (encodings_dir / "empty.tiktoken").write_text("\n")
    tokens.set_encodings_dir(encodings_dir)
    with pytest.raises(tokens.EncodingError, match="line 1"):
        tokens.get_encoding("broken")
    with pytest.raises(tokens.EncodingError, match="share a rank"):
        tokens.get_encoding("duplicate")
    with pytest.raises(tokens.EncodingError, match="no tokens"):
        tokens.get_encoding("empty")


def test_encoding_names_cannot_reach_outside_the_directory(encodings_dir):
    write_byte_vocabulary(encodings_dir / "outside.tiktoken")
    inner = encodings_dir / "inner"
    inner.mkdir()
    tokens.set_encodings_dir(inner)
    with pytest.raises(KeyError):
        tokens.get_encoding("../outside")


# --- model -> encoding ------------------------------------------------------


@pytest.mark.parametrize(
    "model, expected",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::abc123", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("mock-model", "o200k_base"),
        ("llama-3-70b", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_for_model(model, expected):
    assert tokens.encoding_name_for_model(model) == expected
    assert tokens.encoding_for_model(model).name == expected


# --- text -------------------------------------------------------------------


def test_count_text_known_values():
    assert tokens.count_text("gpt-4o", "hello world") == 2
    assert tokens.count_text("gpt-4", "hello world") == 2
    assert tokens.count_text("gpt-4o", "") == 0
    text = "Sluice counts every token, exactly as OpenAI does: naïve café 東京 🎉"
    assert tokens.count_text("gpt-4o", text) == len(enc("o200k_base").encode(text))
    assert tokens.count_text("gpt-3.5-turbo", text) == len(enc("cl100k_base").encode(text))


def test_special_token_text_counts_as_plain_text():
    plain = enc("cl100k_base").encode("<|endoftext|>", disallowed_special=())
    assert len(plain) > 1
    assert tokens.count_text("gpt-4", "<|endoftext|>") == len(plain)
    assert tokens.count_text("gpt-4o", "a <|endofprompt|> b <|fim_prefix|>") > 3


def test_lone_surrogate_does_not_raise():
    assert tokens.count_text("gpt-4o", "broken \ud800 text") > 0


def test_a_million_spaces_do_not_crash_the_tokenizer():
    # Unsegmented, tiktoken's regex engine panics on this (a BaseException).
    assert tokens.count_text("gpt-4o", " " * 1_100_000) > 0


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(
            ["the", "Quick", "fox's", "naïve,", "東京", "42", "1234567", "end.\n\nSo", "(yes)", "—", "\t", " "]
        ),
        max_size=60,
    )
)
def test_segmented_counting_matches_whole_text_counting(words):
    """Prose (words between single spaces, the odd symbol) counts the same cut into segments."""
    text = " ".join(words)
    expected = len(enc("o200k_base").encode_ordinary(text)), len(enc("cl100k_base").encode_ordinary(text))
    with mock.patch.object(tokens, "SEGMENT_CHARS", 24):
        assert (tokens.count_text("gpt-4o", text), tokens.count_text("gpt-4", text)) == expected


# --- chat framing -----------------------------------------------------------


def test_cookbook_chat_example():
    assert tokens.count_chat_prompt("gpt-3.5-turbo-0613", COOKBOOK_MESSAGES) == 129
    assert tokens.count_chat_prompt("gpt-4", COOKBOOK_MESSAGES) == 129
    assert tokens.count_chat_prompt("gpt-4o", COOKBOOK_MESSAGES) == 124
    assert tokens.count_chat_prompt("gpt-4o-mini", COOKBOOK_MESSAGES) == 124


def test_chat_framing_arithmetic():
    o200k = enc("o200k_base")

    def n(text: str) -> int:
        return len(o200k.encode(text))

    assert tokens.count_chat_prompt("gpt-4o", []) == 3
    one = [{"role": "user", "content": "hello world"}]
    assert tokens.count_chat_prompt("gpt-4o", one) == 3 + n("user") + n("hello world") + 3
    named = [{"role": "user", "name": "bob", "content": "hi"}]
    assert tokens.count_chat_prompt("gpt-4o", named) == 3 + n("user") + n("bob") + 1 + n("hi") + 3


def test_chat_content_parts_count_only_text():
    parts = [
        {"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "text", "text": " this picture"},
        ]}
    ]
    as_string = [{"role": "user", "content": "describe"}]
    extra = tokens.count_text("gpt-4o", " this picture")
    assert tokens.count_chat_prompt("gpt-4o", parts) == tokens.count_chat_prompt("gpt-4o", as_string) + extra


def test_chat_counts_tool_calls_and_tool_results():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}

    def n(text: str) -> int:
        return tokens.count_text("gpt-4o", text)

    call_text = n("get_weather") + n('{"city": "Paris"}')
    assert tokens.count_chat_prompt("gpt-4o", [assistant]) == 3 + n("assistant") + call_text + 3
    assert tokens.count_chat_prompt("gpt-4o", [tool]) == 3 + n("tool") + n("call_1") + n("sunny") + 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=8,
)
message_like = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id", "function_call", "other"]),
    json_values,
    max_size=6,
)


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(message_like | json_values, max_size=5) | json_values)
def test_chat_count_never_raises(messages):
    assert tokens.count_chat_prompt("gpt-4o", messages) >= 3


# --- completions prompt -----------------------------------------------------


def test_prompt_shapes():
    assert tokens.count_prompt("gpt-4o", "hello world") == 2
    assert tokens.count_prompt("gpt-4o", ["hello world", "hello"]) == 3
    assert tokens.count_prompt("gpt-4o", [24912, 2375, 13]) == 3
    assert tokens.count_prompt("gpt-4o", [[1, 2], [3, 4, 5]]) == 5
    assert tokens.count_prompt("gpt-4o", []) == 0
    assert tokens.count_prompt("gpt-4o", "") == 0


@settings(max_examples=100, deadline=None)
@given(prompt=json_values)
def test_prompt_count_never_raises(prompt):
    assert tokens.count_prompt("gpt-3.5-turbo-instruct", prompt) >= 0
