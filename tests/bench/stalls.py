"""Stalls: how long one client waits because of another's big prompt, a reload, or a pathological regex prompt.

    python -m tests.bench.stalls                      # every scenario, 10 s each; about 2 minutes
    python -m tests.bench.stalls --only big,reload --seconds 5

The issue's target: no client waits more than 50 ms because of another's
regex, prompt or a reload. The VM is noisy, so each scenario's figures
stand beside the same measurement with no attacker.

Processes, each on a free loopback port and stopped at the end:

* an upstream (this module, ``--serve-upstream PORT``) that reads a body of
  any size without parsing it and answers a short chat completion at once
  (the shared mock refuses bodies over 1 MB);
* the gateway (``sluice serve``): the suite's moderation (six PII rules,
  10,000 block terms), plus a block list of 100,000 terms (the reload's
  work) and the issue's two pathological regex rules, ``(a+)+$`` and
  ``([a-z0-9]+[._-]?)+@corp\\.example``; the sqlite store; logs to a file;
* the attacker (this module, ``--attack NAME``), its own process, so its
  own client work does not slow the measuring client.

The measuring client (this process) sends one small chat request (20
words) at a time, 10 ms apart, and times each answer. Scenarios:

    none        no attacker: the baseline
    big         8 clients, each sending 4 MB prompts (one text) one after another
    many        8 clients, each sending 4 MB prompts of 100,000 short messages
    reload      POST /admin/reload, one after another (each recompiles the 100,000 terms)
    regex       8 clients sending the issue's short prompts that backtrack in Python's re
    regex-60k   8 clients sending 60,000 characters of them (a big prompt, in turns)

Printed per scenario: the victim's requests, the attacker's, and the
victim's median, p99 and worst answer time, beside the 50 ms target and the
baseline's. Not part of the test suite; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.auth import hash_key
from tests.bench.harness import (
    MODEL,
    SECRET,
    free_port,
    machine_line,
    moderation_terms,
    start_process,
    stop_process,
    wait_healthy,
    words,
)
from tests.bench.suite import moderation_rules

ADMIN_SECRET = "sk-bench-admin-0123456789"
TARGET_MS = 50.0
ATTACKERS = 8
VICTIM_PAUSE_SECONDS = 0.01
SCENARIOS = ("none", "big", "many", "reload", "regex", "regex-60k")
# The prompts: 26 characters that froze Python's re for 3.2 s on (a+)+$,
# 25 that froze it for 2.5 s on the e-mail-like rule.
NESTED_QUANTIFIER = "a" * 25 + "!"
EMAIL_LIKE = "a" * 24 + "!"

ANSWER = orjson.dumps({
    "id": "chatcmpl-stalls", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
})


# -- the upstream (a child process) ---------------------------------------------


async def _upstream_chat(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


def serve_upstream(port: int) -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", _upstream_chat)
    app.router.add_get("/health", lambda _: web.Response(text="ok"))  # type: ignore[arg-type,return-value]
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the attacker (a child process) ---------------------------------------------


def chat_bytes(messages: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": 5})


def attack_bodies(name: str) -> bytes:
    if name == "big":
        return chat_bytes([{"role": "user", "content": ("lorem ipsum dolor sit amet " * 150_000)[:4_000_000]}])
    if name == "many":
        return chat_bytes([{"role": "user", "content": "hello there"}] * 100_000)
    if name == "regex":
        return chat_bytes([{"role": "user", "content": f"{NESTED_QUANTIFIER} {EMAIL_LIKE}"}])
    if name == "regex-60k":
        unit = f"{NESTED_QUANTIFIER} {EMAIL_LIKE} "
        return chat_bytes([{"role": "user", "content": (unit * (60_000 // len(unit) + 1))[:60_000]}])
    raise ValueError(name)


async def attack(name: str, url: str) -> None:
    """Attack until SIGTERM; print ``ready`` once the first request is out, and the count at the end."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    done = 0
    statuses: dict[int, int] = {}
    started = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        if name == "reload":
            headers = {"Authorization": f"Bearer {ADMIN_SECRET}"}
            path, body, clients = "/admin/reload", b"", 1
        else:
            headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
            path, body, clients = "/v1/chat/completions", attack_bodies(name), ATTACKERS

        async def client() -> None:
            nonlocal done
            while not stop.is_set():
                started.set()
                async with session.post(url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                done += 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await started.wait()
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"done": done, "statuses": statuses}), flush=True)


# -- the gateway's config ----------------------------------------------------------


