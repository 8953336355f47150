"""The benchmark suite: every scenario direct to the mock model, through Sluice and its peers, in one run.

    python -m tests.bench.suite                       # about 8 minutes; add the peers with the variables below
    SLUICE_BENCH_LITELLM=/path/to/venv/bin/python SLUICE_BENCH_PORTKEY=/path/to/portkey python -m tests.bench.suite
    python -m tests.bench.suite --make-litellm-venv /tmp/litellm-venv   # build the peer's venv from PyPI first
    python -m tests.bench.suite --make-portkey-folder /tmp/portkey      # install Portkey's gateway from npm first
    python -m tests.bench.suite --workers 1,2,4       # Sluice (and LiteLLM) with each worker count
    python -m tests.bench.suite --only chat-c50,stream-c50 --seconds 5
    python -m tests.bench.suite --profile /tmp/sluice.prof              # Sluice under cProfile; read the profile

Services, each its own process on a free loopback port, stopped at the end:
three mock models (one per pace: a whole answer after ``--delay-ms``, a
stream with ``--chunk-delay-ms`` before each word, and a slow stream for the
open-streams scenario), Sluice (``sluice serve``: moderation with all six PII
rules and a 10,000-term block list, the sqlite store (``--store``), limits set far above
the load so the limiter runs but never refuses, JSON logs at info to a file),
and, when ``SLUICE_BENCH_LITELLM`` names a Python with ``litellm[proxy]``,
LiteLLM's proxy routed to the same mocks; when ``SLUICE_BENCH_PORTKEY`` names
a folder with Portkey's gateway installed (``tests/bench/portkey_peer.py``),
that too; also a bare aiohttp pass-through, the floor of the HTTP stack.
Sluice runs once per ``--workers`` count (default 1 and 2: ``sluice``,
``sluice-2w``), and LiteLLM with the same counts (``--num_workers``). The
load comes from ``tests/bench/loadgen.py``, a separate process per run. Each
single-process target runs alone on one CPU, the load and the mocks on the
others; a target of N workers gets N CPUs of its own where the machine has
more than N, else every CPU, shared with the load and the mocks, which the
report then says (``Placement``; ``--no-pin`` to share everything).

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
from tests.bench import litellm_peer, portkey_peer
from tests.bench.harness import (
    MIB,
    REPO,
    SECRET,
    cpu_seconds,
    free_port,
    machine_line,
    moderation_terms,
    pin,
    process_tree,
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
    pss_ready: float = math.nan  # the same, with the pages forked workers share counted once
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each round's load, for paired differences


@dataclass
class Services:
    mocks: dict[str, str] = field(default_factory=dict)  # model -> base url
    mock_pids: list[int] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    redis: RedisServer | None = None
    workers: dict[str, int] = field(default_factory=dict)  # target -> its processes serving (1 when absent)
    not_run: list[str] = field(default_factory=list)  # targets that could not start, and why


# -- configs -------------------------------------------------------------------


def moderation_rules(terms_file: Path) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"name": f"pii-{entity}", "type": "pii", "entity": entity, "action": "redact"} for entity in PII_ENTITIES
    ]
    rules.append({"name": "banned", "type": "terms", "terms_file": str(terms_file), "match": "word", "action": "block"})
    return rules


def sluice_config(tmp: Path, port: int, mocks: dict[str, str], moderation: bool,
                  accounting: dict[str, str] | None = None, log_level: str = "info", workers: int = 1) -> Path:
    big = 10**12
    terms_file = tmp / "terms.txt"
    terms_file.write_text("\n".join(moderation_terms(TERMS)) + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2, "workers": workers},
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

    def for_workers(self, workers: int) -> set[int] | None:
        """The CPUs of a target with ``workers`` processes: its own where the machine has enough, else all."""
        if not self.target or not self.others or workers <= 1:
            return self.target
        cpus = sorted(self.target | self.others)
        if len(cpus) > workers:
            return set(cpus[-workers:])
        return set(cpus)

    def shares_cores(self, workers: int) -> bool:
        """Whether a target of ``workers`` processes shares its cores with the load generator and the mocks."""
        target = self.for_workers(workers)
        return not target or not self.others or bool(target & self.others)

    def describe(self, worker_counts: list[int] | None = None) -> str:
        if not self.target or not self.others:
            return "CPUs: not pinned; the load generator, the mocks and the target share every core"
        others = ",".join(map(str, sorted(self.others)))
        line = (f"CPUs: each single-process target alone on CPU {min(self.target)}; the load generator, the mocks "
                f"(and Redis) on CPU {others} (--no-pin to share)")
        for workers in worker_counts or ():
            if workers > 1:
                cpus = ",".join(map(str, sorted(self.for_workers(workers) or ())))
                shared = (f"; this machine has {len(self.target | self.others)} cores, so its workers share them "
                          "with the load generator and the mocks") if self.shares_cores(workers) else ""
                line += f"\n  targets with {workers} workers: CPUs {cpus}{shared}"
        return line


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
            run.pss_ready = pss_bytes(watched)

    cpu_before = sum(cpu_seconds(watched)) if watched is not None else 0.0
    run.load = await run_loadgen(args, opts.placement.others, on_ready)
    if watched is not None:
        run.cpu_seconds = sum(cpu_seconds(watched)) - cpu_before
        stop.set()
        assert sampler is not None
        await sampler
        run.rss_peak = peak[0]
    return run


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process and its descendants: each shared page split among its sharers."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


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
        pss_ready=max(run.pss_ready for run in runs),
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

        redis_url = None
        if opts.store == "redis":
            redis = RedisServer(tmp / "redis")
            redis.start()
            services.redis = redis
            assert redis.pid is not None
            pin(redis.pid, opts.placement.others)
            redis_url = redis.url
        for workers in opts.workers:
            try:
                await start_sluice(opts, tmp, files, services, procs, probe, workers, redis_url)
            except RuntimeError as exc:
                if workers == 1:
                    raise
                # A store that serves one process (sqlite before it is shared) refuses a second worker.
                services.not_run.append(f"sluice with {workers} workers: {str(exc).strip().splitlines()[-1]}")

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
            terms = moderation_terms(TERMS) if opts.litellm_moderation else None
            config = litellm_peer.write_config(tmp, services.mocks, LITELLM_KEY, terms)
            for workers in opts.workers:
                name = target_name("litellm", workers)
                port = free_port()
                err = (tmp / f"{name}.err").open("wb")
                files.append(err)
                proc = start_process(litellm_peer.command(litellm_python, config, "127.0.0.1", port, workers), err, err,
                                     env=litellm_peer.environment(), cwd=tmp)
                procs.append(proc)
                pin(proc.pid, opts.placement.for_workers(workers))
                await wait_healthy(probe, f"http://127.0.0.1:{port}{litellm_peer.HEALTH_PATH}", proc, name,
                                   tmp / f"{name}.err", headers={"Authorization": f"Bearer {LITELLM_KEY}"})
                pin(proc.pid, opts.placement.for_workers(workers))  # uvicorn's workers, forked meanwhile
                services.targets.append(Target(name, f"http://127.0.0.1:{port}/v1",
                                               {"Authorization": f"Bearer {LITELLM_KEY}"}, proc.pid))
                services.workers[name] = workers

        portkey_folder = opts.portkey or os.environ.get(portkey_peer.PORTKEY_ENV)
        if portkey_folder:
            port = free_port()
            err = (tmp / "portkey.err").open("wb")
            files.append(err)
            proc = start_process(portkey_peer.command(portkey_folder, port), err, err, cwd=tmp)
            procs.append(proc)
            pin(proc.pid, opts.placement.target)
            await wait_healthy(probe, f"http://127.0.0.1:{port}{portkey_peer.HEALTH_PATH}", proc, "portkey",
                               tmp / "portkey.err")
            services.targets.append(Target("portkey", f"http://127.0.0.1:{port}/v1", {}, proc.pid))


def target_name(kind: str, workers: int) -> str:
    return kind if workers == 1 else f"{kind}-{workers}w"


async def start_sluice(opts: argparse.Namespace, tmp: Path, files: list[Any], services: Services, procs: list[Any],
                       probe: aiohttp.ClientSession, workers: int, redis_url: str | None) -> None:
    """``sluice serve`` with ``workers`` processes, in a folder of its own (config, sqlite file, log)."""
    name = target_name("sluice", workers)
    home = tmp / name
    home.mkdir()
    port = free_port()
    accounting = {"store": opts.store, "sqlite_path": str(home / "sluice.db")}
    if redis_url:
        accounting["redis_url"] = redis_url
    config = sluice_config(home, port, services.mocks, not opts.no_moderation, accounting, opts.log_level, workers)
    log, err = (home / "sluice.log").open("wb"), (home / "sluice.err").open("wb")
    files += [log, err]
    runner = [sys.executable, "-c", PROFILED_GATEWAY, str(Path(opts.profile).resolve())] if opts.profile else \
        [sys.executable, "-m", "proxy"]
    proc = start_process(runner + ["serve", "--config", str(config)], log, err)
    procs.append(proc)
    pin(proc.pid, opts.placement.for_workers(workers))  # before it forks: its workers inherit the CPUs
    await wait_healthy(probe, f"http://127.0.0.1:{port}/readyz", proc, name, home / "sluice.err")
    if workers > 1:
        await wait_all_serving(proc, home / "sluice.log", home / "sluice.err", name)
    services.targets.append(Target(name, f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {SECRET}"}, proc.pid))
    services.workers[name] = workers


async def wait_all_serving(proc: Any, log_path: Path, err_path: Path, name: str, seconds: float = 60.0) -> None:
    """Until the supervisor logs that every worker serves (one ready worker already answers /readyz)."""
    deadline = time.monotonic() + seconds
    while b'"event": "serving"' not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start all its workers:\n{err_path.read_text(errors='replace')[-3000:]}")
        await asyncio.sleep(0.1)


def target_url(target: Target, scenario: Scenario, services: Services) -> Target:
    if target.name == "direct":
        return Target("direct", services.mocks[scenario.model], target.headers, None)
    if target.name == "portkey":  # routed per request, to the mock of the scenario's model
        return Target("portkey", target.base_url, portkey_peer.headers(services.mocks[scenario.model]), target.pid)
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
        # Beyond the window: Sluice (any worker count) is compared with the moment the direct client had the text
        # the window needs; a gateway without moderation with the direct first token.
        ttft_base = "release_ms" if name.startswith("sluice") else "ttft_ms"
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


def summary(results: dict[str, dict[str, Run]], opts: argparse.Namespace, services: Services | None = None) -> list[str]:
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
        if "portkey" in results.get(name, {}):
            lines.append(f"  {name} {metric.replace('_', ' ')}, Sluice / Portkey: "
                         f"{fmt(ratio(figure(name, 'sluice', metric), figure(name, 'portkey', metric)), 2)}x")
    for name in ("chat-c200", "stream-c500"):
        metric = SCALING[name]
        two = figure(name, "sluice-2w", metric)
        if math.isnan(two):
            continue
        r = ratio(two, figure(name, "sluice", metric))
        shared = opts.placement.shares_cores(2)
        lines.append(f"  {name} {metric.replace('_', ' ')}, Sluice 2 workers / 1 worker: {fmt(r, 2)}x "
                     f"(target >= {SCALING_TARGET:g}x with the load generator and the mocks on cores of their own): "
                     + ("- (not measurable here: the workers share the cores with the load)" if shared
                        else verdict(None if math.isnan(r) else r >= SCALING_TARGET)))
    for hold_name in ("sluice", "sluice-2w"):
        hold = results.get("open-2000", {}).get(hold_name)
        if hold is None:
            continue
        per_stream = (hold.rss_ready - hold.rss_before) / max(hold.load.get("ok", 0) or 1, 1)
        # Forked workers share the pages they inherited (the token encodings, the imports): the sum of
        # their RSS counts those once per process, their PSS once in all, which is what the machine holds.
        in_all = hold.pss_ready if services and services.workers.get(hold_name, 1) > 1 else hold.rss_ready
        lines.append(f"  2,000 open streams: {hold_name} RSS {fmt(hold.rss_ready / MIB, 0)} MiB with every stream open "
                     f"(PSS {fmt(hold.pss_ready / MIB, 0)} MiB; {fmt(hold.rss_before / MIB, 0)} MiB RSS before, "
                     f"{fmt(per_stream / 1024, 1)} KiB per stream; target < 400 MB"
                     f"{', by PSS: its processes share pages' if in_all is hold.pss_ready else ''}): "
                     f"{verdict(None if math.isnan(in_all) else in_all < 400e6)}")
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


# The saturating scenarios, where more workers should mean more throughput, and the figure that says so.
SCALING = {"chat-c50": "rps", "chat-c200": "rps", "stream-c50": "chunks_per_second", "stream-c500": "chunks_per_second"}
SCALING_TARGET = 1.6  # 2 workers against 1, on chat-c200 and stream-c500 (issue 23)


def scaling(results: dict[str, dict[str, Run]], services: Services, opts: argparse.Namespace) -> list[str]:
    """Throughput per worker count, per worker, and the ratio to one worker: Sluice's and LiteLLM's."""
    lines = ["", "workers: throughput, per worker, and against the same gateway with one worker:"]
    for kind in ("sluice", "litellm"):
        counts = sorted({n for name, n in services.workers.items() if name == kind or name.startswith(kind + "-")})
        if len(counts) < 2:
            continue
        for scenario, metric in SCALING.items():
            runs = results.get(scenario, {})
            one = runs.get(kind)
            if one is None:
                continue
            base = float(one.load.get(metric) or math.nan)
            unit = "req/s" if metric == "rps" else "chunks/s"
            parts = []
            for workers in counts:
                run = runs.get(target_name(kind, workers))
                if run is None:
                    continue
                value = float(run.load.get(metric) or math.nan)
                cpu = 100 * run.cpu_seconds / (run.load.get("seconds") or math.nan)
                parts.append(f"{workers}: {fmt(value, 0)} {unit} ({fmt(value / workers, 0)} per worker, "
                             f"{fmt(ratio(value, base), 2)}x; CPU {fmt(cpu, 0)}% of a core)")
            lines.append(f"  {kind} {scenario}: " + "; ".join(parts))
    for workers in opts.workers:
        if workers > 1 and opts.placement.shares_cores(workers):
            lines.append(f"  (with {workers} workers on this {len(os.sched_getaffinity(0))}-core machine the workers share their "
                         "cores with the load generator and the mocks: the ratio is not the gateway's own scaling; "
                         "tests/bench/instructions.py counts the work per request instead)")
    for reason in services.not_run:
        lines.append(f"  not run: {reason}")
    return lines


def report(results: dict[str, dict[str, Run]], opts: argparse.Namespace, holdbacks: dict[str, int],
           litellm_version: str | None, services: Services | None = None, portkey_version: str | None = None) -> str:
    services = services or Services()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"Sluice benchmark suite, {now}", machine_line(), opts.placement.describe(opts.workers)]
    out.append(f"Sluice: moderation {'off' if opts.no_moderation else f'on (six PII redact rules, {TERMS:,}-term block list)'}, "
               f"{opts.store} store, limits far above the load, JSON logs at {opts.log_level} to a file"
               + (f"; LiteLLM {litellm_version}: its defaults, no database (so no budgets), "
                  f"{'its content filter with email masking and the same block list' if opts.litellm_moderation else 'no moderation'}"
                  if litellm_version
                  else "; LiteLLM: not run (set SLUICE_BENCH_LITELLM)")
               + (f"; Portkey's gateway {portkey_version}: its defaults, routed by headers, no keys, limits or moderation"
                  if portkey_version else "; Portkey: not run (set SLUICE_BENCH_PORTKEY)"))
    if any(n > 1 for n in opts.workers):
        out.append(f"workers: Sluice (and LiteLLM, with --num_workers) ran with {', '.join(map(str, opts.workers))} "
                   "worker processes: the targets named -Nw")
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
    out += scaling(results, services, opts)
    out += summary(results, opts, services)
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
    parser.add_argument("--portkey", help=f"the folder with Portkey's gateway installed (default: ${portkey_peer.PORTKEY_ENV})")
    parser.add_argument("--make-portkey-folder", metavar="DIR", help="install Portkey's gateway there (npm) and use it")
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated worker counts to run Sluice (and LiteLLM) with (default 1,2)")
    parser.add_argument("--profile", metavar="FILE", help="run Sluice under cProfile and save the profile there")
    parser.add_argument("--no-pin", action="store_true",
                        help="let every process run on every core (default: each target alone on the last CPU)")
    opts = parser.parse_args()
    opts.placement = Placement.choose(not opts.no_pin)
    try:
        opts.workers = sorted({int(n) for n in opts.workers.split(",")} | {1})
    except ValueError:
        parser.error("--workers takes comma-separated numbers, such as 1,2")
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
        litellm_version = portkey_version = None
        if any(t.name == "litellm" for t in services.targets):
            litellm_version = litellm_peer.version(opts.litellm or os.environ[litellm_peer.LITELLM_ENV])
        if any(t.name == "portkey" for t in services.targets):
            portkey_version = portkey_peer.version(opts.portkey or os.environ[portkey_peer.PORTKEY_ENV])
        results: dict[str, dict[str, Run]] = {}
        holdbacks: dict[str, int] = {}
        for scenario in opts.scenarios:
            holdbacks[scenario.name] = window_holdback_chars(scenario, not opts.no_moderation, tmp / "sluice")
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
        print(report(results, opts, holdbacks, litellm_version, services, portkey_version))
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
    if opts.make_portkey_folder:
        opts.portkey = str(portkey_peer.make_folder(Path(opts.make_portkey_folder)))
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
