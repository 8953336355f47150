"""The benchmark suite: every scenario direct to the mock model, through Sluice and through LiteLLM, in one run.

    python -m tests.bench.suite                       # about 6 minutes; add the peer with SLUICE_BENCH_LITELLM
    SLUICE_BENCH_LITELLM=/path/to/venv/bin/python python -m tests.bench.suite
    python -m tests.bench.suite --make-litellm-venv /tmp/litellm-venv   # build the peer's venv from PyPI first
    python -m tests.bench.suite --only chat-c50,stream-c50 --seconds 5
    python -m tests.bench.suite --profile /tmp/sluice.prof              # Sluice under cProfile; read the profile

Services, each its own process on a free loopback port, stopped at the end:
three mock models (one per pace: a whole answer after ``--delay-ms``, a
stream with ``--chunk-delay-ms`` before each word, and a slow stream for the
open-streams scenario), Sluice (``sluice serve``: moderation with all six PII
rules and a 10,000-term block list, the sqlite store (``--store``), limits set far above
the load so the limiter runs but never refuses, JSON logs at info to a file),
and, when ``SLUICE_BENCH_LITELLM`` names a Python with ``litellm[proxy]``,
LiteLLM's proxy routed to the same mocks; also a bare aiohttp pass-through,
the floor of the HTTP stack. The load comes from ``tests/bench/loadgen.py``,
a separate process per run. Each target runs alone on one CPU, the load and
the mocks on the others (``Placement``; ``--no-pin`` to share).

Scenarios run one after another; within one, the targets in turn (the order
turns each round), each after a warm-up at the same concurrency. Figures are
set against the direct run of the same scenario, so they compare like with
like on whatever the machine is doing. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.auth import hash_key
from proxy.config import ModerationConfig
from proxy.moderation import ModerationEngine
from tests.bench import litellm_peer
from tests.bench.harness import (
    MIB,
    REPO,
    SECRET,
    cpu_seconds,
    free_port,
    machine_line,
    moderation_terms,
    pin,
    rss_bytes,
    start_process,
    stop_process,
    wait_healthy,
    words,
)
from tests.redis_server import RedisServer

# One mock per pace, told apart by model name, so every gateway routes by model alone.
WHOLE_MODEL, STREAM_MODEL, SLOW_MODEL = "gpt-4o-mini", "gpt-4o", "gpt-4.1"
PII_ENTITIES = ("email", "phone", "credit_card", "ipv4", "iban", "secret")
TERMS = 10_000
LITELLM_KEY = "sk-litellm-bench-master-key"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    model: str
    answer_words: int  # the mock echoes the prompt, one word per streamed chunk
    concurrency: int
    stream: bool = False
    hold: bool = False  # open every stream at once and measure memory
    burst: bool = False  # start every stream within one chunk delay, not over --stream-ramp-seconds
    single_round: bool = False  # long enough (and slow enough through a slow peer) to run once


SCENARIOS = (
    Scenario("chat-c1", "non-streamed small chat, concurrency 1", WHOLE_MODEL, 20, 1),
    Scenario("chat-c50", "non-streamed small chat, concurrency 50", WHOLE_MODEL, 20, 50),
    Scenario("chat-c200", "non-streamed small chat, concurrency 200", WHOLE_MODEL, 20, 200),
    Scenario("stream-c50", "streamed 200-token answers, concurrency 50", STREAM_MODEL, 200, 50, stream=True),
    Scenario("stream-burst-c50", "streamed 200-token answers, concurrency 50, all started within one chunk delay",
             STREAM_MODEL, 200, 50, stream=True, burst=True),
    Scenario("stream-c500", "streamed 200-token answers, concurrency 500", STREAM_MODEL, 200, 500, stream=True,
             single_round=True),
    Scenario("open-2000", "2,000 concurrent open streams", SLOW_MODEL, 12, 2000, stream=True, hold=True,
             single_round=True),
)


@dataclass
class Target:
    """Where a run sends its load, and the process whose CPU and memory it reports."""

    name: str
    base_url: str  # ends in /v1
    headers: dict[str, str]
    pid: int | None  # None for direct: the mock is the baseline, not a gateway


@dataclass
class Run:
    """One scenario against one target: what the load generator saw, and what the server used."""

    load: dict[str, Any]
    cpu_seconds: float = math.nan  # the target process (tree)
    rss_peak: float = math.nan  # bytes, sampled
    rss_before: float = math.nan
    rss_ready: float = math.nan  # hold mode: with every stream open
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each round's load, for paired differences


@dataclass
class Services:
    mocks: dict[str, str] = field(default_factory=dict)  # model -> base url
    mock_pids: list[int] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    redis: RedisServer | None = None


# -- configs -------------------------------------------------------------------


def moderation_rules(terms_file: Path) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"name": f"pii-{entity}", "type": "pii", "entity": entity, "action": "redact"} for entity in PII_ENTITIES
    ]
    rules.append({"name": "banned", "type": "terms", "terms_file": str(terms_file), "match": "word", "action": "block"})
    return rules


def sluice_config(tmp: Path, port: int, mocks: dict[str, str], moderation: bool,
                  accounting: dict[str, str] | None = None, log_level: str = "info") -> Path:
    big = 10**12
    terms_file = tmp / "terms.txt"
    terms_file.write_text("\n".join(moderation_terms(TERMS)) + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "upstreams": [
            {"name": model.replace(".", "-"), "base_url": url, "models": [model],
             "connect_timeout_seconds": 10, "read_timeout_seconds": 120}
            for model, url in mocks.items()
        ],
        # Limits far above the load: the limiter, the clamp of max_tokens and the ledger all run, never refuse.
        "teams": [{"name": "bench", "models": ["*"], "limits": {
            "requests_per_minute": big, "tokens_per_minute": big, "tokens_per_day": big,
            "tokens_per_month": big, "max_concurrent_requests": 10**6}}],
        "keys": [{"id": "bench", "team": "bench", "sha256": hash_key(SECRET)}],
        "accounting": accounting or {"store": "sqlite", "sqlite_path": str(tmp / "sluice.db")},
        "logging": {"level": log_level, "format": "json"},
    }
    if moderation:
        config["moderation"] = {"rules": moderation_rules(terms_file)}
    path = tmp / "sluice.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def request_body(scenario: Scenario, stream: bool) -> str:
    body: dict[str, Any] = {"model": scenario.model, "messages": [{"role": "user", "content": words(scenario.answer_words)}]}
    if stream:
        body["stream"] = True
    return json.dumps(body)


def window_holdback_chars(scenario: Scenario, moderation: bool, tmp: Path) -> int:
    """Characters of the answer the moderation window holds before it first releases text.

    The mock streams one word per chunk; a direct client's "release" time is when
    it has more than this many characters, which is the earliest the gateway may
    show the first token. Computed with the very rules the gateway runs.
    """
    if not moderation:
        return 0
    engine = ModerationEngine.from_config(ModerationConfig(rules=moderation_rules(tmp / "terms.txt")))
    window = engine.stream("output")
    seen = 0
    for word in words(scenario.answer_words).split(" "):
        chunk = word + " "
        if window.feed(chunk).text:
            return seen
        seen += len(chunk)
    return seen


# -- running -------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The CPUs of the measured target, and of everything else (the load, the mocks, Redis).

    On a small machine the client, the mock and the gateway otherwise take
    turns on the same cores, and a gateway's added latency includes waiting
    for the client's and the mock's CPU work, which a deployed gateway, on
    its own machine, does not. Pinned, each target has one core to itself and
    the rest share the others, the same for every target and for direct.
    """

    target: set[int] | None = None
    others: set[int] | None = None

    @classmethod
    def choose(cls, pinned: bool) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if not pinned or len(cpus) < 2:
            return cls()
        return cls({cpus[-1]}, set(cpus[:-1]))

    def describe(self) -> str:
        if not self.target or not self.others:
            return "CPUs: not pinned; the load generator, the mocks and the target share every core"
        others = ",".join(map(str, sorted(self.others)))
        return (f"CPUs: each target alone on CPU {min(self.target)}; the load generator, the mocks "
                f"(and Redis) on CPU {others} (--no-pin to share)")


