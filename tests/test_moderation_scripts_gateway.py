"""Moderation in every script, through the gateway: HTTP only (aiohttp client), a real mock upstream.

The mock's ``mock`` body field sets its reply and how it splits it into
chunks; ``chunk_chars: 1`` sends one character per SSE event, the hardest
split for the window.
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from conftest import ALICE, gateway_config

RULES = [
    {"name": "banned", "type": "terms", "terms": ["机密文件", "秘密", "launch codes", "badword"], "action": "block"},
    {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
    {"name": "phone", "type": "pii", "entity": "phone", "action": "redact"},
]
HEADERS = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture
async def gw(mock_upstream, start_gateway):
    return await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))


def request(reply: str, *, stream: bool, prompt: str = "tell me", **mock) -> dict:
    return {
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
        "mock": {"reply": reply, **mock},
    }


async def post(gw, body: dict) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body, headers=HEADERS) as resp:
            return resp.status, (await resp.read()).decode()


def events(raw: str) -> list[dict]:
    payloads = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", raw
    return [json.loads(p) for p in payloads[:-1]]


def content(chunks: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])


def finish_reasons(chunks: list[dict]) -> list[str]:
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]


async def test_a_streamed_cjk_answer_is_blocked_mid_stream_at_one_character_chunks(gw) -> None:
    reply = "这是公开的信息。这份机密文件不能给你看，后面还有很多字。"
    status, raw = await post(gw, request(reply, stream=True, chunk_chars=1))
    assert status == 200
    chunks = events(raw)
    assert content(chunks) == "这是公开的信息。这份"  # everything before the term, nothing of it
    assert finish_reasons(chunks) == ["content_filter"]


async def test_a_latin_term_against_cjk_characters_is_blocked_in_a_stream(gw) -> None:
    status, raw = await post(gw, request("他说badword是真的", stream=True, chunk_chars=1))
    assert status == 200
    chunks = events(raw)
    assert content(chunks) == "他说"
    assert finish_reasons(chunks) == ["content_filter"]


async def test_a_prompt_in_chinese_is_refused(gw) -> None:
    status, raw = await post(gw, request("不会到这里", stream=False, prompt="请把那个秘密告诉我"))
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["code"] == "content_filter" and "banned" in error["message"]


async def test_a_russian_sentence_passes_a_latin_term_list(mock_upstream, start_gateway) -> None:
    # Each of these Russian words is spelt only with letters that look Latin ("сор" reads "cop").
    latin = {"name": "latin", "type": "terms", "terms": ["cop", "pop", "cyp", "xe"], "action": "block"}
    gw = await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": [latin]}))
    sentence = "В углу лежал сор, а рядом стоял поп и ел сыр. Хе-хе, сказал он."
    status, raw = await post(gw, request(sentence, stream=True, chunk_chars=1, prompt=sentence))
    assert status == 200
    chunks = events(raw)
    assert content(chunks) == sentence
    assert finish_reasons(chunks) == ["stop"]
    # The same letters inside a Latin sentence are a disguise, and blocked.
    status, raw = await post(gw, request("ok", stream=False, prompt="call the с\u043ep now"))
    assert status == 400 and json.loads(raw)["error"]["code"] == "content_filter"


async def test_disguised_terms_are_blocked_in_a_whole_answer(gw) -> None:
    disguises = {
        "b\u00e4dw\u00f6rd": "so ",
        "**bad**word": "so **",  # the markers before the word are not part of the match
        "bad\u200b" + "\u2060" * 40 + "word": "so ",
        "b\u0430dword": "so ",
    }
    for disguised, before in disguises.items():
        status, raw = await post(gw, request(f"so {disguised} it is", stream=False))
        assert status == 200
        answer = json.loads(raw)["choices"][0]
        assert answer["finish_reason"] == "content_filter", disguised
        assert answer["message"]["content"] == before, disguised


async def test_pii_in_other_scripts_and_formats_is_redacted_in_a_stream(gw) -> None:
    reply = "写信给 用户@例子.中国 或 o'brien@example.ie，电话 +86 138 0013 8000，图标 icon@2x.png。"
    status, raw = await post(gw, request(reply, stream=True, chunk_chars=1))
    assert status == 200
    assert content(events(raw)) == (
        "写信给 [REDACTED:email] 或 [REDACTED:email]，电话 [REDACTED:phone]，图标 icon@2x.png。"
    )
