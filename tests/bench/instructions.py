"""Instructions per request: what a gateway's CPU work costs, counted rather than timed.

    python -m tests.bench.instructions                       # chat and stream, Sluice, the bare proxy, the mock
    python -m tests.bench.instructions --requests 500 --only chat --targets sluice
    python -m tests.bench.instructions --targets sluice --workers 1,2   # Sluice with 1 and with 2 workers

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

With ``--workers 1,2`` Sluice runs once per count (``sluice``, ``sluice-2w``).
A target of N > 1 workers is ``sluice serve`` with ``server.workers: N``
under callgrind with ``--trace-children=yes``: the supervisor and every
worker it forks are counted, each in a file of its own. Instrumentation is
off while they start (the supervisor's start and every worker's, as for one
process), switched on in every one of them before the measured requests
and off after; the figure is the sum over all of them (the supervisor, idle
in ``select``, adds next to nothing), and each worker's share is printed,
since the kernel, not the client, chooses which worker takes a connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.bench.harness import SECRET, free_port, start_process, stop_process, wait_healthy, words
from tests.bench.suite import sluice_config, target_name, wait_all_serving

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
    """``argv`` under callgrind, each process (forked workers too) counted into ``<out>.<pid>``."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
            f"--callgrind-out-file={out}.%p", *argv]


def total_instructions(out_dir: Path, stem: str, pid: int) -> int:
    """The ``totals:`` of every dump callgrind wrote for one process (one per ``callgrind_control -d``)."""
    total = 0
    base = f"{stem}.{pid}"
    for dump in out_dir.glob(f"{base}*"):
        if dump.name != base and not dump.name.startswith(base + "."):
            continue  # another pid that starts with the same digits
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


async def send(sessions: list[aiohttp.ClientSession], url: str, headers: dict[str, str], body: bytes, count: int) -> int:
    """``count`` requests, one at a time on each session (one connection each); returns the content chunks read."""
    remaining = count
    chunks = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, chunks
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
                async for line in resp.content:
                    chunks += line.startswith(b"data: {")

    await asyncio.gather(*(worker(session) for session in sessions))
    return chunks


def one_connection(timeout: aiohttp.ClientTimeout, local_port: int = 0) -> aiohttp.ClientSession:
    """A session on one keep-alive connection (from ``local_port``, to find it in ``/proc``)."""
    local = {"local_addr": ("127.0.0.1", local_port)} if local_port else {}
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, **local), timeout=timeout)