async def run_loadgen(args: list[str], cpus: set[int] | None, on_ready: Any = None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.loadgen", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    pin(proc.pid, cpus)
    assert proc.stdout is not None and proc.stderr is not None
    result: dict[str, Any] | None = None
    async for line in proc.stdout:
        message = json.loads(line)
        if "ready" in message:
            if on_ready is not None:
                await on_ready(message, proc.pid)
        else:
            result = message
    stderr = await proc.stderr.read()
    await proc.wait()
    if result is None:
        raise RuntimeError(f"the load generator failed ({proc.returncode}): {stderr.decode(errors='replace')[-2000:]}")
    result["pid"] = proc.pid
    return result


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


def loadgen_args(scenario: Scenario, target: Target, opts: argparse.Namespace, *, stream: bool, holdback: int) -> list[str]:
    url = target.base_url + "/chat/completions"
    args = ["--url", url, "--body", request_body(scenario, stream), "--concurrency", str(scenario.concurrency)]
    for name, value in target.headers.items():
        args += ["--header", f"{name}: {value}"]
    args += ["--ramp-seconds", str(ramp_seconds(scenario, opts))]
    if stream:
        args += ["--stream", "--release-chars", str(holdback)]
    return args


def ramp_seconds(scenario: Scenario, opts: argparse.Namespace) -> float:
    """How long the load generator takes to start all its workers.

    A closed loop settles into a steady state: each worker starts its next
    request as its last ends, so starts spread over a request's length. Chat
    requests are short and spread by themselves after one mock delay. A
    stream lasts 10 s, so its workers are spread over ``--stream-ramp-seconds``
    (at concurrency 50, 2 s is 25 starts a second, five times the rate of a
    steady loop); the burst scenario starts them all within one chunk delay,
    which is a thousand starts a second and queues on any gateway's CPU.
    """
    if scenario.hold:
        return opts.hold_ramp_seconds
    if scenario.stream and not scenario.burst:
        return opts.stream_ramp_seconds
    pace = opts.chunk_delay_ms if scenario.model == STREAM_MODEL else opts.delay_ms
    return min(pace / 1000, 1.0)


async def run_scenario(scenario: Scenario, target: Target, opts: argparse.Namespace, holdback: int) -> Run:
    # Warm-up: the same route, not streamed, at the same concurrency: connections
    # open on every hop, and code paths are hot, before anything is timed.
    warm = loadgen_args(scenario, target, opts, stream=False, holdback=0)
    warm[warm.index("--concurrency") + 1] = str(min(scenario.concurrency, 200))
    await run_loadgen(warm + ["--requests", str(max(2 * min(scenario.concurrency, 200), 20))], opts.placement.others)

    args = loadgen_args(scenario, target, opts, stream=scenario.stream, holdback=holdback)
    if scenario.hold:
        args += ["--hold", str(scenario.concurrency)]
    elif scenario.stream:
        args += ["--requests", str(scenario.concurrency * opts.stream_waves)]
    else:
        args += ["--seconds", str(opts.seconds)]

    watched = target.pid if target.pid is not None else None
    run = Run(load={})
    if watched is not None:
        run.rss_before = rss_bytes(watched)
    peak = [0.0]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(watched, peak, stop)) if watched is not None else None

    async def on_ready(message: dict[str, Any], _pid: int) -> None:
        if watched is not None:
            run.rss_ready = rss_bytes(watched)

    cpu_before = sum(cpu_seconds(watched)) if watched is not None else 0.0
    run.load = await run_loadgen(args, opts.placement.others, on_ready)
    if watched is not None:
        run.cpu_seconds = sum(cpu_seconds(watched)) - cpu_before
        stop.set()
        assert sampler is not None
        await sampler
        run.rss_peak = peak[0]
    return run


