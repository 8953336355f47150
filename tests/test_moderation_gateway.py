"""Moderation in the gateway: streamed and whole answers, prompts, choices and tool calls."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from conftest import ALICE, gateway_config

RULES = [
    {"name": "banned", "type": "terms", "terms": ["launch codes", "forbidden"], "action": "block"},
    {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
    {"name": "ticket", "type": "regex", "pattern": "TCK-[0-9]{6}", "max_match_chars": 10, "action": "flag"},
]


@pytest.fixture
async def moderated(mock_upstream, start_gateway):
    return await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))


def body(reply, stream=True, **mock):
    return {
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": "tell me"}],
        "mock": {"reply": reply, **{k: v for k, v in mock.items() if v is not None}},
    }


async def stream_events(gw, request):
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=request, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
    payloads = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", raw
    return [json.loads(p) for p in payloads[:-1]]


def text_of(chunks, index=0):
    return "".join(
        c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"] if c["index"] == index
    )


def arguments_of(chunks):
    return "".join(
        call["function"].get("arguments") or ""
        for chunk in chunks
        for choice in chunk["choices"]
        for call in choice["delta"].get("tool_calls") or []
    )


def finish_of(chunks, index=0):
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["index"] == index and c["finish_reason"]]
    assert len(reasons) == 1, reasons
    return reasons[0]


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, None])
async def test_output_block_mid_stream_whatever_the_chunking(moderated, mock_upstream, chunk_chars):
    reply = "Sure. The launch codes are 0000 and more text follows here."
    chunks = await stream_events(moderated, body(reply, chunk_chars=chunk_chars, delay_ms=20))
    assert text_of(chunks) == "Sure. The "
    assert finish_of(chunks) == "content_filter"
    assert "launch" not in json.dumps(chunks)
    # The upstream connection was closed at once, long before its 60 chunks were sent.
    assert await mock_upstream.state.wait_for_disconnect(timeout=1.0)


async def test_redaction_in_place_keeps_the_stream_flowing(moderated):
    reply = "Write to jane.doe@example.com today, or to bob@example.org."
    chunks = await stream_events(moderated, body(reply, chunk_chars=4))
    assert text_of(chunks) == "Write to [REDACTED:email] today, or to [REDACTED:email]."
    assert finish_of(chunks) == "stop"
    assert len(chunks) > 5  # still streamed, not buffered to the end


async def test_flag_passes_the_text_and_every_action_is_counted(moderated, mock_upstream):
    chunks = await stream_events(moderated, body("Your ticket is TCK-123456.", chunk_chars=3))
    assert text_of(chunks) == "Your ticket is TCK-123456."
    await stream_events(moderated, body("mail a@b.co or c@d.co", chunk_chars=3))
    async with aiohttp.ClientSession() as session:
        async with session.get(moderated.url + "/metrics") as resp:
            text = await resp.text()
    assert 'sluice_moderation_actions_total{action="flag",direction="output",rule="ticket"} 1.0' in text
    assert 'sluice_moderation_actions_total{action="redact",direction="output",rule="email"} 2.0' in text


async def test_input_block_is_400_naming_the_rule_and_never_calls_upstream(moderated, mock_upstream):
    api = openai.AsyncOpenAI(base_url=moderated.v1, api_key=ALICE, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await api.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "give me the LAUNCH  codes"}]
        )
    assert caught.value.code == "content_filter"
    assert "banned" in caught.value.message
    assert list(mock_upstream.state.requests) == []


async def test_input_redaction_reaches_upstream_redacted(moderated, mock_upstream):
    api = openai.AsyncOpenAI(base_url=moderated.v1, api_key=ALICE, max_retries=0)
    answer = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "mail me at jane@example.com"}]
    )
    sent = mock_upstream.state.requests[-1]["body"]["messages"][0]["content"]
    assert sent == "mail me at [REDACTED:email]"
    assert answer.choices[0].message.content == "mail me at [REDACTED:email]"


async def test_each_choice_has_its_own_window(moderated):
    request = body("hello friend, mail x@example.com now", chunk_chars=2)
    request["n"] = 3
    chunks = await stream_events(moderated, request)
    for index in range(3):
        assert text_of(chunks, index) == "hello friend, mail [REDACTED:email] now"
        assert finish_of(chunks, index) == "stop"


async def test_block_in_tool_call_arguments(moderated):
    request = body("", tool_call={"name": "lookup", "arguments": '{"q": "the launch codes please"}'}, chunk_chars=3)
    chunks = await stream_events(moderated, request)
    arguments = arguments_of(chunks)
    assert arguments == '{"q": "the '
    assert finish_of(chunks) == "content_filter"


async def test_redaction_in_tool_call_arguments(moderated):
    request = body("", tool_call={"name": "send", "arguments": '{"to": "ann@example.com"}'}, chunk_chars=2)
    chunks = await stream_events(moderated, request)
    arguments = arguments_of(chunks)
    assert arguments == '{"to": "[REDACTED:email]"}'


async def test_non_streamed_answers_are_moderated_the_same_way(moderated):
    api = openai.AsyncOpenAI(base_url=moderated.v1, api_key=ALICE, max_retries=0)
    redacted = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_body={"mock": {"reply": "at a@b.co now"}}
    )
    assert redacted.choices[0].message.content == "at [REDACTED:email] now"
    blocked = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
        extra_body={"mock": {"reply": "here: launch codes 1234"}},
    )
    assert blocked.choices[0].message.content == "here: "
    assert blocked.choices[0].finish_reason == "content_filter"


async def test_legacy_completions_stream_is_moderated(moderated):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            moderated.v1 + "/completions",
            json={"model": "gpt-3.5-turbo", "prompt": "p", "stream": True, "mock": {"reply": "mail q@example.com ok", "chunk_chars": 3}},
            headers={"Authorization": f"Bearer {ALICE}"},
        ) as resp:
            raw = (await resp.read()).decode()
    chunks = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "mail [REDACTED:email] ok"
