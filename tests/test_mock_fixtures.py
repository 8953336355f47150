"""The recorded provider shapes: the mock serves each byte for byte, and the openai SDK reads each as declared."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import aiohttp
import openai
import pytest

import provider_fixtures
from provider_fixtures import FIXTURES, SHAPES

MESSAGES = [{"role": "user", "content": "hi"}]
STREAMED = [name for name, shape in SHAPES.items() if shape.streamed]
# The openai SDK's own SSE decoder yields an event with empty data for a
# "retry:" block and for a comment after an "id:" line (the last id stays
# set), then fails to parse it as JSON: a client reading this framing
# verbatim breaks, so a gateway must re-frame it (as Sluice's "data: {json}" does).
SDK_CANNOT_READ = {"framing_event_id_retry"}
WHOLE = [name for name, shape in SHAPES.items() if not shape.streamed]


@pytest.fixture
async def client(mock_upstream):
    http_client = openai.DefaultAsyncHttpxClient(verify=False)
    async with openai.AsyncOpenAI(base_url=mock_upstream.url, api_key="x", max_retries=0, http_client=http_client) as sdk:
        yield sdk


def test_every_file_is_a_declared_shape():
    on_disk = {path.name for path in FIXTURES.iterdir() if not path.name.startswith(".")}
    assert on_disk == {shape.file for shape in SHAPES.values()}


@pytest.mark.parametrize("name", STREAMED)
def test_a_stream_splits_into_whole_events(name):
    pieces = provider_fixtures.stream(name)
    assert "".join(pieces) == (FIXTURES / SHAPES[name].file).read_bytes().decode()
    assert len(pieces) > 3 and all(piece.endswith(("\n\n", "\r\n\r\n")) for piece in pieces)


@pytest.mark.parametrize("name", STREAMED)
async def test_the_mock_serves_a_stream_verbatim(mock_upstream, name):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "mock": provider_fixtures.steer(name)}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/chat/completions", json=body) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            assert await response.read() == (FIXTURES / SHAPES[name].file).read_bytes()


@pytest.mark.parametrize("name", WHOLE)
async def test_the_mock_serves_a_whole_answer_verbatim(mock_upstream, name):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock": provider_fixtures.steer(name)}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/chat/completions", json=body) as response:
            assert response.status == 200 and response.content_type == "application/json"
            assert await response.read() == (FIXTURES / SHAPES[name].file).read_bytes()


async def test_raw_body_with_a_status_is_a_providers_own_error_verbatim(mock_upstream):
    error = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": MESSAGES, "mock": {"status": 529, "raw_body": error}}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/messages", json=body, headers=headers) as response:
            assert response.status == 529 and (await response.text()) == error


def _texts(objects: list[dict[str, Any]]) -> tuple[dict[str, str], tuple[int, int] | None, dict[str, int]]:
    """Every text-bearing field of chunks (or one whole answer) joined, and the last usage reported."""
    texts: dict[str, str] = defaultdict(str)
    usage = None
    details: dict[str, int] = {}
    for obj in objects:
        for choice in obj.get("choices") or []:
            suffix = f"[{choice['index']}]" if choice["index"] else ""
            delta = choice.get("delta") or choice.get("message") or {}
            for key in ("content", "reasoning_content", "reasoning", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    texts[key + suffix] += delta[key]
            for position, call in enumerate(delta.get("tool_calls") or []):
                texts[f"tool_calls[{call.get('index', position)}].arguments{suffix}"] += call["function"].get("arguments") or ""
            if delta.get("function_call"):
                texts[f"function_call.arguments{suffix}"] += delta["function_call"].get("arguments") or ""
            for entry in (choice.get("logprobs") or {}).get("content") or []:
                assert bytes(entry["bytes"]).decode() == entry["token"]
                texts[f"logprobs.token{suffix}"] += entry["token"]
        reported = obj.get("usage") or (obj.get("x_groq") or {}).get("usage")
        if reported:
            usage = (reported["prompt_tokens"], reported["completion_tokens"])
            details = {
                **{k: v for k, v in (reported.get("prompt_tokens_details") or {}).items() if k == "cached_tokens" and v},
                **{k: v for k, v in (reported.get("completion_tokens_details") or {}).items() if k == "reasoning_tokens" and v},
            }
    return {key: value for key, value in texts.items() if value}, usage, details


def _sse_data(text: str) -> list[str]:
    """The data of each event, per the SSE spec: LF or CRLF, optional space, comments and other fields skipped."""
    events, data = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


@pytest.mark.parametrize("name", STREAMED)
def test_each_stream_holds_what_it_declares(name):
    events = _sse_data(provider_fixtures.text(name))
    assert events[-1] == "[DONE]"
    texts, usage, details = _texts([json.loads(event) for event in events[:-1]])
    shape = SHAPES[name]
    assert texts == shape.texts and usage == shape.usage and details == shape.extra_usage


async def test_the_openai_sdk_cannot_read_retry_and_id_framing_verbatim(client):
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_body={"mock": provider_fixtures.steer("framing_event_id_retry")},
    )
    with pytest.raises(json.JSONDecodeError):
        [chunk async for chunk in stream]


@pytest.mark.parametrize("name", [name for name in STREAMED if name not in SDK_CANNOT_READ])
async def test_the_openai_sdk_reads_each_stream_as_declared(client, name):
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_body={"mock": provider_fixtures.steer(name)}
    )
    chunks = [chunk.to_dict() async for chunk in stream]
    texts, usage, details = _texts(chunks)
    shape = SHAPES[name]
    assert texts == shape.texts and usage == shape.usage and details == shape.extra_usage


@pytest.mark.parametrize("name", WHOLE)
async def test_the_openai_sdk_reads_each_whole_answer_as_declared(client, name):
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={"mock": provider_fixtures.steer(name)}
    )
    texts, usage, details = _texts([completion.to_dict()])
    shape = SHAPES[name]
    assert texts == shape.texts and usage == shape.usage and details == shape.extra_usage
