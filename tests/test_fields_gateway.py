"""Every field a user or a model reads, through the real path: the openai SDK, Sluice, a mock replaying provider shapes.

Streams are replayed verbatim with the mock's ``raw`` option, so each test
sends exactly the bytes a provider would (Azure's filter results, DeepSeek's
and vLLM's reasoning, refusals, logprobs, Groq's usage, ...).
"""

from __future__ import annotations

import json
import time

import aiohttp
import openai
import pytest

from conftest import ALICE, gateway_config
from proxy.tokens import count_text, encoding_for_model

RULES = [
    {"name": "banned", "type": "terms", "terms": ["launch codes"], "action": "block"},
    {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
]
MODEL = "gpt-4o-mini"


@pytest.fixture
async def moderated(mock_upstream, start_gateway):
    return await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))


def client(gw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)


def chunk(delta=None, finish=None, index=0, **extra):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish, **extra}]}


def replay(events, framing="data: ", end="\n\n"):
    return [f"{framing}{e if isinstance(e, str) else json.dumps(e)}{end}" for e in events]


async def stream_texts(gw, raw, fields=("content", "reasoning_content", "reasoning", "refusal"), **request):
    """Stream through the SDK; the text of each field, the finish reasons and the raw chunks."""
    texts = {name: "" for name in fields}
    finishes = []
    chunks = []
    stream = await client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"mock": {"raw": raw}}, **request)
    async for part in stream:
        chunks.append(part)
        for choice in part.choices:
            extra = choice.delta.model_extra or {}
            for name in fields:
                value = getattr(choice.delta, name, None) if name in ("content", "refusal") else extra.get(name)
                texts[name] += value or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return texts, finishes, chunks


async def billed(gw) -> tuple[int, int]:
    """(prompt, completion) tokens alice has been billed today, from the ledger."""
    await gw.server.gateway.quotas.drain()
    report = await gw.server.gateway.quotas.store.usage(now=time.time())
    day = report.keys["alice"].day if "alice" in report.keys else None
    return (day.prompt_tokens, day.completion_tokens) if day else (0, 0)


async def test_reasoning_in_both_spellings_and_a_mixed_delta(moderated):
    for name in ("reasoning_content", "reasoning"):
        raw = replay([chunk({"role": "assistant", name: "mail bob@exa"}), chunk({name: "mple.com th", "content": "Sure"}),
                      chunk({name: "en", "content": ", launch codes"}), chunk({}, "stop"), "[DONE]"])
        texts, finishes, _ = await stream_texts(moderated, raw)
        assert texts[name] == "mail [REDACTED:email] then"  # the piece beside the first content is kept
        assert texts["content"] == "Sure, "
        assert finishes == ["content_filter"]


async def test_refusal_and_legacy_function_call_arguments(moderated):
    raw = replay([chunk({"role": "assistant", "refusal": "I will not share launch"}), chunk({"refusal": " codes"}), chunk({}, "stop"), "[DONE]"])
    texts, finishes, _ = await stream_texts(moderated, raw)
    assert "launch" not in texts["refusal"] and finishes == ["content_filter"]
    raw = replay([chunk({"role": "assistant", "function_call": {"name": "send", "arguments": '{"to": "bob@'}}),
                  chunk({"function_call": {"arguments": 'example.com"}'}}), chunk({}, "function_call"), "[DONE]"])
    _, _, chunks = await stream_texts(moderated, raw)
    arguments = "".join((c.choices[0].delta.function_call.arguments or "") for c in chunks if c.choices and c.choices[0].delta.function_call)
    assert json.loads(arguments) == {"to": "[REDACTED:email]"}


async def test_parallel_tool_calls_with_split_arguments(moderated):
    raw = replay([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "mail", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "note", "arguments": '{"t": "x'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"to": "bob@examp'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": 'y"}'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'le.com"}'}}]}),
        chunk({}, "tool_calls"), "[DONE]"])
    _, finishes, chunks = await stream_texts(moderated, raw)
    args: dict[int, str] = {}
    for c in chunks:
        for call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
    assert json.loads(args[0]) == {"to": "[REDACTED:email]"} and json.loads(args[1]) == {"t": "xy"}
    assert finishes == ["tool_calls"]


async def test_logprobs_follow_their_text_and_never_spell_a_redaction(moderated):
    tokens = ["Write", " to", " bob", "@example", ".com", " now"]
    events = [chunk({"role": "assistant", "content": ""}, logprobs={"content": [], "refusal": None})]
    for token in tokens:
        entry = {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}
        events.append(chunk({"content": token}, logprobs={"content": [entry], "refusal": None}))
    events += [chunk({}, "stop"), "[DONE]"]
    _, _, chunks = await stream_texts(moderated, replay(events), logprobs=True)
    sent = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    spelled = [e.token for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content for e in c.choices[0].logprobs.content]
    assert "bob" not in sent and "bob" not in "".join(spelled)
    assert sent.startswith("Write to") and sent.endswith(" now")
    assert spelled == ["Write", " to", " now"]


