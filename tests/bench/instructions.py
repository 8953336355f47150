"""Instructions per request: what a gateway's CPU work costs, counted rather than timed.

    python -m tests.bench.instructions                       # chat and stream, Sluice, the bare proxy, the mock
    python -m tests.bench.instructions --requests 500 --only chat --targets sluice

Each target runs under valgrind's callgrind with instrumentation off; after a
warm-up it is switched on for exactly ``--requests`` requests (``--streams``
streams) and off again, and the instructions the process executed in between
are divided by their number. The count is the same from run to run within a
fraction of a percent, whatever else the machine is doing, so it shows the
effect of a change that the timed suite cannot tell from the noise of a
shared VM (``suite.py`` measures the time; this measures the work). It does
not see cache misses or system calls, which make up the rest of the time.

The baseline, measured in the same run: the mock upstream itself, under
callgrind too, hit directly with the same requests; and the bare aiohttp
pass-through (``bare_proxy.py``), the floor of any aiohttp gateway. Sluice
runs with the suite's config: all six PII rules, 10,000 block terms, the
sqlite store, limits on, a JSON log line per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.bench.harness import SECRET, free_port, start_process, stop_process, wait_healthy, words
from tests.bench.suite import sluice_config

MODEL = "gpt-4o-mini"
PROMPT_WORDS = 20
STREAM_WORDS = 200
WARMUP = 100
# Under callgrind a process runs some fifty times slower: start-up takes a while.
STARTUP_SECONDS = 300


@dataclass(frozen=True)
class Workload:
    name: str
    stream: bool
    answer_words: int


CHAT = Workload("chat", stream=False, answer_words=PROMPT_WORDS)
STREAM = Workload("stream", stream=True, answer_words=STREAM_WORDS)


def callgrind(argv: list[str], out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]


def total_instructions(out_dir: Path, stem: str) -> int:
    """The ``totals:`` of every dump callgrind wrote for one process (one per ``callgrind_control -d``)."""
    total = 0
    for dump in out_dir.glob(f"{stem}*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


async def send(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, count: int,
               concurrency: int) -> int:
    """``count`` requests, ``concurrency`` at a time; returns the content chunks read (0 for whole answers)."""
    remaining = count
    chunks = 0

    async def worker() -> None:
        nonlocal remaining, chunks
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
                async for line in resp.content:
                    chunks += line.startswith(b"data: {")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return chunks


async def measure(target: str, workload: Workload, opts: argparse.Namespace, tmp: Path) -> tuple[float, float | None]:
    """Instructions per request (and per streamed chunk) of ``target`` under ``workload``."""
    procs: list[subprocess.Popen[bytes]] = []
    err_path = tmp / f"{target}-{workload.name}.err"
    out_stem = f"{target}-{workload.name}.cg"
    try:
        with err_path.open("wb") as err:
            mock_port = free_port()
            mock_argv = [sys.executable, "-m", "proxy", "mock-upstream", "--host", "127.0.0.1",
                         "--port", str(mock_port), "--delay-ms", str(opts.stream_delay_ms if workload.stream else opts.delay_ms)]
            mock_url = f"http://127.0.0.1:{mock_port}/v1"
            if target == "mock":
                measured = start_process(callgrind(mock_argv, tmp / out_stem), err, err)
                procs.append(measured)
                url, headers, health = f"{mock_url}/chat/completions", {}, f"{mock_url}/models"
            else:
                procs.append(start_process(mock_argv, err, err))
                port = free_port()
                if target == "sluice":
                    config = sluice_config(tmp, port, {MODEL: mock_url}, not opts.no_moderation,
                                           {"store": opts.store, "sqlite_path": str(tmp / f"sluice-{workload.name}.db")})
                    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
                    headers, health = {"Authorization": f"Bearer {SECRET}"}, f"http://127.0.0.1:{port}/readyz"
                else:
                    argv = [sys.executable, "-m", "tests.bench.bare_proxy", "--port", str(port), f"--route={MODEL}={mock_url}"]
                    headers, health = {}, f"http://127.0.0.1:{port}/healthz"
                measured = start_process(callgrind(argv, tmp / out_stem), err, err)
                procs.append(measured)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
            body = {"model": MODEL, "messages": [{"role": "user", "content": words(workload.answer_words)}]}
            if workload.stream:
                body["stream"] = True
            payload = json.dumps(body).encode()
            headers = {**headers, "Content-Type": "application/json"}
            count = opts.streams if workload.stream else opts.requests
            timeout = aiohttp.ClientTimeout(total=None, sock_read=STARTUP_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await wait_healthy(session, health, measured, target, err_path, deadline_seconds=STARTUP_SECONDS)
                await send(session, url, headers, payload, WARMUP if not workload.stream else WARMUP // 10, opts.concurrency)
                control(measured.pid, "-i", "on")
                chunks = await send(session, url, headers, payload, count, opts.concurrency)
                control(measured.pid, "-i", "off")
                control(measured.pid, "-d")
        instructions = total_instructions(tmp, out_stem)
        if not instructions:
            raise RuntimeError(f"callgrind wrote no counts for {target}:\n{err_path.read_text(errors='replace')[-2000:]}")
        return instructions / count, (instructions / chunks if chunks else None)
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value / 1000:,.0f} k{unit}"


async def main_async(opts: argparse.Namespace) -> int:
    workloads = [w for w in (CHAT, STREAM) if opts.only in (None, w.name)]
    targets = opts.targets.split(",")
    print(f"instructions counted by callgrind; {opts.requests} whole answers of {PROMPT_WORDS} words, "
          f"{opts.streams} streams of {STREAM_WORDS} one-word chunks; concurrency {opts.concurrency}; "
          f"Sluice: {'no moderation' if opts.no_moderation else 'six PII rules and 10,000 terms'}, {opts.store} store")
    with tempfile.TemporaryDirectory(prefix="sluice-instr-") as tmp_name:
        for workload in workloads:
            results = {}
            for target in targets:
                print(f"  {workload.name} / {target} ...", file=sys.stderr, flush=True)
                results[target] = await measure(target, workload, opts, Path(tmp_name))
            print(f"\n{workload.name}: instructions per request (per content chunk)", flush=True)
            base = results.get("mock", (None, None))[0]
            for target, (per_request, per_chunk) in results.items():
                ratio = f"{per_request / base:.2f}x the mock" if base else ""
                print(f"  {target:7s} {fmt(per_request, 'instr'):>16s}  {fmt(per_chunk, 'instr/chunk'):>22s}  {ratio}", flush=True)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="measured whole-answer requests")
    parser.add_argument("--streams", type=int, default=20, help="measured streams")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--only", choices=("chat", "stream"), help="one workload")
    parser.add_argument("--targets", default="mock,bare,sluice", help="comma-separated: mock, bare, sluice")
    parser.add_argument("--delay-ms", type=int, default=1, help="the mock's wait before a whole answer")
    # Under callgrind a chunk takes milliseconds: with a shorter wait several events would
    # arrive in one read, which is cheaper per event than the one-event reads of the suite.
    parser.add_argument("--stream-delay-ms", type=int, default=30, help="the mock's wait per streamed chunk")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="sqlite")
    parser.add_argument("--no-moderation", action="store_true")
    opts = parser.parse_args()
    unknown = set(opts.targets.split(",")) - {"mock", "bare", "sluice"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return opts


def main() -> int:
    opts = parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    sys.exit(main())