def combine(runs: list[Run]) -> Run:
    """One figure per target from its rounds: the median of each round's percentiles, totals summed.

    A single run's p50 over thousands of requests is steady; what moves is the
    machine between runs, and the median of alternating rounds damps that.
    """
    loads = [run.load for run in runs]
    if len(runs) == 1:
        runs[0].rounds = loads
        return runs[0]
    load: dict[str, Any] = {
        "ok": sum(x.get("ok", 0) for x in loads), "errors": sum(x.get("errors", 0) for x in loads),
        "error_samples": [sample for x in loads for sample in x.get("error_samples") or ()][:3],
        "seconds": sum(x.get("seconds") or 0.0 for x in loads), "chunks": sum(x.get("chunks") or 0 for x in loads),
    }
    load["rps"] = load["ok"] / load["seconds"] if load["seconds"] else math.nan
    load["chunks_per_second"] = load["chunks"] / load["seconds"] if load["seconds"] else math.nan
    for metric in ("latency_ms", "outside_model_ms", "ttft_ms", "release_ms"):
        figures = [x[metric] for x in loads if x.get(metric)]
        load[metric] = {key: statistics.median(f[key] for f in figures) for key in figures[0]} if figures else None
    return Run(
        load=load,
        cpu_seconds=sum(run.cpu_seconds for run in runs),
        rss_peak=max(run.rss_peak for run in runs),
        rss_before=min(run.rss_before for run in runs),
        rss_ready=max(run.rss_ready for run in runs),
        rounds=loads,
    )


