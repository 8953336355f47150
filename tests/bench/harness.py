"""What the benchmarks share: child processes on loopback, /proc readings, the machine line.

Every benchmark starts its services as child processes on free loopback
ports, reads their CPU time and memory from /proc (Linux), and stops them
whatever happens. Nothing here measures anything by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import signal
import socket
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-bench-0123456789abcdef"
MODEL = "gpt-4o-mini"
# Plain words that none of the generated moderation terms can match.
_SENTENCE = (
    "the quick brown fox jumps over a lazy dog while seven tired engineers measure every "
    "request that passes through their gateway and write down what they saw"
)
WORDS = tuple(_SENTENCE.split())
STARTUP_SECONDS = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def words(count: int) -> str:
    """``count`` words of plain prose, cycling through WORDS."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


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


# -- /proc ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: a server that forks workers is measured whole."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def pin(pid: int, cpus: set[int] | None) -> None:
    """Keep every thread of ``pid`` and of its descendants on ``cpus`` (None: leave them be).

    Threads get their own affinity on Linux, and a new thread inherits its
    creator's, so pinning all of them right after start holds for later ones.
    """
    if not cpus:
        return
    for member in process_tree(pid):
        try:
            threads = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):  # gone already
                os.sched_setaffinity(int(thread), cpus)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live descendants."""
    user = system = 0.0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            user += int(fields[11]) / CLK_TCK
            system += int(fields[12]) / CLK_TCK
    return user, system


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


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
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: nproc {nproc}, {cpu or platform.machine()}, {memory:.0f} GiB, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, aiohttp {aiohttp.__version__}")


# -- child processes -----------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # SLUICE_* variables would override the benchmark's config. Unbuffered stdout, as
    # container images usually set it: each log line is written when the request ends.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_process(argv: list[str], stdout: Any, stderr: Any, env: dict[str, str] | None = None,
                  cwd: Path = REPO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, cwd=cwd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True,  # our Ctrl-C does not reach it; we stop it ourselves
    )


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers: forked workers go too."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


async def wait_healthy(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], name: str,
                       stderr_path: Path, headers: dict[str, str] | None = None,
                       deadline_seconds: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{stderr_path.read_text(errors='replace')[-3000:]}")
        try:
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                await resp.read()
                if resp.status < 500:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url} within {deadline_seconds:.0f} s")