async def test_n2_interleaved_azure_filters_and_framings(moderated):
    azure_first = {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    events = [azure_first,
              chunk({"role": "assistant", "content": "mail bob@"}, index=0, content_filter_results={}),
              chunk({"role": "assistant", "content": "fine"}, index=1),
              chunk({"content": "example.com"}, index=0), chunk({}, "stop", index=1), chunk({}, "stop", index=0), "[DONE]"]
    for framing, end in (("data: ", "\n\n"), ("data:", "\r\n\r\n")):
        texts: dict[int, str] = {}
        stream = await client(moderated).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, n=2,
            extra_body={"mock": {"raw": [": keep-alive\n\n", "retry: 1000\n"] + replay(events, framing, end)}})
        async for part in stream:
            for choice in part.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        assert texts == {0: "mail [REDACTED:email]", 1: "fine"}


async def test_provider_usage_variants_are_billed_right(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))
    groq = replay([chunk({"role": "assistant", "content": "hello"}),
                   {**chunk({}, "stop"), "x_groq": {"id": "req", "usage": {"prompt_tokens": 44, "completion_tokens": 11, "total_tokens": 55}}}, "[DONE]"])
    cumulative = replay([{**chunk({"content": w}), "usage": {"prompt_tokens": 7, "completion_tokens": i + 1}} for i, w in enumerate(["a", " b", " c"])]
                        + [chunk({}, "stop"), "[DONE]"])
    llama = replay([chunk({"content": "plain words here"}), {**chunk({}, "stop"), "timings": {"predicted_n": 3}}, "[DONE]"])
    expected = [(44, 11), (7, 3), (None, count_text(MODEL, "plain words here"))]
    for raw, (prompt, completion) in zip((groq, cumulative, llama), expected):
        before = await billed(gw)
        await stream_texts(gw, raw)
        after = await billed(gw)
        assert after[1] - before[1] == completion
        if prompt is not None:
            assert after[0] - before[0] == prompt


async def test_ollama_stream_without_usage_counts_reasoning_too(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    raw = replay([chunk({"role": "assistant", "reasoning_content": "Let me think about the question for a while."}),
                  chunk({"content": "Forty-two."}), chunk({}, "stop"), "[DONE]"])
    await stream_texts(gw, raw)
    assert (await billed(gw))[1] == count_text(MODEL, "Let me think about the question for a while.") + count_text(MODEL, "Forty-two.")


async def test_history_tool_arguments_and_tool_descriptions_are_moderated(moderated, mock_upstream):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "send", "arguments": '{"to": "bob@example.com"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent"},
    ]
    tools = [{"type": "function", "function": {"name": "send", "description": "Mail carol@example.com", "parameters": {}}}]
    await client(moderated).chat.completions.create(model=MODEL, messages=messages, tools=tools)
    sent = mock_upstream.state.requests[-1]["body"]
    assert json.loads(sent["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"to": "[REDACTED:email]"}
    assert sent["tools"][0]["function"]["description"] == "Mail [REDACTED:email]"
    with pytest.raises(openai.BadRequestError) as info:
        await client(moderated).chat.completions.create(model=MODEL, messages=messages, tools=[
            {"type": "function", "function": {"name": "x", "description": "the launch codes", "parameters": {}}}])
    assert info.value.code == "content_filter"


async def test_prompts_as_token_ids_are_moderated(moderated, mock_upstream):
    ids = encoding_for_model(MODEL).encode("send the launch codes")
    with pytest.raises(openai.BadRequestError) as info:
        await client(moderated).completions.create(model=MODEL, prompt=ids)
    assert info.value.code == "content_filter"
    embedding_ids = encoding_for_model("text-embedding-3-small").encode("send the launch codes")
    with pytest.raises(openai.BadRequestError):
        await client(moderated).embeddings.create(model="text-embedding-3-small", input=[embedding_ids])
    mail = encoding_for_model(MODEL).encode("write to bob@example.com")
    await client(moderated).completions.create(model=MODEL, prompt=mail)
    sent = mock_upstream.state.requests[-1]["body"]["prompt"]
    assert encoding_for_model(MODEL).decode(sent) == "write to [REDACTED:email]"
    with pytest.raises(openai.BadRequestError) as info:
        await client(moderated).completions.create(model=MODEL, prompt=[10**9])
    assert info.value.code == "invalid_request"


async def test_headers_once_and_no_versions(moderated):
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi there"}]}
        async with session.post(moderated.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            await resp.read()
            assert resp.headers.getall("Content-Type") == ["text/event-stream"]
            assert resp.headers.getall("Server") == ["sluice"]
        async with session.get(moderated.v1 + "/models") as resp:
            assert resp.status == 401 and resp.headers.getall("Server") == ["sluice"]


async def test_whole_answers_with_reasoning_and_detailed_usage(moderated):
    whole = {"id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                 "role": "assistant", "content": "Write to bob@example.com", "reasoning_content": "carol@example.com knows", "refusal": None}}],
             "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
                       "prompt_tokens_details": {"cached_tokens": 20}, "completion_tokens_details": {"reasoning_tokens": 5}}}
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "mock": {"raw_body": json.dumps(whole)}}
        async with session.post(moderated.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
    message = answer["choices"][0]["message"]
    assert message["content"] == "Write to [REDACTED:email]"
    assert message["reasoning_content"] == "[REDACTED:email] knows"
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}
    assert await billed(moderated) == (30, 12)
