"""A real Prometheus scrapes a real gateway.

The test runs the `prometheus` binary on loopback with the sluice job of
deploy/prometheus/prometheus.yml, its target pointed at a gateway under test
and its interval cut to a second, sends known traffic through the gateway,
and reads the counts back through Prometheus's HTTP query API. The alert rules
of deploy/prometheus/alerts.yml load and evaluate against the live series.

Skipped when prometheus is not installed, unless SLUICE_REQUIRE_PROMETHEUS=1
(CI), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import ALICE, free_port, gateway_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DEPLOY_GATEWAY_CONFIG = DEPLOY / "config" / "sluice.yaml"
WAIT_SECONDS = 30


def require_prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("SLUICE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(message + "; SLUICE_REQUIRE_PROMETHEUS=1 requires it")
        pytest.skip(message)
    return path


def scrape_config_for(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the sluice job aimed at `target`, every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sluice"]
    for key in ("scrape_interval", "scrape_timeout"):
        job.pop(key, None)
    assert job.get("static_configs"), "the sluice job has a static target to replace"
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]  # the other jobs point at compose hosts
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config.get("rule_files", [])]
    config.pop("alerting", None)
    return config


async def wait_for(check: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll until `check` returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession):
        self.url = url
        self.session = session

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.session.get(self.url + path, params=params) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", body
            return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector"
        return data["result"]

    async def value(self, promql: str) -> float | None:
        result = await self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


@contextlib.asynccontextmanager
async def running_prometheus(config: dict[str, Any], tmp_path: Path):
    binary = require_prometheus()
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def ready() -> bool:
                if process.returncode is not None:
                    pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url + "/-/ready") as resp:
                        return resp.status == 200
                return False

            await wait_for(ready, "prometheus to be ready")
            yield Prometheus(url, session)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_prometheus_scrapes_the_gateway_and_evaluates_the_alerts(mock_upstream, start_gateway, tmp_path):
    require_prometheus()
    # Serve /metrics as the deploy config does: on its own port when it sets one.
    config = gateway_config(mock_upstream.url)
    separate_metrics = yaml.safe_load(DEPLOY_GATEWAY_CONFIG.read_text())["server"].get("metrics_port") is not None
    if separate_metrics:
        config["server"]["metrics_port"] = 0
    gw = await start_gateway(config)
    metrics_port = gw.server.metrics_port if separate_metrics else gw.server.port
    target = f"127.0.0.1:{metrics_port}"
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count these words"}]}

    for _ in range(2):
        await api.chat.completions.create(**chat)

    async with running_prometheus(scrape_config_for(target), tmp_path) as prometheus:
        ok = 'sum(sluice_requests_total{job="sluice", status="200"})'

        def equals(promql: str, expected: float) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await prometheus.value(promql) == expected
            return check

        await wait_for(equals(ok, 2), f"{ok} == 2 (the first scrape)")
        (series,) = await prometheus.query('sluice_requests_total{status="200"}')
        assert series["metric"] == {
            "__name__": "sluice_requests_total", "job": "sluice", "instance": target,
            "team": "research", "key": "alice", "model": "gpt-4o-mini", "endpoint": "chat.completions", "status": "200",
        }
        assert await prometheus.value(f'up{{job="sluice", instance="{target}"}}') == 1

        # More traffic: later scrapes see it.
        stream = await api.chat.completions.create(**chat, stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-nobody", max_retries=0).chat.completions.create(**chat)
        await wait_for(equals(ok, 3), f"{ok} == 3 (a later scrape)")
        await wait_for(equals('sum(sluice_requests_total{status="401"})', 1), "the 401 in Prometheus")
        assert await prometheus.value('sum(sluice_time_to_first_token_seconds_count{model="gpt-4o-mini"})') == 1
        assert await prometheus.value('sum(sluice_tokens_total{team="research", kind="completion"})') > 0

        # The deploy rules loaded, and every one evaluates without error against live series.
        expected_groups = yaml.safe_load((PROMETHEUS_CONFIG.parent / "alerts.yml").read_text())["groups"]

        async def rules_evaluated() -> Any:
            groups = (await prometheus.get("/api/v1/rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if not rules or any(rule["health"] == "unknown" for rule in rules):
                return False
            return groups

        groups = await wait_for(rules_evaluated, "the alert rules to be evaluated")
        assert [g["name"] for g in groups] == [g["name"] for g in expected_groups]
        assert [r["name"] for g in groups for r in g["rules"]] == [
            r["alert"] for g in expected_groups for r in g["rules"]
        ]
        for rule in (r for g in groups for r in g["rules"]):
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        # Healthy traffic: nothing fires (the 401 is not an error rate the rules care about).
        alerts = (await prometheus.get("/api/v1/alerts"))["alerts"]
        assert [a for a in alerts if a["state"] == "firing"] == []
