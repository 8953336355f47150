"""Soak: a bounded run of mixed traffic through the gateway, watching its memory and file descriptors.

Run from the repository root with the project's venv:

    python tests/bench/soak.py [--minutes 10] [--concurrency 50] [--seed N]

It starts two processes on free loopback ports and always stops them at the
end, as the benchmark suite does: the mock model (``python -m proxy mock-upstream``)
and the gateway (``python -m proxy serve --config <temp yaml>``: sqlite store in
a temp dir, moderation on with an email redact rule and a 20-term block list,
logging at info in JSON to a temp file). ``--concurrency`` workers in this
process send a fixed mix until the time is up:

    63%  streamed chat of 5-150 words, read to the end
     7%  streamed chat abandoned by the client at a random chunk (about 10% of streams)
    20%  non-streamed chat of 5-100 words
     5%  faults scripted in the body: {"mock": {"drop_after": 2}} or {"mock": {"status": 500}},
         streamed or not
     5%  block rule: 3% a prompt with a blocked term (400 content_filter),
         2% a streamed answer with a blocked term (content_filter mid-stream)

Some prompts carry an email (redacted on input) and some streams have the mock
reply with one (redacted on output, across chunks); the client checks that no
email and no blocked term reaches it. The mock waits 5-10 ms (random per
request) before each streamed chunk and once before a non-streamed answer.

Every ``--sample-seconds`` it reads the gateway's VmRSS and open fds from
/proc. It prints requests by outcome (and per kind of request, with any
outcome that kind should not have), RSS after warm-up and at the end of the
load with the growth, the peak, fds, and ``sluice_active_streams`` after the
drain. It exits non-zero only when the harness itself failed (a process would
not start or died), never on the figures. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.auth import hash_key

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder is not a package
from harness import (
    MODEL,
    SECRET,
    WORDS,
    free_port,
    machine_line,
    moderation_terms,
    start_process,
    stop_process,
    wait_healthy,
)

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_read=30)
DRAIN_SECONDS = 10.0
MIB = 1024 * 1024
BLOCK_TERMS = moderation_terms(20)
EMAILS = ("alice.smith@example.com", "bob_jones+soak@mail.example.org", "c.d@sub.example.net")

# (kind, weight in %). The weights add up to 100.
MIX = (
    ("stream", 63.0),
    ("stream-abandon", 7.0),
    ("plain", 20.0),
    ("fault-drop-stream", 1.5),
    ("fault-drop-plain", 1.0),
    ("fault-500-stream", 1.25),
    ("fault-500-plain", 1.25),
    ("block-prompt", 3.0),
    ("block-answer", 2.0),
)

COMPLETE = "200 complete"
ABANDONED = "200 abandoned by client"
BLOCKED_MID_STREAM = "200 blocked mid-stream (finish_reason content_filter)"
NO_END = "200 stream ended without [DONE] or error event"
LEAKED = "200 but moderated text reached the client"
BAD_BODY = "200 with an unreadable body"

# What each kind of request should end as; anything else is listed as unexpected.
EXPECTED = {
    "stream": {COMPLETE},
    "stream-abandon": {ABANDONED, COMPLETE},  # COMPLETE if the stream had fewer events than the chosen point
    "plain": {COMPLETE},
    "fault-drop-stream": {"mid-stream error event: upstream_error"},
    "fault-drop-plain": {"502 upstream_error"},
    "fault-500-stream": {"500 server_error"},
    "fault-500-plain": {"500 server_error"},
    "block-prompt": {"400 content_filter"},
    "block-answer": {BLOCKED_MID_STREAM},
}


class HarnessError(Exception):
    """The soak itself could not run (a process would not start, or died)."""


# -- the gateway's process, from /proc ------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def fd_kinds(pid: int, gateway_port: int, mock_port: int) -> Counter:
    """The process's descriptors by kind: TCP sockets by role and state, other files by name."""
    sockets: dict[str, tuple[int, int, str]] = {}  # inode -> local port, remote port, state
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
            sockets[cols[9]] = (local, remote, _TCP_STATES.get(cols[3], cols[3]))
    kinds: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            entry = sockets.get(target[8:-1])
            if entry is None:
                kinds["socket (not TCP)"] += 1
            elif entry[2] == "LISTEN":
                kinds["listening socket"] += 1
            elif entry[1] == mock_port:
                kinds[f"upstream connection {entry[2]}"] += 1
            elif entry[0] == gateway_port:
                kinds[f"client connection {entry[2]}"] += 1
            else:
                kinds[f"other TCP {entry[2]}"] += 1
        elif target.startswith(("pipe:", "anon_inode:")):
            kinds[target.split("[")[0].rstrip(":") if target.startswith("pipe:") else target] += 1
        else:
            kinds[Path(target).name] += 1
    return kinds


