"""Load benchmark: the gateway against the mock model called directly, in one run.

Run from the repository root with the project's venv:

    python tests/bench/bench_gateway.py [--requests N] [--stream-requests N] [--concurrency 50]
                                        [--delay-ms 20] [--seconds S] [--rounds 4] [--moderation]
                                        [--profile FILE]

It starts two separate processes on free loopback ports: the mock model
(``python -m proxy mock-upstream --delay-ms D``) and the gateway
(``python -m proxy serve --config <temp yaml>``: memory store, logging at info
in JSON, unbuffered, to a temp file; no moderation unless ``--moderation``). The load comes
from this process: one aiohttp ClientSession, ``--concurrency`` workers. Direct
and gateway phases alternate round by round (the order flips each round) so
that both see the same machine. Figures are ratios against the direct baseline
of the same run. Nothing here asserts a time; pytest does not collect it.

The mock waits D once before a non-streamed answer, and D before each streamed
content chunk (the role chunk comes at once): a W-word stream takes >= W*D.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.auth import hash_key

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-bench-0123456789abcdef"
MODEL = "gpt-4o-mini"
# Plain words that none of the generated moderation terms can match.
_SENTENCE = (
    "the quick brown fox jumps over a lazy dog while seven tired engineers measure every "
    "request that passes through their gateway and write down what they saw"
)
WORDS = tuple(_SENTENCE.split())
STARTUP_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / CLK_TCK


def moderation_terms(count: int) -> list[str]:
    """``count`` deterministic made-up terms (a few of them phrases) that never occur in WORDS."""
    rng = random.Random(1234)
    terms: list[str] = []
    seen = set(WORDS)
    while len(terms) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 11)))
        if word in seen:
            continue
        seen.add(word)
        if len(terms) % 10 == 9:  # every tenth term is a two-word phrase
            word += " " + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
        terms.append(word)
    return terms


def write_config(tmp: Path, gateway_port: int, mock_port: int, moderation: bool, accounting: dict) -> Path:
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": gateway_port, "shutdown_grace_seconds": 2},
        "upstreams": [
            {
                "name": "mock",
                "base_url": f"http://127.0.0.1:{mock_port}/v1",
                "models": ["*"],
                "connect_timeout_seconds": 5,
                "read_timeout_seconds": 60,
            }
        ],
        # Limits far above what the run can reach: the limiter's work is measured, never its refusals.
        "teams": [
            {
                "name": "bench",
                "models": ["*"],
                "limits": {
                    "requests_per_minute": 10**9,
                    "tokens_per_minute": 10**12,
                    "tokens_per_day": 10**13,
                    "tokens_per_month": 10**14,
                    "max_concurrent_requests": 10**6,
                },
            }
        ],
        "keys": [{"id": "bench", "team": "bench", "sha256": hash_key(SECRET)}],
        "accounting": accounting,
        "logging": {"level": "info", "format": "json"},
    }
    if moderation:
        terms_file = tmp / "terms.txt"
        terms_file.write_text("\n".join(moderation_terms(1000)) + "\n", encoding="utf-8")
        config["moderation"] = {
            "rules": [
                {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
                {"name": "banned", "type": "terms", "terms_file": str(terms_file), "match": "word", "action": "block"},
            ]
        }
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def child_env() -> dict[str, str]:
    # SLUICE_* variables would override the benchmark's config. Unbuffered stdout, as
    # container images usually set it: each log line is written when the request ends.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_process(argv: list[str], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True,  # our Ctrl-C does not reach it; we stop it ourselves
    )


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


async def wait_healthy(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], name: str,
                       stderr_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{stderr_path.read_text(errors='replace')[-3000:]}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                await resp.read()
                if resp.status < 500:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url} within {STARTUP_SECONDS:.0f} s")


# -- load --------------------------------------------------------------------


@dataclass
class Phase:
    """What one target saw over all its rounds of one mode."""

    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)  # whole request, seconds
    ttfts: list[float] = field(default_factory=list)  # first content chunk, seconds
    chunks: int = 0  # content chunks received
    overheads_ms: list[float] = field(default_factory=list)  # the gateway's x-sluice-overhead-ms
    cpu: dict[str, float] = field(default_factory=lambda: {"client": 0.0, "gateway": 0.0, "mock": 0.0, "other": 0.0})
    gateway_sys: float = 0.0  # the kernel's share of the gateway's CPU (loopback TCP, epoll)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(text[:200])


async def one_plain(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], phase: Phase) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
            elapsed = time.perf_counter() - started
            if resp.status != 200:
                phase.error(f"HTTP {resp.status}: {payload[:150]!r}")
                return
            overhead = resp.headers.get("x-sluice-overhead-ms")
    except (TimeoutError, aiohttp.ClientError) as exc:
        phase.error(f"{type(exc).__name__}: {exc}")
        return
    phase.latencies.append(elapsed)
    if overhead is not None:
        phase.overheads_ms.append(float(overhead))


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], phase: Phase) -> None:
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                phase.error(f"HTTP {resp.status}: {(await resp.read())[:150]!r}")
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                if b'"content"' not in data:
                    continue
                event = json.loads(data)
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
            elapsed = time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        phase.error(f"{type(exc).__name__}: {exc}")
        return
    if not done or first is None:
        phase.error(f"stream ended without [DONE] or without content ({chunks} chunks)")
        return
    phase.latencies.append(elapsed)
    phase.ttfts.append(first)
    phase.chunks += chunks


async def run_round(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], phase: Phase, *,
                    stream: bool, count: int | None, seconds: float | None, concurrency: int,
                    pids: dict[str, int]) -> None:
    """``count`` requests (or as many as fit in ``seconds``) from ``concurrency`` workers, into ``phase``."""
    one = one_stream if stream else one_plain
    issued = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal issued
        while (count is None or issued < count) and (deadline is None or time.perf_counter() < deadline):
            issued += 1
            await one(session, url, body, headers, phase)

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.wall += time.perf_counter() - started
    ours = time.process_time() - client_before
    phase.cpu["client"] += ours
    for name, pid in pids.items():
        user, system = cpu_seconds(pid)
        phase.cpu[name] += user + system - sum(cpu_before[name])
        ours += user + system - sum(cpu_before[name])
        if name == "gateway":
            phase.gateway_sys += system - cpu_before[name][1]
    if pids:
        # Whatever else ran on the machine meanwhile: a busy neighbour distorts the figures.
        phase.cpu["other"] += max(0.0, machine_busy_seconds() - busy_before - ours)
    phase.requests += issued


def chat_body(words: int, stream: bool) -> bytes:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# -- figures -----------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def fmt_added(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+,.1f} ms"


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("", "direct", "gateway", "gateway/direct", "added")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for row in [header, *rows]:
        lines.append("  " + row[0].ljust(widths[0]) + "  " + "  ".join(row[i].rjust(widths[i]) for i in range(1, 5)))
    return "\n".join(lines)


def latency_rows(label: str, direct: list[float], gateway: list[float]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for p in (50, 99):
        d, g = percentile(direct, p) * 1000, percentile(gateway, p) * 1000
        rows.append((f"{label} p{p} ms", fmt(d), fmt(g), fmt(ratio(g, d), 2), fmt_added(g - d)))
    return rows


def cpu_rows(direct: Phase, gateway: Phase, per: str, n_direct: float, n_gateway: float) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name in ("client", "gateway", "mock", "other"):
        d = 100 * direct.cpu[name] / direct.wall if direct.wall else math.nan
        g = 100 * gateway.cpu[name] / gateway.wall if gateway.wall else math.nan
        label = "other processes" if name == "other" else name
        rows.append((f"CPU {label} % of a core", fmt(d, 0), fmt(g, 0), "", ""))
    g_ms = 1000 * gateway.cpu["gateway"] / n_gateway if n_gateway else math.nan
    sys_ms = 1000 * gateway.gateway_sys / n_gateway if n_gateway else math.nan
    rows.append((f"gateway CPU ms per {per}", "", fmt(g_ms, 3), "", ""))
    rows.append(("  of which kernel (sys)", "", fmt(sys_ms, 3), "", ""))
    return rows


def error_lines(name: str, phase: Phase) -> list[str]:
    if not phase.errors:
        return []
    return [f"  !! {name}: {phase.errors} failed requests, e.g. {sample}" for sample in phase.error_samples[:1]]


# -- main --------------------------------------------------------------------


def machine_line() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: nproc {nproc}, {cpu or platform.machine()}, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}")


async def bench(args: argparse.Namespace, gateway_url: str, mock_url: str, pids: dict[str, int]) -> tuple[dict[str, Phase], int]:
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    targets = {"direct": mock_url + "/chat/completions", "gateway": gateway_url + "/v1/chat/completions"}
    plain_body = chat_body(args.words, stream=False)
    stream_body = chat_body(args.stream_words, stream=True)
    connector = aiohttp.TCPConnector(limit=2 * args.concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    phases = {f"{mode}/{target}": Phase() for mode in ("plain", "stream") for target in targets}
    gateway_sent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up, not counted: connections open, encodings and code paths hot on both sides.
        for target, url in targets.items():
            scratch = Phase()
            await run_round(session, url, plain_body, headers, scratch, stream=False, count=args.warmup,
                            seconds=None, concurrency=args.concurrency, pids={})
            await run_round(session, url, stream_body, headers, scratch, stream=True, count=args.concurrency,
                            seconds=None, concurrency=args.concurrency, pids={})
            if scratch.errors:
                raise RuntimeError(f"warm-up against {target} failed: {scratch.error_samples}")
            if target == "gateway":
                gateway_sent += scratch.requests
        for mode, body, per_target in (("plain", plain_body, args.requests), ("stream", stream_body, args.stream_requests)):
            count = None if args.seconds else max(1, math.ceil(per_target / args.rounds))
            if mode == "stream" and count is not None:
                # Streams of one length, started together, run in waves: a partial last
                # wave would leave workers idle and understate streams/s.
                count = math.ceil(count / args.concurrency) * args.concurrency
            seconds = args.seconds / args.rounds if args.seconds else None
            for round_no in range(args.rounds):
                order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
                for target in order:
                    phase = phases[f"{mode}/{target}"]
                    before = phase.requests
                    await run_round(session, targets[target], body, headers, phase, stream=mode == "stream",
                                    count=count, seconds=seconds, concurrency=args.concurrency, pids=pids)
                    if target == "gateway":
                        gateway_sent += phase.requests - before
                print(f"  {mode} round {round_no + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return phases, gateway_sent


def report(args: argparse.Namespace, phases: dict[str, Phase], log_lines: int | None, gateway_sent: int) -> str:
    out = []
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out.append(f"Sluice gateway load benchmark, {now}")
    out.append(machine_line())
    out.append(
        f"load: concurrency {args.concurrency}, {args.rounds} alternating rounds per mode, client in this process; "
        f"mock delay {args.delay_ms:g} ms; gateway: {args.store} store, logging info/json unbuffered to a file, "
        f"moderation {'on (email redact + 1,000-term block list)' if args.moderation else 'off'}"
    )
    pd, pg = phases["plain/direct"], phases["plain/gateway"]
    sd, sg = phases["stream/direct"], phases["stream/gateway"]

    okd, okg = len(pd.latencies), len(pg.latencies)
    rps_d, rps_g = ratio(okd, pd.wall), ratio(okg, pg.wall)
    out.append("")
    out.append(f"non-streamed chat, {args.words}-word answers ({okd} direct / {okg} gateway requests; "
               f"the mock waits {args.delay_ms:g} ms once per answer)")
    rows = [("requests/s", fmt(rps_d), fmt(rps_g), fmt(ratio(rps_g, rps_d), 2), "")]
    rows += latency_rows("latency", pd.latencies, pg.latencies)
    if pg.overheads_ms:
        rows.append(("x-sluice-overhead-ms p50", "", fmt(percentile(pg.overheads_ms, 50), 2), "", ""))
        rows.append(("x-sluice-overhead-ms p99", "", fmt(percentile(pg.overheads_ms, 99), 2), "", ""))
    rows += cpu_rows(pd, pg, "request", okd, okg)
    rows.append(("failed requests", str(pd.errors), str(pg.errors), "", ""))
    out.append(table(rows))
    out += error_lines("non-streamed direct", pd) + error_lines("non-streamed gateway", pg)

    okd, okg = len(sd.ttfts), len(sg.ttfts)
    cps_d, cps_g = ratio(sd.chunks, sd.wall), ratio(sg.chunks, sg.wall)
    out.append("")
    out.append(f"streamed chat, {args.stream_words}-word answers ({okd} direct / {okg} gateway streams; the mock waits "
               f"{args.delay_ms:g} ms before each content chunk, so a stream takes >= "
               f"{args.stream_words * args.delay_ms / 1000:g} s)")
    rows = latency_rows("TTFT", sd.ttfts, sg.ttfts)
    rows += latency_rows("whole stream", sd.latencies, sg.latencies)
    rows.append(("content chunks/s", fmt(cps_d, 0), fmt(cps_g, 0), fmt(ratio(cps_g, cps_d), 2), ""))
    rows.append(("streams/s", fmt(ratio(okd, sd.wall)), fmt(ratio(okg, sg.wall)),
                 fmt(ratio(ratio(okg, sg.wall), ratio(okd, sd.wall)), 2), ""))
    rows += cpu_rows(sd, sg, "chunk", sd.chunks, sg.chunks)
    rows.append(("failed streams", str(sd.errors), str(sg.errors), "", ""))
    out.append(table(rows))
    out += error_lines("streamed direct", sd) + error_lines("streamed gateway", sg)

    out.append("")
    if log_lines is None:
        out.append("gateway log: not read")
    else:
        out.append(f"gateway log: {log_lines} request lines written for {gateway_sent} gateway requests "
                   f"(warm-up included)")
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    timed = [p for p in phases.values() if p.wall]
    busy = max(sum(p.cpu.values()) / p.wall for p in timed)
    other = max(p.cpu["other"] / p.wall for p in timed)
    if busy > 0.8 * nproc:
        out.append(f"note: up to {busy:.1f} of {nproc} cores were busy in a phase: the machine is "
                   f"saturated, so the ratios include CPU contention between the processes")
    if other > 0.1:
        out.append(f"warning: other processes used up to {100 * other:.0f}% of a core during a phase; "
                   f"rerun on a quiet machine for figures you can compare")
    return "\n".join(out)


def count_log_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as handle:
        for line in handle:
            if b'"event": "request"' in line or b'"event":"request"' in line:
                lines += 1
    return lines


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


def print_profile(path: Path, top: int = 30) -> None:
    import pstats

    print(f"\ngateway profile (cProfile timed by process CPU time, {path}); cProfile slows the gateway, so "
          f"this run's figures are not representative; the profile shows where its CPU goes")
    for sort in ("tottime", "cumulative"):
        print(f"\n-- top {top} by {sort} --")
        stats = pstats.Stats(str(path))
        stats.sort_stats(sort).print_stats(top)
    print("(ncalls of a coroutine count its resumptions, not its calls)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gateway vs direct-to-mock load benchmark (not a test).")
    parser.add_argument("--requests", type=int, default=2000, help="non-streamed requests per target (default 2000)")
    parser.add_argument("--stream-requests", type=int, default=400,
                        help="streams per target, rounded up to whole waves of --concurrency per round (default 400)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instead of counts: seconds per target per mode, split over the rounds")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the mock's delay (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating direct/gateway rounds per mode")
    parser.add_argument("--warmup", type=int, default=200, help="non-streamed warm-up requests per target")
    parser.add_argument("--words", type=int, default=20, help="words in a non-streamed answer")
    parser.add_argument("--stream-words", type=int, default=50, help="words (content chunks) in a streamed answer")
    parser.add_argument("--store", choices=("memory", "sqlite", "redis"), default="memory",
                        help="the gateway's quota store (redis: a redis-server started on a free loopback port)")
    parser.add_argument("--moderation", action="store_true", help="email redact rule + 1,000-term block list")
    parser.add_argument("--profile", metavar="FILE", help="run the gateway under cProfile, save to FILE, print the top")
    args = parser.parse_args()
    for name in ("requests", "stream_requests", "concurrency", "rounds", "words", "stream_words"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.delay_ms < 0 or (args.seconds is not None and args.seconds <= 0):
        parser.error("--warmup and --delay-ms must be >= 0, --seconds > 0")
    return args


def main() -> int:
    args = parse_args()
    mock_port, gateway_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp_name:
        tmp = Path(tmp_name)
        redis = None
        if args.store == "redis":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from redis_server import RedisServer

            redis = RedisServer(tmp / "redis")
            redis.start()
        accounting = {
            "memory": {"store": "memory"},
            "sqlite": {"store": "sqlite", "sqlite_path": str(tmp / "sluice.db")},
            "redis": {"store": "redis", "redis_url": redis.url if redis else ""},
        }[args.store]
        config = write_config(tmp, gateway_port, mock_port, args.moderation, accounting)
        gateway_log, gateway_err, mock_err = tmp / "gateway.log", tmp / "gateway.err", tmp / "mock.err"
        mock = gateway = None
        log_lines: int | None = None
        files = [gateway_log.open("wb"), gateway_err.open("wb"), mock_err.open("wb")]
        try:
            mock = start_process(
                [sys.executable, "-m", "proxy", "mock-upstream", "--host", "127.0.0.1", "--port", str(mock_port),
                 "--delay-ms", str(args.delay_ms)],
                subprocess.DEVNULL, files[2],
            )
            if args.profile:
                runner = [sys.executable, "-c", PROFILED_GATEWAY, str(Path(args.profile).resolve())]
            else:
                runner = [sys.executable, "-m", "proxy"]
            gateway = start_process(runner + ["serve", "--config", str(config)], files[0], files[1])
            pids = {"gateway": gateway.pid, "mock": mock.pid}
            gateway_url, mock_url = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{mock_port}/v1"

            async def run() -> tuple[dict[str, Phase], int]:
                async with aiohttp.ClientSession() as probe:
                    await wait_healthy(probe, mock_url + "/models", mock, "mock upstream", mock_err)
                    await wait_healthy(probe, gateway_url + "/healthz", gateway, "gateway", gateway_err)
                return await bench(args, gateway_url, mock_url, pids)

            try:
                phases, gateway_sent = asyncio.run(run())
            except RuntimeError as exc:
                print(f"bench_gateway: {exc}", file=sys.stderr)
                return 1
            stop_process(gateway)  # flushes the gateway's log (and the profile)
            log_lines = count_log_lines(gateway_log)
            print()
            print(report(args, phases, log_lines, gateway_sent))
            if gateway.returncode not in (0, -signal.SIGTERM):
                print(f"gateway exited with {gateway.returncode}:\n{gateway_err.read_text(errors='replace')[-2000:]}")
        finally:
            stop_process(gateway)
            stop_process(mock)
            if redis is not None:
                redis.stop()
            for handle in files:
                handle.close()
    if args.profile:
        print_profile(Path(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
