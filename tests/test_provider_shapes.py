"""Every recorded provider shape through the real path: the openai SDK, Sluice with an e-mail rule, the mock replaying it.

For each shape: the SDK reads it, no byte of the address reaches the client
in any field, each field's text is the provider's with the address redacted,
and the ledger bills the provider's own usage where it gave one.
"""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from conftest import ALICE, gateway_config
from provider_fixtures import EMAIL, SHAPES, steer
from proxy.tokens import count_text

REDACTED = "[REDACTED:email]"
MODEL = "gpt-4o-mini"


@pytest.fixture
async def redacting(mock_upstream, start_gateway):
    rules = [{"name": "email", "type": "pii", "entity": "email", "action": "redact"}]
    return await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": rules}))


def collect_stream(payloads: list[str]) -> dict[str, str]:
    """Each text field joined, named as ``Shape.texts`` names them."""
    texts: dict[str, str] = {}

    def add(name: str, index: int, value) -> None:
        if isinstance(value, str) and value:
            key = name if index == 0 else f"{name}[{index}]"
            texts[key] = texts.get(key, "") + value

    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            for name in ("content", "reasoning_content", "reasoning", "refusal"):
                add(name, index, delta.get(name))
            for call in delta.get("tool_calls") or ():
                add(f"tool_calls[{call['index']}].arguments", index, (call.get("function") or {}).get("arguments"))
            add("function_call.arguments", index, (delta.get("function_call") or {}).get("arguments"))
            for entry in ((choice.get("logprobs") or {}).get("content") or ()):
                add("logprobs.token", index, entry.get("token"))
    return texts


async def billed(gw) -> tuple[int, int]:
    await gw.server.gateway.quotas.drain()
    report = await gw.server.gateway.quotas.store.usage(now=time.time())
    day = report.keys["alice"].day if "alice" in report.keys else None
    return (day.prompt_tokens, day.completion_tokens) if day else (0, 0)


@pytest.mark.parametrize("name", sorted(SHAPES))
async def test_every_field_of_every_shape_is_moderated_and_billed(redacting, name):
    shape = SHAPES[name]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": shape.streamed,
            "mock": steer(name)}
    if name == "logprobs":
        body["logprobs"] = True
    if name == "n2_interleaved":
        body["n"] = 2
    before = await billed(redacting)
    async with aiohttp.ClientSession() as session:
        async with session.post(redacting.v1 + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw
    assert EMAIL.encode() not in raw and b"jane@" not in raw
    if shape.streamed:
        payloads = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        texts = collect_stream(payloads)
    else:
        message = json.loads(raw)["choices"][0]["message"]
        texts = {k: message[k] for k in ("content", "reasoning_content") if message.get(k)}
    for field, text in shape.texts.items():
        if field == "logprobs.token":
            # Entries whose text was redacted are dropped, never rewritten: the rest are the provider's.
            assert EMAIL not in texts.get(field, "")
            continue
        assert texts.get(field) == text.replace(EMAIL, REDACTED), field
    after = await billed(redacting)
    if shape.usage is not None:
        assert (after[0] - before[0], after[1] - before[1]) == shape.usage
    else:
        counted = sum(count_text(MODEL, t) for f, t in shape.texts.items() if not f.startswith("logprobs"))
        assert after[1] - before[1] == counted


async def test_the_sdk_reads_every_streamed_shape(redacting):
    import openai

    client = openai.AsyncOpenAI(base_url=redacting.v1, api_key=ALICE, max_retries=0)
    for name, shape in sorted(SHAPES.items()):
        if not shape.streamed:
            continue
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            n=2 if name == "n2_interleaved" else 1, extra_body={"mock": steer(name)})
        content = ""
        async for part in stream:
            for choice in part.choices:
                content += choice.delta.content or ""
        assert EMAIL not in content, name
    await client.close()