def kinds_line(kinds: Counter) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda x: (-x[1], x[0])))


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    hwm_kib: int
    fds: int
    served: int


# -- the load ---------------------------------------------------------------------


@dataclass
class Tally:
    served: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    unexpected_samples: dict[tuple[str, str], str] = field(default_factory=dict)
    moderated_checks: int = 0  # answers checked for a leaked email or blocked term

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.served += 1
        self.outcomes[outcome] += 1
        self.by_kind[kind][outcome] += 1
        if outcome not in EXPECTED[kind] and (kind, outcome) not in self.unexpected_samples:
            self.unexpected_samples[(kind, outcome)] = detail[:300]


def error_label(status: int, payload: bytes) -> str:
    code = ""
    try:
        error = json.loads(payload).get("error") or {}
        code = error.get("code") or error.get("type") or ""
    except (ValueError, AttributeError):
        code = "(no JSON error body)"
    return f"{status} {code}".strip()


def words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def build_request(kind: str, rng: random.Random) -> tuple[dict[str, Any], list[str], int]:
    """The body for one request of ``kind``, the strings that must never reach the client, the answer's words."""
    stream = kind.startswith("stream") or kind.endswith("-stream") or kind == "block-answer"
    text = words(rng, 5, 150 if stream else 100)
    forbidden: list[str] = []
    answer_words = len(text)
    mock: dict[str, Any] = {"delay_ms": rng.uniform(5, 10)}
    if kind in ("stream", "stream-abandon", "plain") and rng.random() < 0.2:
        email = rng.choice(EMAILS)  # redacted on input: the mock echoes the redaction
        text.insert(rng.randrange(len(text) + 1), email)
        forbidden.append(email)
    if kind in ("stream", "stream-abandon") and rng.random() < 0.15:
        email = rng.choice(EMAILS)  # the answer carries it: redacted on output, across chunks
        reply = words(rng, 5, 100)
        reply.insert(rng.randrange(len(reply) + 1), email)
        mock["reply"] = " ".join(reply)
        forbidden.append(email)
        answer_words = len(reply)
    if kind == "block-prompt":
        term = rng.choice(BLOCK_TERMS)
        text.insert(rng.randrange(len(text) + 1), term)
    elif kind == "block-answer":
        term = rng.choice(BLOCK_TERMS)
        reply = words(rng, 5, 60)
        reply.insert(rng.randrange(1, len(reply) + 1), term)
        mock["reply"] = " ".join(reply)
        forbidden.append(term)
    elif kind.startswith("fault-drop"):
        mock["drop_after"] = 2
    elif kind.startswith("fault-500"):
        mock["status"] = 500
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": " ".join(text)}], "mock": mock}
    if stream:
        body["stream"] = True
        if rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    return body, forbidden, answer_words