# -- services ------------------------------------------------------------------


async def start_services(opts: argparse.Namespace, tmp: Path, files: list[Any], services: Services,
                         procs: list[Any]) -> None:
    """Start the mocks, Sluice and the peer, filling ``services`` and ``procs`` as they come up (to stop them)."""
    paces = {WHOLE_MODEL: opts.delay_ms, STREAM_MODEL: opts.chunk_delay_ms, SLOW_MODEL: opts.slow_chunk_delay_ms}
    mock_err = (tmp / "mocks.err").open("wb")
    files.append(mock_err)
    async with aiohttp.ClientSession() as probe:
        for model, pace in paces.items():
            port = free_port()
            proc = start_process([sys.executable, "-m", "proxy", "mock-upstream", "--host", "127.0.0.1",
                                  "--port", str(port), "--delay-ms", str(pace)], mock_err, mock_err)
            procs.append(proc)
            pin(proc.pid, opts.placement.others)
            services.mocks[model] = f"http://127.0.0.1:{port}/v1"
            services.mock_pids.append(proc.pid)
            await wait_healthy(probe, services.mocks[model] + "/models", proc, f"mock ({model})", tmp / "mocks.err")
        services.targets.append(Target("direct", "", {"Authorization": "Bearer direct"}, None))

        port = free_port()
        accounting = {"store": opts.store, "sqlite_path": str(tmp / "sluice.db")}
        if opts.store == "redis":
            redis = RedisServer(tmp / "redis")
            redis.start()
            services.redis = redis
            assert redis.pid is not None
            pin(redis.pid, opts.placement.others)
            accounting["redis_url"] = redis.url
        config = sluice_config(tmp, port, services.mocks, not opts.no_moderation, accounting, opts.log_level)
        log, err = (tmp / "sluice.log").open("wb"), (tmp / "sluice.err").open("wb")
        files += [log, err]
        runner = [sys.executable, "-c", PROFILED_GATEWAY, str(Path(opts.profile).resolve())] if opts.profile else \
            [sys.executable, "-m", "proxy"]
        proc = start_process(runner + ["serve", "--config", str(config)], log, err)
        procs.append(proc)
        pin(proc.pid, opts.placement.target)
        await wait_healthy(probe, f"http://127.0.0.1:{port}/readyz", proc, "sluice", tmp / "sluice.err")
        services.targets.append(Target("sluice", f"http://127.0.0.1:{port}/v1",
                                       {"Authorization": f"Bearer {SECRET}"}, proc.pid))

        port = free_port()
        routes = [f"--route={model}={url}" for model, url in services.mocks.items()]
        proc = start_process([sys.executable, "-m", "tests.bench.bare_proxy", "--port", str(port), *routes],
                             mock_err, mock_err)
        procs.append(proc)
        pin(proc.pid, opts.placement.target)
        await wait_healthy(probe, f"http://127.0.0.1:{port}/healthz", proc, "bare proxy", tmp / "mocks.err")
        services.targets.append(Target("bare", f"http://127.0.0.1:{port}/v1", {}, proc.pid))

        litellm_python = opts.litellm or os.environ.get(litellm_peer.LITELLM_ENV)
        if litellm_python:
            port = free_port()
            terms = moderation_terms(TERMS) if opts.litellm_moderation else None
            config = litellm_peer.write_config(tmp, services.mocks, LITELLM_KEY, terms)
            err = (tmp / "litellm.err").open("wb")
            files.append(err)
            proc = start_process(litellm_peer.command(litellm_python, config, "127.0.0.1", port), err, err,
                                 env=litellm_peer.environment(), cwd=tmp)
            procs.append(proc)
            pin(proc.pid, opts.placement.target)
            await wait_healthy(probe, f"http://127.0.0.1:{port}{litellm_peer.HEALTH_PATH}", proc, "litellm",
                               tmp / "litellm.err", headers={"Authorization": f"Bearer {LITELLM_KEY}"})
            services.targets.append(Target("litellm", f"http://127.0.0.1:{port}/v1",
                                           {"Authorization": f"Bearer {LITELLM_KEY}"}, proc.pid))