def write_config(tmp: Path, port: int, upstream_url: str) -> Path:
    suite_terms = tmp / "terms.txt"
    suite_terms.write_text("\n".join(moderation_terms(10_000)) + "\n", encoding="utf-8")
    reload_terms = tmp / "reload-terms.txt"
    reload_terms.write_text("\n".join(f"blockedterm{i} variant{i % 97}" for i in range(100_000)) + "\n")
    rules = moderation_rules(suite_terms)
    rules += [
        {"name": "reloaded", "type": "terms", "terms_file": str(reload_terms), "action": "block"},
        {"name": "nested", "type": "regex", "pattern": "(a+)+$", "max_match_chars": 64, "action": "flag"},
        {"name": "corp-mail", "type": "regex", "pattern": r"([a-z0-9]+[._-]?)+@corp\.example",
         "max_match_chars": 128, "action": "redact"},
    ]
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "upstreams": [{"name": "stalls", "base_url": upstream_url, "models": [MODEL],
                       "connect_timeout_seconds": 10, "read_timeout_seconds": 120}],
        "teams": [{"name": "bench", "models": ["*"]}],
        "keys": [{"id": "bench", "team": "bench", "sha256": hash_key(SECRET)}],
        "admin": {"key_sha256": hash_key(ADMIN_SECRET)},
        "moderation": {"rules": rules},
        "accounting": {"store": "sqlite", "sqlite_path": str(tmp / "sluice.db")},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp / "sluice.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


# -- measuring ---------------------------------------------------------------------


async def victim(session: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    """Small chat requests one at a time, ``VICTIM_PAUSE_SECONDS`` apart, for ``seconds``: each answer's time."""
    body = chat_bytes([{"role": "user", "content": words(20)}])
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        times.append(time.monotonic() - started)
        await asyncio.sleep(VICTIM_PAUSE_SECONDS)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_scenario(name: str, url: str, seconds: float, session: aiohttp.ClientSession) -> dict[str, Any]:
    attacker = None
    try:
        if name != "none":
            attacker = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.stalls", "--attack", name, "--url", url],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            assert attacker.stdout is not None
            line = await asyncio.to_thread(attacker.stdout.readline)
            if line.strip() != b"ready":
                raise RuntimeError(f"the {name} attacker did not start: {line!r}")
            await asyncio.sleep(0.5)  # the first big prompts are in the gateway
        times = await victim(session, url, seconds)
    finally:
        report: dict[str, Any] = {}
        if attacker is not None:
            attacker.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(attacker.communicate, timeout=60)
            report = json.loads(out.decode().strip().splitlines()[-1])
            stop_process(attacker)
    return {"name": name, "times": times, "attacker": report}


def print_row(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    times = result["times"]
    ms = [t * 1000 for t in times]
    median, p99, worst = statistics.median(ms), percentile(ms, 0.99), max(ms)
    attacker = result["attacker"]
    done = f"{attacker.get('done', 0):>5} {json.dumps(attacker.get('statuses', {}))}" if attacker else "    -"
    base = ""
    if baseline is not None and result is not baseline:
        b = [t * 1000 for t in baseline["times"]]
        base = f"   (none: p99 {percentile(b, 0.99):.0f}, worst {max(b):.0f})"
    verdict = "within" if worst <= TARGET_MS else "OVER"
    print(f"  {result['name']:<10} {len(times):>6}  {done:<22} {median:>6.1f} {p99:>7.1f} {worst:>7.1f}"
          f"   {verdict} {TARGET_MS:.0f} ms{base}", flush=True)


async def main_async(opts: argparse.Namespace) -> int:
    chosen = [name.strip() for name in opts.only.split(",")] if opts.only else list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if "none" not in chosen:
        chosen.insert(0, "none")
    print(machine_line())
    print(f"victim: one small chat request (20 words) at a time, {VICTIM_PAUSE_SECONDS * 1000:.0f} ms apart, "
          f"{opts.seconds:.0f} s per scenario; attackers in their own process; times in ms")
    upstream = gateway = None
    with tempfile.TemporaryDirectory(prefix="sluice-stalls-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream_port, gateway_port = free_port(), free_port()
            upstream_err = tmp / "upstream.err"
            upstream = start_process([sys.executable, "-m", "tests.bench.stalls", "--serve-upstream", str(upstream_port)],
                                     subprocess.DEVNULL, upstream_err.open("wb"))
            config = write_config(tmp, gateway_port, f"http://127.0.0.1:{upstream_port}/v1")
            gateway_err = tmp / "gateway.err"
            gateway = start_process([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                    (tmp / "gateway.log").open("wb"), gateway_err.open("wb"))
            url = f"http://127.0.0.1:{gateway_port}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                await wait_healthy(session, f"http://127.0.0.1:{upstream_port}/health", upstream, "upstream", upstream_err)
                await wait_healthy(session, url + "/readyz", gateway, "gateway", gateway_err)
                await victim(session, url, 1.0)  # warm-up: connections, encodings, the first compile
                print(f"  {'scenario':<10} {'victim':>6}  {'attacker (statuses)':<22} {'p50':>6} {'p99':>7} {'worst':>7}")
                baseline = None
                for name in chosen:
                    result = await run_scenario(name, url, opts.seconds, session)
                    baseline = result if name == "none" else baseline
                    print_row(result, baseline)
        finally:
            stop_process(gateway)
            stop_process(upstream)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="the victim's time per scenario")
    parser.add_argument("--only", help=f"comma-separated scenarios of {', '.join(SCENARIOS)} (none is always run)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--attack", choices=[s for s in SCENARIOS if s != "none"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    opts = parse_args()
    if opts.serve_upstream:
        serve_upstream(opts.serve_upstream)
        return 0
    if opts.attack:
        asyncio.run(attack(opts.attack, opts.url))
        return 0
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    sys.exit(main())