async def one_request(session: aiohttp.ClientSession, url: str, headers: dict[str, str], kind: str,
                      rng: random.Random, tally: Tally) -> None:
    body, forbidden, answer_words = build_request(kind, rng)
    data = json.dumps(body).encode()
    try:
        async with session.post(url, data=data, headers=headers) as resp:
            if resp.status != 200:
                payload = await resp.read()
                tally.add(kind, error_label(resp.status, payload), payload[:300].decode(errors="replace"))
                return
            if not body.get("stream"):
                payload = await resp.read()
                try:
                    document = json.loads(payload)
                    _ = document["choices"][0]["message"]
                except (ValueError, KeyError, IndexError, TypeError):
                    tally.add(kind, BAD_BODY, payload[:300].decode(errors="replace"))
                    return
                if forbidden:
                    tally.moderated_checks += 1
                    if any(s.encode() in payload for s in forbidden):
                        tally.add(kind, LEAKED, payload[:300].decode(errors="replace"))
                        return
                tally.add(kind, COMPLETE)
                return
            # Events before the end: the role chunk, then one per word. Hang up after 1..words of them.
            abandon_at = rng.randint(1, answer_words) if kind == "stream-abandon" else None
            events = 0
            seen = bytearray() if forbidden else None
            blocked = False
            outcome, detail = NO_END, ""
            async for line in resp.content:
                if seen is not None:
                    seen += line
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    outcome = BLOCKED_MID_STREAM if blocked else COMPLETE
                    break
                if line.startswith(b'data: {"error"'):
                    try:
                        code = json.loads(line[6:])["error"].get("code")
                    except (ValueError, KeyError, AttributeError):
                        code = "(unreadable)"
                    outcome, detail = f"mid-stream error event: {code}", line[:300].decode(errors="replace")
                    break
                if b"content_filter" in line and b"finish_reason" in line:
                    blocked = True  # [DONE] follows
                events += 1
                if abandon_at is not None and events >= abandon_at:
                    resp.close()  # hang up mid-stream: the gateway must cancel its upstream request
                    tally.add(kind, ABANDONED)
                    return
            if seen is not None:
                tally.moderated_checks += 1
                if any(s.encode() in seen for s in forbidden):
                    outcome, detail = LEAKED, bytes(seen[:300]).decode(errors="replace")
            tally.add(kind, outcome, detail)
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        tally.add(kind, f"client exception: {type(exc).__name__}", f"{type(exc).__name__}: {exc}")


def pick_kind(rng: random.Random) -> str:
    return rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]


async def worker(session: aiohttp.ClientSession, url: str, headers: dict[str, str], rng: random.Random,
                 deadline: float, stop: asyncio.Event, tally: Tally) -> None:
    while time.monotonic() < deadline and not stop.is_set():
        await one_request(session, url, headers, pick_kind(rng), rng, tally)


# -- metrics ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


async def scrape(session: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        out.append((match.group(1), labels, float(match.group(3))))
    return out


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, by: str | None = None) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for metric, labels, value in samples:
        if metric == name:
            totals[labels.get(by, "") if by else ""] += value
    return dict(totals)


# -- the run ----------------------------------------------------------------------


@dataclass
class Result:
    tally: Tally
    load_seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    before: Sample | None = None  # idle, before the load
    warm: Sample | None = None  # the first sample at or after the warm-up
    at_deadline: Sample | None = None  # the moment the workers stop starting requests
    after_drain: Sample | None = None  # idle again, client connections closed
    drain_seconds: float | None = None
    active_streams_end: float | None = None
    idle_fds: int | None = None  # once idle upstream connections have expired (or --idle-wait ran out)
    idle_seconds: float | None = None
    fd_kinds_before: Counter = field(default_factory=Counter)
    fd_kinds_idle: Counter = field(default_factory=Counter)
    gateway_requests: dict[str, float] = field(default_factory=dict)
    moderation_actions: dict[str, float] = field(default_factory=dict)
    upstream_errors: dict[str, float] = field(default_factory=dict)
    mock_rss_kib: tuple[int, int] | None = None  # mock after warm-up, at the deadline


def take_sample(pid: int, t: float, served: int, proc: Any) -> Sample:
    if proc.poll() is not None:
        raise HarnessError(f"the gateway exited with {proc.returncode} during the soak")
    status = proc_status(pid)
    return Sample(t, status["VmRSS"], status["VmHWM"], open_fds(pid), served)


