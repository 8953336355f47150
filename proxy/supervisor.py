"""``sluice serve`` with ``server.workers`` > 1: the parent of N gateway processes on one port.

How, and why:

- The parent binds the port and forks the workers, which inherit the
  listening sockets: one ``SO_REUSEPORT`` socket per worker slot, all on the
  same port. The kernel spreads new connections evenly over the sockets (one
  shared socket would let whichever worker wakes first take a whole burst),
  and the parent keeps every socket open, so connections queued on a dead
  worker's socket wait for its replacement instead of being reset.
- Each worker is a whole gateway (``proxy.app.serve``, see
  ``proxy.worker``) with its own event loop. Limits are shared through the
  store (``sqlite``: one file; ``redis``), which is why ``memory`` with
  several workers is a config error; metrics through prometheus-client's
  multiprocess files (``proxy.metrics``), in a fresh directory per run that
  the parent removes when it stops.
- The parent never runs an event loop or a second thread: ``fork`` copies
  only the calling thread, so forking beside a loop or threads would leave
  their locks held in the child. It waits in ``select`` on the pipe signal
  handlers write to (``signal.set_wakeup_fd``) and a pipe the workers
  announce themselves on once they serve.
- SIGTERM/SIGINT: every worker drains (new requests 503, streams finish
  within ``shutdown_grace_seconds``) and is killed after that and a margin.
  SIGHUP: the parent checks the new file as a worker's reload would and only
  then signals every worker, so a config one would refuse is refused by all.
- A worker that dies is reaped, its live gauges are dropped and it is forked
  again: at once, or after a doubling delay while it keeps dying young. A
  worker that fails while the first ones start stops the whole ``serve``
  (exit 1), as a single process would.
"""

from __future__ import annotations

import gc
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from . import logs
from .config import Settings, worker_count
from .logs import log
from .metrics import forget_worker
from .app import LISTEN_BACKLOG
from .tokens import preload, set_encodings_dir
from .worker import DEFERRED_SIGNALS, WorkerLink, become_worker, check_new_config

# How long a worker may take to start (open the store, load the encodings) before it is given up on.
START_TIMEOUT_SECONDS = 60.0
# After the grace period, how long the parent waits for a worker's own clean-up before killing it.
STOP_MARGIN_SECONDS = 5.0
# A worker that dies younger than this is crash-looping: its restarts back off, up to the cap.
YOUNG_SECONDS = 10.0
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class _Worker:
    slot: int
    pid: int
    started: float
    ready: bool = False
    given_up: bool = False  # killed for not starting in time


@dataclass
class _Slot:
    sockets: list[socket.socket]
    worker: _Worker | None = None
    restart_at: float | None = None
    quick_deaths: int = 0


