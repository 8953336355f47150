"""The command line and the process: check-config, hash-key, serve, SIGTERM, demo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from conftest import ALICE, UPSTREAM_KEY, free_port, gateway_config
from proxy.config import load_settings
from proxy.devtools.demo import banner

ROOT = Path(__file__).resolve().parent.parent


def sluice(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def write_config(tmp_path, config, name="sluice.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_hash_key_prints_the_sha256():
    result = sluice("hash-key", "my-secret")
    assert result.returncode == 0
    assert result.stdout.strip() == hashlib.sha256(b"my-secret").hexdigest()


def test_check_config_accepts_the_shipped_configs():
    for name in ("config/demo.yaml", "config/example.yaml"):
        # demo.yaml's Anthropic upstream names the key `sluice demo` sets for itself.
        result = sluice("check-config", name, env={"OPENAI_API_KEY": "sk-x", "SLUICE_DEMO_UPSTREAM_KEY": "sk-y"})
        assert result.returncode == 0, result.stderr


def test_check_config_lists_every_problem_one_per_line(tmp_path):
    config = gateway_config("http://127.0.0.1:1/v1")
    config["server"]["port"] = "eighty"
    config["server"]["colour"] = "blue"
    config["teams"][0]["limits"] = {"tokens_per_day": -5}
    config["upstreams"][0]["base_url"] = "not a url"
    path = write_config(tmp_path, config)
    result = sluice("check-config", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("server.port:") for line in lines)
    assert any(line.startswith("server.colour: unknown field") for line in lines)
    assert any(line.startswith("teams[0].limits.tokens_per_day:") for line in lines)
    assert any(line.startswith("upstreams[0].base_url:") for line in lines)
    assert len(lines) == 4
    assert "Traceback" not in result.stderr


def test_check_config_cross_references(tmp_path):
    config = gateway_config("http://127.0.0.1:1/v1")
    config["keys"][1]["team"] = "nobody"
    config["keys"].append(dict(config["keys"][0]))
    path = write_config(tmp_path, config)
    result = sluice("check-config", str(path), env={"SLUICE_TEST_UPSTREAM_KEY": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert "keys[1].team: no team is named 'nobody'" in lines
    assert "keys[2].id: the id 'alice' is used twice" in lines
    assert "upstreams[0].api_key_env: the environment variable SLUICE_TEST_UPSTREAM_KEY is not set" in lines


def test_check_config_on_unreadable_and_invalid_yaml(tmp_path):
    result = sluice("check-config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "cannot read" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    result = sluice("check-config", str(bad))
    assert result.returncode == 1 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_environment_overrides_the_file(tmp_path):
    config = gateway_config("http://127.0.0.1:1/v1")
    path = write_config(tmp_path, config)
    result = sluice("check-config", str(path), env={"SLUICE_TEST_UPSTREAM_KEY": "k", "SLUICE_SERVER__PORT": "notaport"})
    assert result.returncode == 1 and result.stderr.startswith("server.port:")


def test_serve_refuses_a_bad_config_without_a_traceback(tmp_path):
    path = write_config(tmp_path, {"server": {"port": 80, "nonsense": True}})
    result = sluice("serve", "--config", str(path))
    assert result.returncode == 1
    assert "server.nonsense: unknown field" in result.stderr
    assert "Traceback" not in result.stderr


async def _wait_until_up(url, process, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.returncode is None, "the process exited early"
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "the process never came up"
            await asyncio.sleep(0.05)


async def test_sigterm_drains_streams_then_exits_zero(tmp_path, mock_upstream):
    port = free_port()
    config = gateway_config(mock_upstream.url)
    config["server"].update(port=port, shutdown_grace_seconds=10)
    path = write_config(tmp_path, config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_until_up(url, process)
        words = " ".join(f"w{i}" for i in range(20))
        async with aiohttp.ClientSession() as streaming, aiohttp.ClientSession() as other:
            # A keep-alive connection opened before the signal, to see what a new request gets after it.
            async with other.get(url + "/readyz") as resp:
                assert resp.status == 200
            body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": words}], "mock": {"delay_ms": 50}}
            resp = await streaming.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"})
            assert resp.status == 200
            await resp.content.readany()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with other.get(url + "/readyz") as ready:
                assert ready.status == 503
            async with other.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "shutting_down"
            rest = (await resp.read()).decode()
            assert rest.endswith("data: [DONE]\n\n")  # the in-flight stream finished
        assert await asyncio.wait_for(process.wait(), 15) == 0
        out = (await process.stdout.read()).decode()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        summaries = [line for line in lines if line["event"] == "request"]
        assert any(s["status"] == 200 and s["stream"] for s in summaries)
        assert ALICE not in out and UPSTREAM_KEY not in out
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _curl_blocks(text: str) -> list[str]:
    """Each printed curl command, its continuation lines joined."""
    return [block.strip().replace("\\\n", " ") for block in text.split("\n\n") if block.strip().startswith("curl -N")]


async def test_demo_prints_a_key_and_a_curl_line_that_streams(tmp_path):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", str(port), "--delay-ms", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        await _wait_until_up(f"http://127.0.0.1:{port}", process)
        banner = b""
        while b"Press Ctrl-C" not in banner:
            banner += await asyncio.wait_for(process.stdout.readline(), 10)
        text = banner.decode()
        assert "Demo key: sk-sluice-demo" in text
        commands = _curl_blocks(text)
        paths = [shlex.split(command)[2].removeprefix(f"http://127.0.0.1:{port}") for command in commands]
        assert paths == ["/v1/chat/completions", "/v1/responses", "/v1/messages"]
        curl = await asyncio.create_subprocess_shell(commands[0], stdout=asyncio.subprocess.PIPE)
        streamed = (await asyncio.wait_for(curl.communicate(), 20))[0].decode()
        assert streamed.rstrip().endswith("data: [DONE]")
        assert "jane@example.com" not in streamed  # the demo's moderation redacts the address
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0


async def test_the_demos_curl_lines_speak_each_api_to_the_mock(mock_upstream):
    # Straight to the mock, not through the gateway: each printed request is one the
    # mock's side of that API answers (the gateway in between is the gateway's tests' job).
    text = banner("http://demo.invalid", Path("config/demo.yaml"))
    for command in _curl_blocks(text):
        words = shlex.split(command)
        url = words[2].replace("http://demo.invalid/v1", mock_upstream.url)
        headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
        body = json.loads(words[words.index("-d") + 1])
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                streamed = (await response.read()).decode()
        assert "jane@example.com" in streamed  # echoed back (no gateway, no redaction)
    assert len(mock_upstream.state.requests) == 3


def test_the_demo_routes_claude_models_to_an_anthropic_upstream(monkeypatch):
    monkeypatch.setenv("SLUICE_DEMO_UPSTREAM_KEY", "sk-y")
    upstreams = load_settings(ROOT / "config/demo.yaml").upstreams
    assert [(u.api, u.models) for u in upstreams if any(m.startswith("claude") for m in u.models)] == [
        ("anthropic", ["claude-*"])
    ]
    assert all(u.api == "openai" for u in upstreams if "gpt-4o-mini" in u.models)