async def soak(args: argparse.Namespace, gateway_url: str, gateway: Any, mock: Any, ports: tuple[int, int]) -> Result:
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    url = gateway_url + "/v1/chat/completions"
    tally = Tally()
    result = Result(tally)
    pid = gateway.pid
    duration = args.minutes * 60
    warmup = min(args.warmup_seconds, duration / 2)
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as probe:
        result.before = take_sample(pid, 0.0, 0, gateway)
        result.fd_kinds_before = fd_kinds(pid, *ports)
        connector = aiohttp.TCPConnector(limit=2 * args.concurrency, limit_per_host=0)
        session = aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT)
        try:
            started = time.monotonic()
            deadline = started + duration
            workers = [
                asyncio.create_task(worker(session, url, headers, random.Random(f"{args.seed}/{i}"), deadline, stop, tally))
                for i in range(args.concurrency)
            ]
            try:
                next_sample = started + args.sample_seconds
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    await asyncio.sleep(min(next_sample, deadline) - now)
                    if time.monotonic() < next_sample:
                        continue
                    next_sample += args.sample_seconds
                    sample = take_sample(pid, time.monotonic() - started, tally.served, gateway)
                    result.samples.append(sample)
                    if result.warm is None and sample.t >= warmup - 0.5:
                        result.warm = sample
                        result.mock_rss_kib = (proc_status(mock.pid)["VmRSS"], 0)
                    print(f"  t={sample.t:6.0f}s served {sample.served:>8,}  rss {sample.rss_kib / 1024:7.1f} MiB  "
                          f"fds {sample.fds:4d}{'  (warm-up mark)' if sample is result.warm else ''}",
                          file=sys.stderr, flush=True)
                    if any(task.done() and task.exception() for task in workers):
                        break
                result.at_deadline = take_sample(pid, time.monotonic() - started, tally.served, gateway)
                if result.mock_rss_kib is not None:
                    result.mock_rss_kib = (result.mock_rss_kib[0], proc_status(mock.pid)["VmRSS"])
                print("  time is up; waiting for requests in flight", file=sys.stderr, flush=True)
                await asyncio.gather(*workers)  # each ends within REQUEST_TIMEOUT
            except BaseException:
                stop.set()
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
            result.load_seconds = time.monotonic() - started
        finally:
            await session.close()

        # Drain: every stream the gateway relayed must be over.
        drain_start = time.monotonic()
        while True:
            samples = await scrape(probe, gateway_url + "/metrics")
            active = metric_sum(samples, "sluice_active_streams").get("", 0.0)
            if active == 0 or time.monotonic() - drain_start > DRAIN_SECONDS:
                break
            await asyncio.sleep(0.2)
        result.drain_seconds = time.monotonic() - drain_start
        result.active_streams_end = active
        result.gateway_requests = metric_sum(samples, "sluice_requests_total", "status")
        result.moderation_actions = {
            f"{labels.get('rule')}/{labels.get('action')}/{labels.get('direction')}": value
            for metric, labels, value in samples if metric == "sluice_moderation_actions_total"
        }
        result.upstream_errors = metric_sum(samples, "sluice_upstream_errors_total", "kind") or metric_sum(
            samples, "sluice_upstream_errors_total"
        )
        await asyncio.sleep(1.0)
        result.after_drain = take_sample(pid, time.monotonic() - started, tally.served, gateway)
        # The gateway keeps idle upstream connections for their keep-alive time (30 s), closed by a sweep
        # that runs every 30 s: up to 60 s in all. Then its fds should be back where they were before the load.
        print(f"  drained; waiting up to {args.idle_wait:g} s for the gateway's fds to fall back to "
              f"{result.before.fds}", file=sys.stderr, flush=True)
        idle_start = time.monotonic()
        while True:
            take_sample(pid, 0, 0, gateway)  # still alive
            result.idle_fds = open_fds(pid)
            result.idle_seconds = time.monotonic() - idle_start
            if result.idle_fds <= result.before.fds or result.idle_seconds >= args.idle_wait:
                break
            await asyncio.sleep(1.0)
        result.fd_kinds_idle = fd_kinds(pid, *ports)
    return result


# -- the report -------------------------------------------------------------------


def mib(kib: int) -> float:
    return kib / 1024