class Supervisor:
    """The parent process; ``serve_worker(settings, link)`` runs a gateway in a forked child and returns its exit code."""

    def __init__(
        self,
        settings: Settings,
        config_path: str,
        host: str,
        port: int,
        workers: int,
        serve_worker: Callable[[Settings, WorkerLink], int],
    ):
        self.settings = settings  # what a worker forked now starts with: the last config accepted
        self.config_path = config_path
        self.host, self.port, self.workers = host, port, workers
        self.serve_worker = serve_worker
        self._slots: list[_Slot] = []
        self._metrics_sockets: list[socket.socket] = []

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 after a clean stop, 1 if the workers could not start."""
        try:
            self._bind()
        except OSError as exc:
            print(f"sluice serve: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            self._close_sockets()
            return 1
        self._parent_pid = os.getpid()
        self._metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._ready_r, False)
        previous = {sig: signal.signal(sig, _ignore) for sig in (*DEFERRED_SIGNALS, signal.SIGCHLD)}
        signal.set_wakeup_fd(self._wake_w)
        try:
            _share_before_fork(self.settings)
            for slot in self._slots:
                self._spawn(slot)
            port = self._slots[0].sockets[0].getsockname()[1]
            log.info(
                "supervising", workers=self.workers, host=self.host, port=port, pids=self._pids(), metrics_dir=self._metrics_dir
            )
            return self._loop()
        finally:
            self._kill_all(signal.SIGKILL)  # only workers still alive after an error in the parent
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
                os.close(fd)
            self._close_sockets()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    # -- sockets ----------------------------------------------------------------

    def _bind(self) -> None:
        """One SO_REUSEPORT socket per slot and address; the first one picks the port when it is 0."""
        port = self.port
        addresses = _addresses(self.host, port)
        for _ in range(self.workers):
            sockets = []
            for family, address in addresses:
                sock = _listening_socket(family, (address[0], port, *address[2:]), reuse_port=True)
                port = sock.getsockname()[1]
                sockets.append(sock)
            self._slots.append(_Slot(sockets))
        metrics_port = self.settings.server.metrics_port
        if metrics_port is not None:
            # Every worker answers with the sums over all of them, so one shared socket does.
            for family, address in _addresses(self.host, metrics_port):
                sock = _listening_socket(family, (address[0], metrics_port, *address[2:]), reuse_port=False)
                metrics_port = sock.getsockname()[1]
                self._metrics_sockets.append(sock)

    def _close_sockets(self) -> None:
        for sock in [s for slot in self._slots for s in slot.sockets] + self._metrics_sockets:
            sock.close()

    # -- the loop ---------------------------------------------------------------

    def _loop(self) -> int:
        phase, code = "starting", 0
        stop_by = float("inf")  # when the workers still draining are killed
        while True:
            readable, _, _ = select.select([self._wake_r, self._ready_r], [], [], self._timeout(phase, stop_by))
            if self._ready_r in readable:
                self._read_ready()
            if self._wake_r in readable:
                for sig in _drain(self._wake_r):
                    if sig in (signal.SIGTERM, signal.SIGINT) and phase != "stopping":
                        phase, stop_by = "stopping", self._stop()
                    elif sig == signal.SIGHUP and phase != "stopping":
                        self._reload()
            dead = self._reap()
            now = time.monotonic()
            late = [w for w in self._workers() if not w.ready and not w.given_up and now > w.started + START_TIMEOUT_SECONDS]
            if phase == "starting":
                if dead:
                    log.error("a worker failed to start; stopping", pid=dead[0][0], exit=dead[0][1])
                elif late:
                    log.error("a worker did not start in time; stopping", pid=late[0].pid, timeout_seconds=START_TIMEOUT_SECONDS)
                elif all(slot.worker is not None and slot.worker.ready for slot in self._slots):
                    phase = "running"
                    log.info("serving", workers=self.workers, pids=self._pids())
                if dead or late:
                    phase, code, stop_by = "stopping", 1, self._stop()
            elif phase == "running":
                for pid, status in dead:
                    log.warning("worker died; starting another", pid=pid, exit=status)
                for worker in late:
                    log.error("worker did not start in time; killing it", pid=worker.pid, timeout_seconds=START_TIMEOUT_SECONDS)
                    worker.given_up = True
                    os.kill(worker.pid, signal.SIGKILL)  # reaped, then restarted after its back-off
                self._restart_due(now)
            else:
                if not self._pids():
                    log.info("stopped")
                    return code
                if now > stop_by:
                    log.warning("workers still running after the grace period; killing them", pids=self._pids())
                    self._kill_all(signal.SIGKILL)
                    stop_by = float("inf")

    def _timeout(self, phase: str, stop_by: float) -> float | None:
        """Until the next thing the loop must do by the clock; None: only a signal or a worker wakes it."""
        times = [stop_by]
        if phase != "stopping":
            times += [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            times += [w.started + START_TIMEOUT_SECONDS for w in self._workers() if not w.ready and not w.given_up]
        soonest = min(times)
        return None if soonest == float("inf") else max(0.0, soonest - time.monotonic())

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 65536)
        except BlockingIOError:
            return
        for line in data.split(b"\n"):
            if not line.startswith(b"ready "):
                continue
            pid = int(line[6:])
            for worker in self._workers():
                if worker.pid == pid:
                    worker.ready = True
                    log.info("worker serving", pid=pid, slot=worker.slot, start_ms=round((time.monotonic() - worker.started) * 1000))

    # -- workers ----------------------------------------------------------------

    def _workers(self) -> list[_Worker]:
        return [slot.worker for slot in self._slots if slot.worker is not None]

    def _pids(self) -> list[int]:
        return [worker.pid for worker in self._workers()]

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        # Blocked across the fork: the child keeps them blocked until it serves, the parent
        # takes what arrived meanwhile as soon as the mask is back.
        signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)
        slot.worker = _Worker(self._slots.index(slot), pid, time.monotonic())

    def _reap(self) -> list[tuple[int, str]]:
        """Collect every worker that exited: their pids and how they ended."""
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for slot in self._slots:
                worker = slot.worker
                if worker is None or worker.pid != pid:
                    continue
                slot.worker = None
                forget_worker(pid, self._metrics_dir)
                lived = time.monotonic() - worker.started
                slot.quick_deaths = slot.quick_deaths + 1 if lived < YOUNG_SECONDS or not worker.ready else 0
                delay = 0.0 if slot.quick_deaths == 0 else min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (slot.quick_deaths - 1))
                slot.restart_at = time.monotonic() + delay
                dead.append((pid, _describe(status)))
        return dead

    def _restart_due(self, now: float) -> None:
        for slot in self._slots:
            if slot.worker is None and slot.restart_at is not None and slot.restart_at <= now:
                self._spawn(slot)
                log.info("worker started", pid=slot.worker.pid, slot=self._slots.index(slot))

    def _kill_all(self, sig: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _stop(self) -> float:
        """Ask every worker to drain; returns when to kill those still running."""
        grace = self.settings.server.shutdown_grace_seconds
        log.info("shutting down", grace_seconds=grace, pids=self._pids())
        for slot in self._slots:
            slot.restart_at = None
        self._kill_all(signal.SIGTERM)
        return time.monotonic() + grace + STOP_MARGIN_SECONDS

    def _reload(self) -> None:
        """Check the file; only a config every worker can take is signalled to them."""
        settings, problems = check_new_config(self.config_path, self.settings)
        if settings is None:
            log.warning("config reload refused; every worker keeps the old config", problems=problems)
            return
        self.settings = settings  # what a worker forked from now on starts with
        if worker_count(settings.server) != self.workers:
            log.warning("server.workers changed; the number of workers changes on a restart only", workers=self.workers)
        log.info("reloading every worker", path=self.config_path, pids=self._pids())
        self._kill_all(signal.SIGHUP)

    # -- in the child -----------------------------------------------------------

    def _child(self, slot: _Slot) -> NoReturn:
        """Become a worker: drop the parent's machinery, serve, exit without running its clean-up."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (*DEFERRED_SIGNALS, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w, self._ready_r):
                os.close(fd)
            for other in self._slots:
                if other is not slot:
                    for sock in other.sockets:
                        sock.close()
            become_worker(self._parent_pid, self._metrics_dir)
            code = self.serve_worker(self.settings, WorkerLink(slot.sockets, self._metrics_sockets, self._ready_w, self._parent_pid))
        except BaseException:
            traceback.print_exc()
        finally:
            logs.flush()  # what the worker logged last, as its exit would
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _share_before_fork(settings: Settings) -> None:
    """Load once, in the parent, what every worker would load the same: forked, they share its pages.

    The token encodings are about 110 MB per process and a second of start-up:
    loaded here, the workers' memory holds them once (copy-on-write pages they
    only read) and a restarted worker is serving sooner. What the imports and
    this built is then frozen out of the collector's way, so a worker's
    collections do not write to (and so copy) every inherited object.
    """
    set_encodings_dir(settings.accounting.encodings_dir)
    preload()
    gc.collect()
    gc.freeze()


def _ignore(signum: int, frame: object) -> None:
    """The handler of the parent's signals: the wakeup fd carries them to the loop."""


def _drain(fd: int) -> list[int]:
    """The signal numbers the wakeup fd holds, one byte each."""
    signals = []
    while True:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return signals
        if not data:
            return signals
        signals.extend(data)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """What ``host`` names to listen on, one entry per address, as aiohttp's own listener would."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, address in infos:
        if (family, address) not in seen:
            seen.append((family, address))
    return seen


def _listening_socket(family: int, address: tuple, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's own listener does
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
