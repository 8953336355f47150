"""One JSON log line per request, with the design's fields, and never a secret."""

from __future__ import annotations

import io
import json
import re

import openai
import pytest

from conftest import ADMIN, ALICE, UPSTREAM_KEY
from proxy.logs import configure_logging


@pytest.fixture
def captured_logs():
    buffer = io.StringIO()
    configure_logging("info", "json", stream=buffer)
    yield buffer
    configure_logging("info", "console")


def request_lines(buffer):
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line["event"] == "request"]


async def test_one_summary_line_per_request_with_every_field(gateway, captured_logs):
    api = openai.AsyncOpenAI(base_url=gateway.v1, api_key=ALICE, max_retries=0)
    await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "log me please"}])
    stream = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me"}], stream=True
    )
    async for _ in stream:
        pass
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=gateway.v1, api_key="sk-wrong-secret-777", max_retries=0).models.list()
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=gateway.v1, api_key="sk-wrong-secret-777", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    lines = request_lines(captured_logs)
    assert len(lines) == 3  # two answered, one refused (GET /v1/models is not a proxied request)
    plain, streamed, refused = lines
    for line in lines:
        for name in ("request_id", "team", "key", "model", "stream", "status", "prompt_tokens",
                     "completion_tokens", "duration_ms", "ttft_ms", "moderation", "upstream", "timestamp", "level"):
            assert name in line, name
    assert plain["status"] == 200 and plain["key"] == "alice" and plain["team"] == "research"
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] == 3
    assert streamed["stream"] is True and streamed["ttft_ms"] is not None and streamed["completion_tokens"] == 2
    assert refused["status"] == 401 and refused["key"] is None

    text = captured_logs.getvalue()
    for secret in (ALICE, ADMIN, UPSTREAM_KEY, "sk-wrong-secret-777"):
        assert secret not in text
    assert "log me please" not in text  # no prompt text at info


async def test_upstream_errors_are_warnings_with_the_request_id(gateway, captured_logs):
    api = openai.AsyncOpenAI(base_url=gateway.v1, api_key=ALICE, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        await api.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_body={"mock": {"status": 500}}
        )
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line.strip()]
    warning = next(line for line in lines if line["event"] == "upstream error")
    summary = next(line for line in lines if line["event"] == "request")
    assert warning["level"] == "warning" and warning["kind"] == "http_5xx" and warning["upstream"] == "mock"
    assert warning["request_id"] == summary["request_id"]
    # The request line is rendered by the gateway, the warning by structlog: they must read alike.
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")
    assert stamp.match(summary["timestamp"]) and stamp.match(warning["timestamp"])
    assert summary["timestamp"] >= warning["timestamp"]  # the request line is its last
    assert list(summary)[-4:] == list(warning)[-4:] == ["event", "request_id", "level", "timestamp"]


async def test_the_console_format_has_the_request_line_too(gateway):
    buffer = io.StringIO()
    configure_logging("info", "console", stream=buffer)
    try:
        api = openai.AsyncOpenAI(base_url=gateway.v1, api_key=ALICE, max_retries=0)
        reply = await api.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "plain text please"}]
        )
    finally:
        configure_logging("info", "console")
    line = next(line for line in buffer.getvalue().splitlines() if " request " in line)
    assert "status=200" in line and f"request_id={reply.headers['x-request-id']}" in line


async def test_no_request_line_below_the_configured_level(gateway):
    buffer = io.StringIO()
    configure_logging("warning", "json", stream=buffer)
    try:
        api = openai.AsyncOpenAI(base_url=gateway.v1, api_key=ALICE, max_retries=0)
        await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "quiet"}])
        configure_logging("info", "json", stream=buffer)  # a new configuration takes effect at once
        await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "loud"}])
    finally:
        configure_logging("info", "console")
    assert len(request_lines(buffer)) == 1
