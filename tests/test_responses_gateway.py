"""The Responses API through the real path: the openai SDK -> Sluice -> the mock model speaking it.

Streamed and not, the ``responses.stream()`` helper, moderation of every
text-bearing event in the raw bytes, input blocks, accounting, the cap and
errors.
"""

from __future__ import annotations

import json
import time

import aiohttp
import openai
import pytest

from conftest import ALICE, gateway_config
from proxy.stream.sse import SSEDecoder
from proxy.tokens import count_chat_prompt, count_text

MODEL = "gpt-4o-mini"
RULES = [
    {"name": "banned", "type": "terms", "terms": ["launch codes"], "action": "block"},
    {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
]
REDACT_REPLY = "Write to jane.doe@example.com today, please."
REDACTED = "Write to [REDACTED:email] today, please."
BLOCK_REPLY = "Sure. The launch codes are 0000 and more text follows here."


@pytest.fixture
async def moderated(mock_upstream, start_gateway):
    return await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))


def client(gw, key=ALICE):
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def mock(**fields):
    return {"mock": {k: v for k, v in fields.items() if v is not None}}


async def raw_stream(gw, request):
    """The raw bytes of a streamed answer, and its events as (event line, data)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/responses", json=request, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            assert resp.status == 200, await resp.text()
            raw = await resp.read()
    decoder = SSEDecoder()
    events = [(e.event, json.loads(e.data)) for e in decoder.feed(raw) + decoder.finish()]
    assert [body["sequence_number"] for _, body in events] == list(range(len(events)))
    assert all(name == body["type"] for name, body in events)
    return raw, [body for _, body in events]


def deltas(bodies, kind="response.output_text.delta"):
    return "".join(b["delta"] for b in bodies if b["type"] == kind)


async def test_a_whole_answer_through_the_sdk(gateway, mock_upstream):
    answer = await client(gateway).responses.create(model=MODEL, input="hello there", instructions="Be brief.")
    assert answer.status == "completed" and answer.output_text == "hello there"
    sent = mock_upstream.state.requests[-1]
    assert sent["headers"]["Authorization"] != f"Bearer {ALICE}"  # the client's key never goes upstream
    assert "stream_options" not in sent["body"] and "max_output_tokens" not in sent["body"]


async def test_a_stream_through_the_sdk_and_the_stream_helper(gateway):
    api = client(gateway)
    stream = await api.responses.create(model=MODEL, input="streamed words here", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "streamed words here"
    async with api.responses.stream(model=MODEL, input="the helper works") as helper:
        async for _ in helper:
            pass
        final = await helper.get_final_response()
    assert final.output_text == "the helper works" and final.usage.output_tokens == count_text(MODEL, "the helper works")


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_redaction_in_every_event_at_every_delta_size(moderated, size):
    raw, bodies = await raw_stream(moderated, {"model": MODEL, "input": "x", "stream": True,
                                               **mock(reply=REDACT_REPLY, chunk_chars=size, reasoning=REDACT_REPLY)})
    assert b"jane" not in raw and b"example.com" not in raw
    assert deltas(bodies) == REDACTED and deltas(bodies, "response.reasoning_summary_text.delta") == REDACTED
    final = bodies[-1]["response"]
    assert bodies[-1]["type"] == "response.completed"
    assert final["output"][0]["summary"][0]["text"] == REDACTED
    assert final["output"][1]["content"][0]["text"] == REDACTED
    done = [b for b in bodies if b["type"] in ("response.output_text.done", "response.reasoning_summary_text.done")]
    assert [b["text"] for b in done] == [REDACTED, REDACTED]


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_a_block_mid_stream_at_every_delta_size(moderated, mock_upstream, size):
    raw, bodies = await raw_stream(moderated, {"model": MODEL, "input": "x", "stream": True,
                                               **mock(reply=BLOCK_REPLY, chunk_chars=size, delay_ms=20)})
    assert b"launch" not in raw and b"0000" not in raw
    assert deltas(bodies) == "Sure. The "
    assert [b["type"] for b in bodies[-4:]] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert bodies[-4]["text"] == bodies[-3]["part"]["text"] == "Sure. The "
    final = bodies[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "content_filter"}
    assert final["output"][0]["content"][0]["text"] == "Sure. The "
    assert await mock_upstream.state.wait_for_disconnect(timeout=1.0)  # the upstream was hung up on


async def test_both_sdk_stream_paths_iterate_a_block_without_raising(moderated):
    api = client(moderated)
    stream = await api.responses.create(model=MODEL, input="x", stream=True, extra_body=mock(reply=BLOCK_REPLY))
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    async with api.responses.stream(model=MODEL, input="x", extra_body=mock(reply=BLOCK_REPLY)) as helper:
        events = [event async for event in helper]
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == "Sure. The "


async def test_function_call_arguments_refusals_and_whole_answers_are_moderated(moderated):
    api = client(moderated)
    args = '{"to": "jane.doe@example.com"}'
    stream = await api.responses.create(model=MODEL, input="x", stream=True,
                                        extra_body=mock(tool_call={"name": "mail", "arguments": args}, chunk_chars=3))
    events = [event async for event in stream]
    call = events[-1].response.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == {"to": "[REDACTED:email]"}
    whole = await api.responses.create(model=MODEL, input="x", extra_body=mock(refusal=REDACT_REPLY))
    assert whole.output[0].content[0].refusal == REDACTED
    blocked = await api.responses.create(model=MODEL, input="x", extra_body=mock(reply=BLOCK_REPLY, reasoning="fine"))
    assert blocked.status == "incomplete" and blocked.incomplete_details.reason == "content_filter"
    assert blocked.output_text == "Sure. The " and "launch" not in blocked.model_dump_json()


async def test_an_input_block_is_a_400_and_the_upstream_is_never_called(moderated, mock_upstream):
    api = client(moderated)
    inputs = [
        {"input": "tell me the launch codes"},
        {"input": "hi", "instructions": "Reveal the launch codes."},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "the launch codes"}]}]},
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "launch codes: 1"}]},
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q": "launch codes"}'}]},
        {"input": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "launch codes"}]}]},
        {"input": [{"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "launch codes"}]}]},
        {"input": "hi", "tools": [{"type": "function", "name": "f", "description": "gives launch codes", "parameters": {}}]},
    ]
    for fields in inputs:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.responses.create(model=MODEL, **fields)
        assert caught.value.code == "content_filter" and "banned" in caught.value.message, fields
    assert mock_upstream.state.requests == []
    answer = await api.responses.create(model=MODEL, input=[{"role": "user", "content": "mail jane.doe@example.com"}])
    assert answer.output_text == "mail [REDACTED:email]"  # redacted before it went upstream


async def test_usage_is_recorded_from_the_final_event_and_counted_when_absent(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    api = client(gw)
    whole = await api.responses.create(model=MODEL, input="count these words", extra_body=mock(cached_tokens=2))
    stream = await api.responses.create(model=MODEL, input="and these streamed", stream=True,
                                        extra_body=mock(reasoning="a short thought"))
    streamed = [event async for event in stream][-1].response.usage
    stream = await api.responses.create(model=MODEL, input="no usage here", stream=True, extra_body=mock(usage=False))
    async for _ in stream:
        pass
    fallback_prompt = count_chat_prompt(MODEL, [{"role": "user", "content": "no usage here"}])
    await gw.server.gateway.quotas.drain()
    totals = (await gw.server.gateway.quotas.store.usage(now=time.time())).to_dict("day")["keys"]["alice"]
    assert totals["requests"] == 3
    assert totals["prompt_tokens"] == whole.usage.input_tokens + streamed.input_tokens + fallback_prompt
    assert totals["completion_tokens"] == (
        whole.usage.output_tokens + streamed.output_tokens + count_text(MODEL, "no usage here"))
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'endpoint="responses"' in metrics


async def test_a_stream_that_breaks_off_bills_what_was_delivered(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    raw, bodies = await raw_stream(gw, {"model": MODEL, "input": "one two three four five", "stream": True,
                                        **mock(reasoning="think it over", error_after=3)})
    assert bodies[-1]["type"] == "error" and bodies[-1]["code"] == "upstream_error"
    await gw.server.gateway.quotas.drain()
    totals = (await gw.server.gateway.quotas.store.usage(now=time.time())).to_dict("day")["keys"]["alice"]
    sent = deltas(bodies, "response.reasoning_summary_text.delta"), deltas(bodies)
    assert totals["completion_tokens"] == sum(count_text(MODEL, text) for text in sent if text)


async def test_response_failed_passes_through_and_errors_keep_the_openai_shape(gateway):
    api = client(gateway)
    stream = await api.responses.create(model=MODEL, input="a b c d", stream=True, extra_body=mock(fail_after=2))
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    with pytest.raises(openai.InternalServerError):
        await api.responses.create(model=MODEL, input="x", extra_body=mock(status=500))
    with pytest.raises(openai.BadRequestError) as caught:
        await api.responses.create(model=MODEL, input=7)
    assert caught.value.body["param"] == "input" and caught.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError) as caught:
        await api.responses.create(model=MODEL, input="x", max_output_tokens=0)
    assert caught.value.body["param"] == "max_output_tokens"


async def test_the_budget_clamps_max_output_tokens_and_refuses_below_16(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["keys"][0]["limits"] = {"tokens_per_day": 60}
    gw = await start_gateway(config)
    api = client(gw)
    answer = await api.responses.create(model=MODEL, input="a few words to echo back")
    cap = mock_upstream.state.requests[-1]["body"]["max_output_tokens"]
    assert 16 <= cap < 60 and answer.status == "completed"
    left = 60 - answer.usage.total_tokens
    # A prompt that fits, leaving less than the API's minimum of 16 output tokens: refused, never sent.
    words = next(k for k in range(1, 60) if 1 <= left - count_chat_prompt(MODEL, [{"role": "user", "content": "word " * k}]) < 16)
    count = len(mock_upstream.state.requests)
    with pytest.raises(openai.RateLimitError) as caught:
        await api.responses.create(model=MODEL, input="word " * words)
    assert caught.value.code == "insufficient_quota" and "at least 16 output tokens" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(mock_upstream.state.requests) == count


async def test_an_upstream_that_ignores_the_cap_is_cut_by_the_gateway(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["keys"][0]["limits"] = {"tokens_per_day": 40}
    gw = await start_gateway(config)
    reply = " ".join(f"word{i}" for i in range(80))
    raw, bodies = await raw_stream(gw, {"model": MODEL, "input": "x", "stream": True, **mock(reply=reply, ignore_cap=True)})
    cap = mock_upstream.state.requests[-1]["body"]["max_output_tokens"]
    final = bodies[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert count_text(MODEL, deltas(bodies)) <= cap


async def test_an_abandoned_stream_is_still_recorded(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    words = " ".join(f"w{i}" for i in range(200))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gw.v1 + "/responses", json={"model": MODEL, "input": words, "stream": True, **mock(delay_ms=20)},
                                  headers={"Authorization": f"Bearer {ALICE}"})
        received = b""
        while b"response.output_text.delta" not in received:
            received += await resp.content.readany()
        resp.close()  # the client goes away mid-answer
    assert await mock_upstream.state.wait_for_disconnect(timeout=1.0)
    await gw.server.gateway.quotas.drain()
    totals = (await gw.server.gateway.quotas.store.usage(now=time.time())).to_dict("day")["keys"]["alice"]
    assert totals["requests"] == 1
    assert 1 <= totals["completion_tokens"] < count_text(MODEL, words)
    assert totals["prompt_tokens"] == count_chat_prompt(MODEL, [{"role": "user", "content": words}])


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_the_stream_helpers_snapshots_agree_with_the_final_response(moderated, size):
    args = '{"to": "jane.doe@example.com", "body": "hi"}'
    extra = mock(tool_call={"name": "mail", "arguments": args}, reasoning=REDACT_REPLY, chunk_chars=size)
    async with client(moderated).responses.stream(model=MODEL, input="x", extra_body=extra) as helper:
        snapshots = [event.snapshot async for event in helper if event.type == "response.function_call_arguments.delta"]
        final = await helper.get_final_response()
    call = final.output[1]
    assert snapshots[-1] == call.arguments and json.loads(call.arguments) == {"to": "[REDACTED:email]", "body": "hi"}
    assert final.output[0].summary[0].text == REDACTED
    assert "jane" not in final.model_dump_json()
