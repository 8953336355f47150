"""Load generator for the benchmarks: POSTs one JSON body to one URL and prints what it measured.

    python -m tests.bench.loadgen --url URL --body JSON --concurrency N (--requests N | --seconds S)
        [--header "Name: value"]... [--warmup N] [--ramp-seconds R] [--stream [--release-chars K] [--hold N]]

It is a separate process so that the client's CPU (HTTP parsing, SSE lines,
JSON) is not charged to the gateway's event loop, nor to the process that
hosts it; it reports its own CPU (``client_cpu_seconds``) instead.

The ramp (worker i starts i*R/N seconds late) is there because a closed loop
against a fixed upstream delay keeps workers that started together in step:
every wave then reaches the server as one burst, and the latency measures
queueing (concurrency x CPU per request) rather than the overhead of one request.

Where an answer says how long the model took (``openai-processing-ms``, as
the mock and OpenAI send it), the latency less that time is reported too
(``outside_model_ms``): the client, the network and any gateway, without the
jitter of the model's own wait.

Output: one JSON line on stdout (in hold mode a ``ready`` line before it).
Exit code 0 even when requests failed: the caller reads ``errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=300)
MAX_ERROR_SAMPLES = 3


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool
    release_chars: int


@dataclass
class Result:
    """One request; times in ms from just before the POST."""

    error: str | None = None
    latency: float = 0.0
    model_ms: float | None = None  # the model's own time, from its openai-processing-ms header
    ttft: float | None = None
    release: float | None = None
    chunks: int = 0


@dataclass
class Tally:
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    outside_model: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    releases: list[float] = field(default_factory=list)
    chunks: int = 0

    def add(self, result: Result) -> None:
        if result.error is not None:
            self.errors += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(result.error[:200])
            return
        self.ok += 1
        self.latencies.append(result.latency)
        if result.model_ms is not None:
            self.outside_model.append(result.latency - result.model_ms)
        self.chunks += result.chunks
        if result.ttft is not None:
            self.ttfts.append(result.ttft)
        if result.release is not None:
            self.releases.append(result.release)

    def report(self, stream: bool, seconds: float, cpu: float) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "seconds": round(seconds, 4),
            "rps": round(self.ok / seconds, 2) if seconds > 0 else 0.0,
            "latency_ms": summary(self.latencies),
            # Only when every answer said how long the model took; else it would compare unlike sets.
            "outside_model_ms": summary(self.outside_model) if len(self.outside_model) == self.ok else None,
            "ttft_ms": summary(self.ttfts) if stream else None,
            "release_ms": summary(self.releases) if stream else None,
            "chunks": self.chunks,
            "chunks_per_second": round(self.chunks / seconds, 2) if seconds > 0 else 0.0,
            "client_cpu_seconds": round(cpu, 4),
        }


def summary(values: list[float]) -> dict[str, float] | None:
    """Nearest-rank percentiles, max and mean, in ms; None for no values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1], 3)

    mean = round(sum(ordered) / len(ordered), 3)
    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1], 3), "mean": mean}


# The model's own time: OpenAI's header, as the mock sends it and as gateways pass it on
# (LiteLLM prefixes the headers of the provider it forwards).
MODEL_TIME_HEADERS = ("openai-processing-ms", "llm_provider-openai-processing-ms")


def model_time_ms(headers: Any) -> float | None:
    for name in MODEL_TIME_HEADERS:
        value = headers.get(name)
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def send(session: aiohttp.ClientSession, target: Target, first: asyncio.Future[None] | None = None) -> Result:
    """One POST; ``first`` is resolved when a stream's first content arrives."""
    started = time.perf_counter()
    try:
        async with session.post(target.url, data=target.body, headers=target.headers) as resp:
            if resp.status != 200:
                return Result(error=f"HTTP {resp.status}: {(await resp.read())[:150].decode(errors='replace')}")
            if target.stream:
                return await read_stream(resp, started, target.release_chars, first)
            await resp.read()
            return Result(latency=since(started), model_ms=model_time_ms(resp.headers))
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        return Result(error=f"{type(exc).__name__}: {exc}")


async def read_stream(
    resp: aiohttp.ClientResponse, started: float, release_chars: int, first: asyncio.Future[None] | None
) -> Result:
    result = Result()
    done = False
    chars = 0
    last_content = 0.0
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
        elif b'"content"' in data:
            pieces = [(c.get("delta") or {}).get("content") for c in json.loads(data).get("choices") or ()]
            added = sum(len(piece) for piece in pieces if piece)
            if not added:
                continue
            last_content = since(started)
            result.chunks += 1
            chars += added
            if result.ttft is None:
                result.ttft = last_content
                if first is not None:
                    first.set_result(None)
            if result.release is None and chars > release_chars:
                result.release = last_content
    if not done:
        return Result(error=f"stream ended without [DONE] after {result.chunks} content chunks")
    result.latency = since(started)
    if result.release is None and result.chunks:
        result.release = last_content
    return result