def target_url(target: Target, scenario: Scenario, services: Services) -> Target:
    if target.name == "direct":
        return Target("direct", services.mocks[scenario.model], target.headers, None)
    return target


# -- the report ----------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def pct(load: dict[str, Any], metric: str, p: str) -> float:
    figures = load.get(metric) or {}
    value = figures.get(p)
    return math.nan if value is None else float(value)


def added(run: Run, direct: Run | None, metric: str, p: str, base_metric: str | None = None) -> float:
    """``run``'s figure minus direct's (``base_metric`` of direct, when it differs).

    With several rounds, the median of each round's difference: a target and
    direct in the same round ran minutes apart at most, so what the machine
    did meanwhile (steal time, a neighbour's load) largely cancels out.
    """
    if direct is None or run is direct:
        return math.nan
    base_metric = base_metric or metric
    if len(run.rounds) == len(direct.rounds) > 1:
        return statistics.median(pct(mine, metric, p) - pct(theirs, base_metric, p)
                                 for mine, theirs in zip(run.rounds, direct.rounds))
    return pct(run.load, metric, p) - pct(direct.load, base_metric, p)


def cpu_per_unit(scenario: Scenario, run: Run) -> str:
    """The target's CPU per request (ms) or per streamed chunk (µs)."""
    if scenario.stream:
        chunks = run.load.get("chunks") or 0
        return fmt(1e6 * run.cpu_seconds / chunks, 0) + " us/chunk" if chunks else "-"
    ok = run.load.get("ok") or 0
    return fmt(1e3 * run.cpu_seconds / ok, 2) + " ms/req" if ok else "-"


