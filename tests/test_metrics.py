"""/metrics: each family moves by exactly the traffic that was sent."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ALICE, gateway_config


async def scrape(gw):
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_by_exactly_what_was_sent(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"requests_per_minute": 3}  # the blocked prompt is the third
    config["moderation"] = {"rules": [{"name": "banned", "type": "terms", "terms": ["forbidden"], "action": "block"}]}
    gw = await start_gateway(config)
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    before = await scrape(gw)
    assert value(before, "sluice_active_streams") == 0

    whole = await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one two"}])
    stream = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "three four five"}], stream=True,
    )
    async for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):  # an input block, before the upstream
        await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a forbidden word"}])
    with pytest.raises(openai.RateLimitError):
        await api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-nobody", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    after = await scrape(gw)
    labels = {"team": "research", "key": "alice", "model": "gpt-4o-mini", "endpoint": "chat.completions"}
    assert value(after, "sluice_requests_total", **labels, status="200") == 2
    assert value(after, "sluice_requests_total", **labels, status="400") == 1
    assert value(after, "sluice_requests_total", **labels, status="429") == 1
    assert value(after, "sluice_requests_total", team="", key="", model="", endpoint="chat.completions", status="401") == 1
    assert value(after, "sluice_quota_rejections_total", team="research", limit="requests_per_minute") == 1
    assert value(after, "sluice_moderation_actions_total", rule="banned", action="block", direction="input") == 1
    token_labels = {"team": "research", "key": "alice", "model": "gpt-4o-mini"}
    assert value(after, "sluice_tokens_total", **token_labels, kind="completion") == whole.usage.completion_tokens + 3
    assert value(after, "sluice_tokens_total", **token_labels, kind="prompt") > whole.usage.prompt_tokens
    assert value(after, "sluice_time_to_first_token_seconds_count", model="gpt-4o-mini") == 1
    assert value(after, "sluice_request_duration_seconds_count", endpoint="chat.completions", model="gpt-4o-mini") == 4
    assert value(after, "sluice_overhead_seconds_count", endpoint="chat.completions") == 1
    assert value(after, "sluice_active_streams") == 0


async def test_upstream_errors_are_counted_by_kind(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        await api.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_body={"mock": {"status": 500}}
        )
    stream = await api.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True,
        extra_body={"mock": {"drop_after": 1}},
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    after = await scrape(gw)
    assert value(after, "sluice_upstream_errors_total", upstream="mock", kind="http_5xx") == 1
    assert value(after, "sluice_upstream_errors_total", upstream="mock", kind="mid_stream") == 1