@dataclass
class Budget:
    """What the closed loop may still start: a count, or a duration from the first start."""

    remaining: int | None
    seconds: float = 0.0
    started: float | None = None
    cpu_started: float = 0.0

    def take(self) -> bool:
        now = time.perf_counter()
        if self.started is None:
            self.started, self.cpu_started = now, time.process_time()
        if self.remaining is None:
            return now - self.started < self.seconds
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


async def closed_loop(
    session: aiohttp.ClientSession, target: Target, concurrency: int, ramp: float, budget: Budget
) -> dict[str, Any]:
    tally = Tally()

    async def worker(delay: float) -> None:
        await asyncio.sleep(delay)
        while budget.take():
            tally.add(await send(session, target))

    await asyncio.gather(*(worker(i * ramp / concurrency) for i in range(concurrency)))
    assert budget.started is not None  # every worker takes at least once
    return tally.report(target.stream, time.perf_counter() - budget.started, time.process_time() - budget.cpu_started)


async def hold(session: aiohttp.ClientSession, target: Target, count: int, ramp: float) -> dict[str, Any]:
    """``count`` streams at once; a ready line when each has had first content or ended."""
    tally = Tally()

    async def one(delay: float, first: asyncio.Future[None]) -> None:
        await asyncio.sleep(delay)
        tally.add(await send(session, target, first))

    started, cpu_started = time.perf_counter(), time.process_time()
    firsts = [asyncio.get_running_loop().create_future() for _ in range(count)]
    streams = [asyncio.create_task(one(i * ramp / count, first)) for i, first in enumerate(firsts)]
    await asyncio.gather(*(asyncio.wait((f, t), return_when=asyncio.FIRST_COMPLETED) for f, t in zip(firsts, streams)))
    ready = sum(first.done() for first in firsts)
    seconds_to_ready = round(time.perf_counter() - started, 4)
    print(json.dumps({"ready": ready, "failed": count - ready, "seconds_to_ready": seconds_to_ready}), flush=True)
    await asyncio.gather(*streams)
    return tally.report(True, time.perf_counter() - started, time.process_time() - cpu_started)


async def run(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()) as session:
        if args.hold:
            return await hold(session, target, args.hold, args.ramp_seconds)
        if args.warmup:
            await closed_loop(session, target, args.concurrency, args.ramp_seconds, Budget(args.warmup))
        budget = Budget(args.requests, args.seconds or 0.0)
        return await closed_loop(session, target, args.concurrency, args.ramp_seconds, budget)


def run_event_loop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Target]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="POST target")
    parser.add_argument("--header", action="append", default=[], help='"Name: value" (repeatable)')
    parser.add_argument("--body", required=True, help="the request body, a JSON string, sent as-is")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop workers")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--requests", type=int, help="measured requests in all")
    budget.add_argument("--seconds", type=float, help="measured duration (in-flight requests finish and count)")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests before the measurement")
    parser.add_argument("--ramp-seconds", type=float, default=0.0, help="worker i waits i*R/N before its first request")
    parser.add_argument("--stream", action="store_true", help="read the response as SSE")
    parser.add_argument("--release-chars", type=int, default=0, help="also time until content exceeds K characters")
    parser.add_argument("--hold", type=int, help="hold mode: N concurrent streams, a ready line at first content")
    args = parser.parse_args(argv)

    if args.hold is not None:
        if not args.stream or args.hold < 1:
            parser.error("--hold needs --stream and N >= 1")
    elif args.requests is None and args.seconds is None:
        parser.error("one of --requests or --seconds is required (or --hold)")
    if args.concurrency < 1 or args.warmup < 0 or args.ramp_seconds < 0 or args.release_chars < 0:
        parser.error("--concurrency must be >= 1; --warmup, --ramp-seconds and --release-chars >= 0")
    headers = {"Content-Type": "application/json"}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header {header!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    try:
        json.loads(args.body)
    except ValueError as exc:
        parser.error(f"--body is not JSON: {exc}")
    return args, Target(args.url, headers, args.body.encode(), args.stream, args.release_chars)


def main() -> int:
    args, target = parse_args()
    raise_fd_limit()
    print(json.dumps(run_event_loop(run(args, target))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