def scenario_table(scenario: Scenario, runs: dict[str, Run]) -> list[str]:
    header = ("target", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "+net p50", "+net p99", "TTFT p50",
              "TTFT p99", "+TTFT p50", "+TTFT p99", "chunks/s", "CPU %core", "CPU per", "RSS MiB", "errors")
    rows = [header]
    direct = runs.get("direct")
    for name, run in runs.items():
        load = run.load
        seconds = load.get("seconds") or math.nan
        # Beyond the window: Sluice is compared with the moment the direct client had the text
        # the window needs; a gateway without moderation with the direct first token.
        ttft_base = "release_ms" if name == "sluice" else "ttft_ms"
        rss = run.rss_ready if scenario.hold else run.rss_peak
        rows.append((
            name, fmt(load.get("rps")), fmt(pct(load, "latency_ms", "p50")), fmt(pct(load, "latency_ms", "p99")),
            fmt(added(run, direct, "latency_ms", "p50"), 2, True), fmt(added(run, direct, "latency_ms", "p99"), 2, True),
            fmt(added(run, direct, "outside_model_ms", "p50"), 2, True),
            fmt(added(run, direct, "outside_model_ms", "p99"), 2, True),
            fmt(pct(load, "ttft_ms", "p50")), fmt(pct(load, "ttft_ms", "p99")),
            fmt(added(run, direct, "ttft_ms", "p50", ttft_base), 2, True),
            fmt(added(run, direct, "ttft_ms", "p99", ttft_base), 2, True),
            fmt(load.get("chunks_per_second"), 0), fmt(100 * run.cpu_seconds / seconds, 0),
            cpu_per_unit(scenario, run), fmt(rss / MIB, 0), str(load.get("errors", "-")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    for name, run in runs.items():
        for sample in run.load.get("error_samples") or ():
            lines.append(f"  !! {name}: {sample}")
    return lines


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def summary(results: dict[str, dict[str, Run]], opts: argparse.Namespace) -> list[str]:
    lines = ["", "against the issue's targets:"]

    def figure(scenario: str, target: str, metric: str, p: str | None = None) -> float:
        run = results.get(scenario, {}).get(target)
        if run is None:
            return math.nan
        return pct(run.load, metric, p) if p else float(run.load.get(metric) or math.nan)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT met")

    def added_by(target: str, scenario: str, metric: str, p: str) -> float:
        runs = results.get(scenario, {})
        return added(runs[target], runs.get("direct"), metric, p) if target in runs else math.nan

    def bare_added(scenario: str, metric: str, p: str) -> str:
        """The bare pass-through's figure, shown beside Sluice's: the floor this machine allows any aiohttp gateway."""
        return fmt(added_by("bare", scenario, metric, p), 2, True)

    for p, limit in (("p50", 1.0), ("p99", 5.0)):
        for metric, how in (("latency_ms", "latency"), ("outside_model_ms", "net of the model's own time")):
            extra = added_by("sluice", "chat-c50", metric, p)
            lines.append(f"  added {p} at concurrency 50, non-streamed, {how}: {fmt(extra, 2, True)} ms "
                         f"(target <= {limit:g} ms; bare pass-through {bare_added('chat-c50', metric, p)} ms): "
                         f"{verdict(None if math.isnan(extra) else extra <= limit)}")
    for name, metric, want in (("chat-c50", "rps", 3.0), ("chat-c200", "rps", 3.0),
                               ("stream-c50", "chunks_per_second", 1.0), ("stream-c500", "chunks_per_second", 1.0)):
        r = ratio(figure(name, "sluice", metric), figure(name, "litellm", metric))
        lines.append(f"  {name} {metric.replace('_', ' ')}, Sluice / LiteLLM: {fmt(r, 2)}x (target >= {want:g}x): "
                     f"{verdict(None if math.isnan(r) else r >= want)}")
    hold = results.get("open-2000", {}).get("sluice")
    if hold is not None:
        per_stream = (hold.rss_ready - hold.rss_before) / max(hold.load.get("ok", 0) or 1, 1)
        lines.append(f"  2,000 open streams: Sluice RSS {fmt(hold.rss_ready / MIB, 0)} MiB with every stream open "
                     f"({fmt(hold.rss_before / MIB, 0)} MiB before, {fmt(per_stream / 1024, 1)} KiB per stream; "
                     f"target < 400 MB): {verdict(None if math.isnan(hold.rss_ready) else hold.rss_ready < 400e6)}")
    for name in ("stream-c50", "stream-burst-c50", "stream-c500"):
        sluice, direct = results.get(name, {}).get("sluice"), results.get(name, {}).get("direct")
        if sluice is None or direct is None:
            continue
        gaps = {p: added(sluice, direct, "ttft_ms", p, "release_ms") for p in ("p50", "p99", "max")}
        worst = max(gaps.values())
        # The bare proxy has no window: its first token is measured against direct's first token.
        # Direct's own first token against the mock's delay says whether the load side kept up:
        # when it did not, every target's figures carry its queueing too.
        lines.append(f"  {name} time to first token beyond the window, Sluice - direct: p50 {fmt(gaps['p50'], 2, True)}, "
                     f"p99 {fmt(gaps['p99'], 2, True)}, max {fmt(gaps['max'], 2, True)} ms (target <= 2 ms; "
                     f"bare pass-through p50 {bare_added(name, 'ttft_ms', 'p50')}, max {bare_added(name, 'ttft_ms', 'max')} ms; "
                     f"direct's own first token p50 {fmt(pct(direct.load, 'ttft_ms', 'p50'))}, "
                     f"max {fmt(pct(direct.load, 'ttft_ms', 'max'))} ms, the mock sends it after {opts.chunk_delay_ms:g}): "
                     f"{verdict(None if math.isnan(worst) else worst <= 2.0)}")
    return lines


def report(results: dict[str, dict[str, Run]], opts: argparse.Namespace, holdbacks: dict[str, int],
           litellm_version: str | None) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"Sluice benchmark suite, {now}", machine_line(), opts.placement.describe()]
    out.append(f"Sluice: moderation {'off' if opts.no_moderation else f'on (six PII redact rules, {TERMS:,}-term block list)'}, "
               f"{opts.store} store, limits far above the load, JSON logs at {opts.log_level} to a file"
               + (f"; LiteLLM {litellm_version}: its defaults, no database (so no budgets), "
                  f"{'its content filter with email masking and the same block list' if opts.litellm_moderation else 'no moderation'}"
                  if litellm_version
                  else "; LiteLLM: not run (set SLUICE_BENCH_LITELLM)"))
    out.append(f"mock: {opts.delay_ms:g} ms before a whole answer, {opts.chunk_delay_ms:g} ms before each streamed word "
               f"({opts.slow_chunk_delay_ms:g} ms for the open streams); the load is a closed loop, one "
               f"loadgen process per run; workers start over one delay (chat), over {opts.stream_ramp_seconds:g} s "
               f"(streams) or within one chunk delay (the burst)")
    out.append("+ columns: the target minus direct (the median of each round's difference); +net: the same, on "
               "each answer's latency less the model's own time (its openai-processing-ms header); +TTFT for "
               "Sluice is measured against the direct client's time to the text the moderation window needs "
               "before it releases anything")
    for scenario in SCENARIOS:
        runs = results.get(scenario.name)
        if not runs:
            continue
        extra = ""
        if scenario.stream and holdbacks.get(scenario.name):
            extra = f"; the window holds the first {holdbacks[scenario.name]} characters"
        out += ["", f"{scenario.name}: {scenario.title}{extra}"] + scenario_table(scenario, runs)
    out += summary(results, opts)
    return "\n".join(out)


# The gateway under cProfile, timed by CPU time (time.process_time), not wall time: on a
# busy machine a wall-clock profile charges every preemption to the function that was running.
PROFILED_GATEWAY = """
import cProfile, sys, time
from proxy.cli import main
out, argv = sys.argv[1], sys.argv[2:]
profile = cProfile.Profile(time.process_time)
try:
    code = profile.runcall(main, argv)
finally:
    profile.dump_stats(out)
sys.exit(code)
"""


# -- main ----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sluice's benchmark suite (not a test).")
    parser.add_argument("--only", help="comma-separated scenario names: " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per non-streamed run (default 8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per scenario, reported as medians (default 3; 1 for stream-c500 and open-2000)")
    parser.add_argument("--stream-waves", type=int, default=1, help="streams per worker in a streamed run (default 1)")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="the mock's wait before a whole answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=50.0, help="the mock's wait before each streamed word")
    parser.add_argument("--slow-chunk-delay-ms", type=float, default=1000.0, help="the same, for the open streams")
    parser.add_argument("--hold-ramp-seconds", type=float, default=5.0, help="the open streams start over this long")
    parser.add_argument("--stream-ramp-seconds", type=float, default=2.0,
                        help="the streamed scenarios start their workers over this long (the burst: one chunk delay)")
    parser.add_argument("--store", choices=("memory", "sqlite", "redis"), default="sqlite",
                        help="Sluice's quota store (redis: a redis-server on a free loopback port)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                        help="Sluice's log level (info: one line per request)")
    parser.add_argument("--no-moderation", action="store_true", help="Sluice without its moderation rules")
    parser.add_argument("--litellm", help=f"the peer's Python (default: ${litellm_peer.LITELLM_ENV})")
    parser.add_argument("--litellm-moderation", action="store_true",
                        help="give LiteLLM its offline content filter (email masking and the same block list)")
    parser.add_argument("--make-litellm-venv", metavar="DIR", help="create a venv with litellm[proxy] there and use it")
    parser.add_argument("--profile", metavar="FILE", help="run Sluice under cProfile and save the profile there")
    parser.add_argument("--no-pin", action="store_true",
                        help="let every process run on every core (default: each target alone on the last CPU)")
    opts = parser.parse_args()
    opts.placement = Placement.choose(not opts.no_pin)
    known = {s.name for s in SCENARIOS}
    opts.scenarios = [s for s in SCENARIOS if not opts.only or s.name in opts.only.split(",")]
    unknown = set(opts.only.split(",")) - known if opts.only else set()
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return opts


async def main_async(opts: argparse.Namespace, tmp: Path, files: list[Any]) -> int:
    procs: list[Any] = []
    services = Services()
    try:
        await start_services(opts, tmp, files, services, procs)
        litellm_version = None
        if any(t.name == "litellm" for t in services.targets):
            litellm_version = litellm_peer.version(opts.litellm or os.environ[litellm_peer.LITELLM_ENV])
        results: dict[str, dict[str, Run]] = {}
        holdbacks: dict[str, int] = {}
        for scenario in opts.scenarios:
            holdbacks[scenario.name] = window_holdback_chars(scenario, not opts.no_moderation, tmp)
            rounds: dict[str, list[Run]] = {target.name: [] for target in services.targets}
            for round_number in range(1 if scenario.single_round else opts.rounds):
                # The order turns each round, so no target always runs first (or last) on a warming machine.
                shift = round_number % len(services.targets)
                for target in services.targets[shift:] + services.targets[:shift]:
                    target = target_url(target, scenario, services)
                    print(f"  {scenario.name} / {target.name} (round {round_number + 1}) ...", file=sys.stderr, flush=True)
                    started = time.monotonic()
                    rounds[target.name].append(await run_scenario(scenario, target, opts, holdbacks[scenario.name]))
                    print(f"    {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            results[scenario.name] = {name: combine(runs) for name, runs in rounds.items()}
        print()
        print(report(results, opts, holdbacks, litellm_version))
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if services.redis is not None:
            services.redis.stop()


def main() -> int:
    opts = parse_args()
    if opts.make_litellm_venv:
        opts.litellm = str(litellm_peer.make_venv(Path(opts.make_litellm_venv)))
    with tempfile.TemporaryDirectory(prefix="sluice-suite-") as tmp_name:
        files: list[Any] = []
        try:
            return asyncio.run(main_async(opts, Path(tmp_name), files))
        except RuntimeError as exc:
            print(f"suite: {exc}", file=sys.stderr)
            return 1
        finally:
            for handle in files:
                handle.close()
            if opts.profile:
                import pstats

                print(f"\nSluice under cProfile (CPU time), saved to {opts.profile}; its figures above are slowed")
                pstats.Stats(opts.profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    sys.exit(main())