def slope_mib_per_min(samples: list[Sample]) -> float | None:
    if len(samples) < 3:
        return None
    ts = [s.t / 60 for s in samples]
    ys = [mib(s.rss_kib) for s in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None


def report(args: argparse.Namespace, r: Result, log_stats: dict[str, Any]) -> str:
    out = []
    t = r.tally
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out.append(f"Sluice soak, {now}")
    out.append(machine_line())
    out.append(f"load: {args.concurrency} workers for {args.minutes:g} min, seed {args.seed}; mock delay 5-10 ms per chunk; "
               f"gateway: sqlite store, moderation on (email redact + {len(BLOCK_TERMS)}-term block list), "
               f"logging info/json to a file")
    out.append("mix: " + ", ".join(f"{kind} {weight:g}%" for kind, weight in MIX))
    out.append("")
    out.append(f"duration: {r.load_seconds:.1f} s of load (requests in flight at the deadline included)")
    out.append(f"requests served: {t.served:,} ({t.served / r.load_seconds:.1f}/s)")

    def group(prefix_test) -> list[tuple[str, int]]:
        return sorted(((o, n) for o, n in t.outcomes.items() if prefix_test(o)), key=lambda x: (-x[1], x[0]))

    sections = [
        ("200", lambda o: o.startswith("200")),
        ("4xx", lambda o: o[:1] == "4"),
        ("5xx", lambda o: o[:1] == "5"),
        ("mid-stream error events", lambda o: o.startswith("mid-stream")),
        ("client-side exceptions", lambda o: o.startswith("client exception")),
    ]
    for title, test in sections:
        rows = group(test)
        total = sum(n for _, n in rows)
        out.append(f"  {title}: {total:,}")
        for outcome, n in rows:
            out.append(f"    {n:>9,}  {outcome}")
    out.append(f"  answers checked for leaked emails / blocked terms: {t.moderated_checks:,}")

    unexpected = [(kind, outcome, n) for kind, counts in t.by_kind.items() for outcome, n in counts.items()
                  if outcome not in EXPECTED[kind]]
    out.append("")
    out.append("by kind of request (expected outcome; anything else is listed as unexpected):")
    for kind, _ in MIX:
        counts = t.by_kind.get(kind, Counter())
        expected = sum(n for o, n in counts.items() if o in EXPECTED[kind])
        out.append(f"  {kind:<18} {sum(counts.values()):>8,} sent, {expected:>8,} as expected "
                   f"({' or '.join(sorted(EXPECTED[kind]))})")
    if unexpected:
        out.append("  UNEXPECTED outcomes:")
        for kind, outcome, n in sorted(unexpected, key=lambda x: -x[2]):
            sample = t.unexpected_samples.get((kind, outcome), "")
            out.append(f"    {n:>7,}  {kind}: {outcome}" + (f"  e.g. {sample!r}" if sample else ""))
    else:
        out.append("  no unexpected outcomes")

    out.append("")
    out.append("gateway's own count (/metrics sluice_requests_total by status): "
               + ", ".join(f"{s} {int(v):,}" for s, v in sorted(r.gateway_requests.items())))
    if r.upstream_errors:
        out.append("upstream errors (/metrics): " + ", ".join(f"{k} {int(v):,}" for k, v in sorted(r.upstream_errors.items())))
    if r.moderation_actions:
        out.append("moderation actions (/metrics, rule/action/direction): "
                   + ", ".join(f"{k} {int(v):,}" for k, v in sorted(r.moderation_actions.items())))
    out.append(f"gateway log: {log_stats['request_lines']:,} request lines for {t.served:,} requests; "
               f"lines above info: {log_stats['above_info'] or 'none'}")
    out.append(f"gateway stderr: {log_stats['stderr_lines']} lines" +
               (f"; first distinct: {log_stats['stderr_top']}" if log_stats["stderr_lines"] else ""))
    out.append(f"sqlite file: {log_stats['db_mib']:.1f} MiB")

    out.append("")
    out.append("memory and descriptors of the gateway process (VmRSS, /proc/<pid>/fd):")
    b, w, d, a = r.before, r.warm, r.at_deadline, r.after_drain
    assert b and d and a
    out.append(f"  before the load (idle):          rss {mib(b.rss_kib):7.1f} MiB   fds {b.fds}")
    if w:
        out.append(f"  after warm-up (t={w.t:.0f} s, load):   rss {mib(w.rss_kib):7.1f} MiB   fds {w.fds}")
    out.append(f"  end of the load (t={d.t:.0f} s):      rss {mib(d.rss_kib):7.1f} MiB   fds {d.fds}")
    out.append(f"  after the drain (idle):          rss {mib(a.rss_kib):7.1f} MiB   fds {a.fds}")
    if r.idle_fds is not None:
        back = "back to" if r.idle_fds <= b.fds else "NOT back to"
        out.append(f"  idle, {r.idle_seconds:.0f} s after the drain:     fds {r.idle_fds} ({back} the {b.fds} "
                   f"before the load)")
        out.append(f"    fds before the load: {kinds_line(r.fd_kinds_before)}")
        out.append(f"    fds at the end:      {kinds_line(r.fd_kinds_idle)}")
    peak = max([s.hwm_kib for s in r.samples] + [d.hwm_kib, a.hwm_kib])
    out.append(f"  peak rss (VmHWM): {mib(peak):.1f} MiB")
    post = [s for s in r.samples if w and s.t >= w.t]
    slope = slope_mib_per_min(post)
    if slope is not None:
        out.append(f"  trend after warm-up (least squares over {len(post)} samples): {slope:+.2f} MiB/min")
    if len(post) >= 4:
        half = post[len(post) // 2]
        out.append(f"  second half only (t={half.t:.0f} s to the end): {mib(d.rss_kib - half.rss_kib):+.1f} MiB")
    out.append("  rss every sample (MiB): " + " ".join(f"{mib(s.rss_kib):.0f}" for s in r.samples))
    if r.mock_rss_kib and r.mock_rss_kib[1]:
        out.append(f"  (the mock model: rss {mib(r.mock_rss_kib[0]):.1f} MiB after warm-up, "
                   f"{mib(r.mock_rss_kib[1]):.1f} MiB at the end; it keeps its last 10,000 requests)")
    out.append(f"active streams at the end (sluice_active_streams, {r.drain_seconds:.1f} s after the load): "
               f"{r.active_streams_end:g}" + ("" if r.active_streams_end == 0 else "   <-- SHOULD BE 0"))
    out.append("")
    if w:
        growth = d.rss_kib - w.rss_kib
        out.append(f"memory growth after warm-up: {mib(growth):+.1f} MiB ({100 * growth / w.rss_kib:+.1f}%)"
                   f" from t={w.t:.0f} s to t={d.t:.0f} s under load; fds {w.fds} -> {d.fds}")
    else:
        out.append("memory growth after warm-up: not measured (the run was shorter than the warm-up)")
    return "\n".join(out)


def log_figures(log_path: Path, err_path: Path, db_path: Path) -> dict[str, Any]:
    request_lines = 0
    above: Counter = Counter()
    with log_path.open("rb") as handle:
        for line in handle:
            if b'"event": "request"' in line or b'"event":"request"' in line:
                request_lines += 1
                continue
            try:
                entry = json.loads(line)
                level = entry.get("level", "?")
                if level not in ("info", "debug"):
                    above[f"{level}: {str(entry.get('event'))[:80]}"] += 1
            except ValueError:
                above["(not JSON) " + line[:80].decode(errors="replace").strip()] += 1
    err_lines = err_path.read_text(errors="replace").splitlines()
    distinct = Counter(line[:120] for line in err_lines if line.strip() and not line.startswith((" ", "\t")))
    db_bytes = sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*"))
    return {
        "request_lines": request_lines,
        "above_info": ", ".join(f"{k} x{n}" for k, n in above.most_common(5)),
        "stderr_lines": len(err_lines),
        "stderr_top": "; ".join(f"{k!r} x{n}" for k, n in distinct.most_common(3)),
        "db_mib": db_bytes / MIB,
    }


# -- main -------------------------------------------------------------------------


def write_config(tmp: Path, gateway_port: int, mock_port: int) -> Path:
    terms_file = tmp / "terms.txt"
    terms_file.write_text("\n".join(BLOCK_TERMS) + "\n", encoding="utf-8")
    big = 10**12
    config = {
        "server": {"host": "127.0.0.1", "port": gateway_port, "shutdown_grace_seconds": 2},
        "upstreams": [{"name": "mock", "base_url": f"http://127.0.0.1:{mock_port}/v1", "models": ["*"],
                       "connect_timeout_seconds": 5, "read_timeout_seconds": 30}],
        # Limits far above the load: the limiter and the ledger run, never refuse.
        "teams": [{"name": "soak", "models": ["*"], "limits": {
            "requests_per_minute": big, "tokens_per_minute": big, "tokens_per_day": big,
            "tokens_per_month": big, "max_concurrent_requests": 10**6}}],
        "keys": [{"id": "soak", "team": "soak", "sha256": hash_key(SECRET)}],
        "moderation": {"rules": [
            {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
            {"name": "banned", "type": "terms", "terms_file": str(terms_file), "match": "word", "action": "block"},
        ]},
        "accounting": {"store": "sqlite", "sqlite_path": str(tmp / "sluice.db")},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Bounded soak of the gateway: mixed traffic, memory and fds (not a test).")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent workers (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    parser.add_argument("--warmup-seconds", type=float, default=60.0,
                        help="memory growth is measured from the first sample after this (default 60)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sampling interval (default 10)")
    parser.add_argument("--idle-wait", type=float, default=75.0,
                        help="after the drain, wait up to this long for the fds to fall back (default 75)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.concurrency < 1 or args.sample_seconds <= 0 or args.warmup_seconds < 0 or args.idle_wait < 0:
        parser.error("--minutes and --sample-seconds must be > 0, --concurrency >= 1, the others >= 0")
    return args


def main() -> int:
    args = parse_args()
    if not Path("/proc/self/status").exists():
        print("soak: needs Linux /proc", file=sys.stderr)
        return 2
    mock_port, gateway_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as tmp_name:
        tmp = Path(tmp_name)
        config = write_config(tmp, gateway_port, mock_port)
        gateway_log, gateway_err, mock_err = tmp / "gateway.log", tmp / "gateway.err", tmp / "mock.err"
        files = [gateway_log.open("wb"), gateway_err.open("wb"), mock_err.open("wb")]
        mock = gateway = None
        try:
            mock = start_process(
                [sys.executable, "-m", "proxy", "mock-upstream", "--host", "127.0.0.1", "--port", str(mock_port),
                 "--delay-ms", "5"],
                files[2], files[2],
            )
            gateway = start_process([sys.executable, "-m", "proxy", "serve", "--config", str(config)], files[0], files[1])
            gateway_url, mock_url = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{mock_port}/v1"

            async def run() -> Result:
                async with aiohttp.ClientSession() as probe:
                    await wait_healthy(probe, mock_url + "/models", mock, "mock upstream", mock_err)
                    await wait_healthy(probe, gateway_url + "/healthz", gateway, "gateway", gateway_err)
                print(f"soak: {args.minutes:g} min, {args.concurrency} workers, seed {args.seed}; gateway pid "
                      f"{gateway.pid}, mock pid {mock.pid}", file=sys.stderr, flush=True)
                return await soak(args, gateway_url, gateway, mock, (gateway_port, mock_port))

            try:
                result = asyncio.run(run())
            except (HarnessError, RuntimeError, OSError) as exc:
                print(f"soak: harness failed: {exc}", file=sys.stderr)
                if gateway_err.exists():
                    print(gateway_err.read_text(errors="replace")[-3000:], file=sys.stderr)
                return 1
            stop_process(gateway)  # flushes the gateway's log
            for handle in files:
                handle.flush()
            print()
            print(report(args, result, log_figures(gateway_log, gateway_err, tmp / "sluice.db")))
            if gateway.returncode not in (0, -15):
                print(f"note: the gateway exited with {gateway.returncode} on SIGTERM")
        finally:
            stop_process(gateway)
            stop_process(mock)
            for handle in files:
                handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