def socket_owner(pids: list[int], client_port: int) -> int | None:
    """The process among ``pids`` holding the server side of the loopback connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == client_port:  # remote end: the client's port
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


async def sessions_on_every_worker(url: str, workers: list[int], concurrency: int,
                                   timeout: aiohttp.ClientTimeout) -> list[aiohttp.ClientSession]:
    """``concurrency`` one-connection sessions, as many on each worker as can be (the kernel picks a
    connection's worker: connections are opened and kept or closed until the spread is even)."""
    want = {pid: concurrency // len(workers) + (i < concurrency % len(workers)) for i, pid in enumerate(workers)}
    kept: list[aiohttp.ClientSession] = []
    for _ in range(40 * concurrency):
        client_port = free_port()
        session = one_connection(timeout, client_port)
        async with session.get(url) as resp:
            await resp.read()
        owner = socket_owner(workers, client_port)
        if owner is not None and want.get(owner, 0) > 0:
            want[owner] -= 1
            kept.append(session)
            if len(kept) == concurrency:
                return kept
        else:
            await session.close()
    for session in kept:
        await session.close()
    raise RuntimeError(f"could not spread {concurrency} connections over the workers {workers}")


@dataclass
class Counted:
    per_request: float
    per_chunk: float | None
    shares: list[float]  # with workers: each worker's part of the instructions, the supervisor's last


async def measure(target: str, workload: Workload, opts: argparse.Namespace, tmp: Path, workers: int = 1) -> Counted:
    """Instructions per request (and per streamed chunk) of ``target`` under ``workload``."""
    procs: list[subprocess.Popen[bytes]] = []
    name = target_name(target, workers)
    err_path = tmp / f"{name}-{workload.name}.err"
    out_stem = f"{name}-{workload.name}.cg"
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
                                           {"store": opts.store, "sqlite_path": str(tmp / f"{name}-{workload.name}.db")},
                                           workers=workers)
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
            async with one_connection(timeout) as probe:
                await wait_healthy(probe, health, measured, name, err_path, deadline_seconds=STARTUP_SECONDS)
            pids = [measured.pid]
            if workers > 1:  # the supervisor logs (to stdout, here the err file) once every worker serves
                await wait_all_serving(measured, err_path, err_path, name, seconds=STARTUP_SECONDS)
                pids = [*children(measured.pid), measured.pid]
                if len(pids) != workers + 1:
                    raise RuntimeError(f"{name}: expected {workers} workers, found {pids[:-1]}")
                sessions = await sessions_on_every_worker(health, pids[:-1], opts.concurrency, timeout)
            else:
                sessions = [one_connection(timeout) for _ in range(opts.concurrency)]
            try:
                await send(sessions, url, headers, payload, WARMUP if not workload.stream else WARMUP // 10)
                for pid in pids:
                    control(pid, "-i", "on")
                chunks = await send(sessions, url, headers, payload, count)
                for pid in pids:
                    control(pid, "-i", "off")
                for pid in pids:
                    control(pid, "-d")
            finally:
                for session in sessions:
                    await session.close()
        counts = [total_instructions(tmp, out_stem, pid) for pid in pids]
        instructions = sum(counts)
        if not instructions:
            raise RuntimeError(f"callgrind wrote no counts for {name}:\n{err_path.read_text(errors='replace')[-2000:]}")
        shares = [n / instructions for n in counts] if workers > 1 else []
        return Counted(instructions / count, instructions / chunks if chunks else None, shares)
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value / 1000:,.0f} k{unit}"


async def main_async(opts: argparse.Namespace) -> int:
    workloads = [w for w in (CHAT, STREAM) if opts.only in (None, w.name)]
    # Each target once, Sluice once per worker count: (target, workers).
    runs = [(t, n) for t in opts.targets.split(",") for n in (opts.workers if t == "sluice" else [1])]
    print(f"instructions counted by callgrind; {opts.requests} whole answers of {PROMPT_WORDS} words, "
          f"{opts.streams} streams of {STREAM_WORDS} one-word chunks; concurrency {opts.concurrency}; "
          f"Sluice: {'no moderation' if opts.no_moderation else 'six PII rules and 10,000 terms'}, {opts.store} store")
    with tempfile.TemporaryDirectory(prefix="sluice-instr-") as tmp_name:
        for workload in workloads:
            results: dict[str, Counted] = {}
            for target, workers in runs:
                name = target_name(target, workers)
                print(f"  {workload.name} / {name} ...", file=sys.stderr, flush=True)
                results[name] = await measure(target, workload, opts, Path(tmp_name), workers)
            print(f"\n{workload.name}: instructions per request (per content chunk)", flush=True)
            base = results["mock"].per_request if "mock" in results else None
            for name, counted in results.items():
                ratio = f"{counted.per_request / base:.2f}x the mock" if base else ""
                shares = ""
                if counted.shares:
                    *each, parent = counted.shares
                    shares = f"  workers {' / '.join(f'{share:.0%}' for share in each)}, supervisor {parent:.2%}"
                print(f"  {name:10s} {fmt(counted.per_request, 'instr'):>16s}  {fmt(counted.per_chunk, 'instr/chunk'):>22s}"
                      f"  {ratio}{shares}", flush=True)
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
    parser.add_argument("--workers", default="1", help="comma-separated worker counts to run Sluice with (default 1)")
    opts = parser.parse_args()
    unknown = set(opts.targets.split(",")) - {"mock", "bare", "sluice"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    try:
        opts.workers = sorted({int(n) for n in opts.workers.split(",")})
    except ValueError:
        parser.error("--workers takes comma-separated numbers, such as 1,2")
    if min(opts.workers) < 1:
        parser.error("--workers: at least 1")
    if opts.store == "memory" and max(opts.workers) > 1:
        parser.error("--store memory serves one process only: workers need sqlite")
    return opts


def main() -> int:
    opts = parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    sys.exit(main())
