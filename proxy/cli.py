"""The ``sluice`` command line: serve, demo, mock-upstream, check-config, hash-key, usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .accounting import StoreUnavailable, UsageReport, format_usage_table, open_store
from .auth import hash_key
from .connections import raise_open_file_limit
from .config import CONFIG_PATH_ENV, ENV_PREFIX, ConfigError, Settings, load_settings, worker_count
from .gateway import Runtime
from .logs import configure_logging
from .app import serve
from .supervisor import Supervisor
from .worker import WorkerLink

WORKERS_ENV = f"{ENV_PREFIX}SERVER__WORKERS"

T = TypeVar("T")


def _load_checked(path: str) -> Settings:
    """Load a config and build what it compiles to (moderation rules), so every problem shows."""
    settings = load_settings(path)
    Runtime(settings)
    return settings


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: the same asyncio API, a faster loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get(CONFIG_PATH_ENV)


def _print_problems(problems: list[str]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        _load_checked(args.path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 1
    print(f"{args.path}: OK")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    print(hash_key(args.secret))
    return 0


def _settings_for(command: str, args: argparse.Namespace) -> tuple[str, Settings] | int:
    """The config a command runs with, or its exit code: 2 without a path, 1 with problems."""
    path = _config_path(args)
    if not path:
        print(f"sluice {command}: give --config PATH or set {CONFIG_PATH_ENV}", file=sys.stderr)
        return 2
    try:
        return path, _load_checked(path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers is not None:
        # As an override of server.workers, so the config's own checks (and every reload's) see it.
        os.environ[WORKERS_ENV] = args.workers
    loaded = _settings_for("serve", args)
    if isinstance(loaded, int):
        return loaded
    path, settings = loaded
    configure_logging(settings.logging.level, settings.logging.format)
    raise_open_file_limit()
    workers = worker_count(settings.server)
    if workers == 1:
        return _serve_here(settings, args.host, args.port, path)
    supervisor = Supervisor(
        settings,
        path,
        args.host if args.host is not None else settings.server.host,
        args.port if args.port is not None else settings.server.port,
        workers,
        serve_worker=lambda current, link: _serve_here(current, args.host, args.port, path, link),
    )
    return supervisor.run()


def _serve_here(
    settings: Settings, host: str | None, port: int | None, path: str, worker: WorkerLink | None = None
) -> int:
    """Run the gateway in this process (alone, or as a supervisor's worker); its exit code."""
    try:
        run_event_loop(serve(settings, host, port, config_path=path, worker=worker))
    except OSError as exc:  # the port is taken, the host is not ours
        print(f"sluice serve: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"sluice serve: the {settings.accounting.store} store is unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


def _workers_argument(value: str) -> str:
    if value == "auto" or (value.isdigit() and 1 <= int(value) <= 1024):
        return value
    raise argparse.ArgumentTypeError('a number of processes from 1 to 1024, or "auto"')


def cmd_usage(args: argparse.Namespace) -> int:
    loaded = _settings_for("usage", args)
    if isinstance(loaded, int):
        return loaded
    _, settings = loaded
    try:
        report = run_event_loop(_read_usage(settings, args.team))
    except StoreUnavailable as exc:
        print(f"sluice usage: the {settings.accounting.store} store is unavailable: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_usage_table(report))
    return 0


async def _read_usage(settings: Settings, team: str | None) -> UsageReport:
    store = await open_store(settings.accounting, read_only=True)
    try:
        return await store.usage(now=time.time(), team=team)
    finally:
        await store.close()


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from .devtools.mock import run_mock_upstream  # here, not at the top: `sluice serve` never loads the mock

    print(f"mock upstream on http://{args.host}:{args.port}/v1 (delay {args.delay_ms} ms per chunk)", flush=True)
    try:
        run_event_loop(run_mock_upstream(args.host, args.port, args.delay_ms))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"sluice mock-upstream: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .devtools.demo import run_demo  # here, not at the top: `sluice serve` never loads the mock

    try:
        return run_event_loop(run_demo(args.port, args.delay_ms))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="An OpenAI-compatible LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"the YAML config (default: ${CONFIG_PATH_ENV})")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers", type=_workers_argument, help='override server.workers: processes sharing the port, or "auto" (one per core)'
    )
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser("demo", help="the gateway with a built-in mock model and config/demo.yaml")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--delay-ms", type=float, default=40.0, help="the mock model's delay per chunk")
    demo.set_defaults(run=cmd_demo)

    mock = commands.add_parser("mock-upstream", help="a fake model (OpenAI and Anthropic APIs) that streams its answer")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.add_argument("--delay-ms", type=float, default=20.0, help="delay per streamed chunk")
    mock.set_defaults(run=cmd_mock_upstream)

    check = commands.add_parser("check-config", help="validate a config: exit 0, or 1 with every problem")
    check.add_argument("path")
    check.set_defaults(run=cmd_check_config)

    usage = commands.add_parser("usage", help="the usage ledger: totals per team and key, today and this month")
    usage.add_argument("--config", help=f"the YAML config (default: ${CONFIG_PATH_ENV})")
    usage.add_argument("--team", help="only this team and its keys")
    usage.add_argument("--json", action="store_true", help="JSON instead of a table")
    usage.set_defaults(run=cmd_usage)

    hasher = commands.add_parser("hash-key", help="the sha256 hex to put in a key entry")
    hasher.add_argument("secret")
    hasher.set_defaults(run=cmd_hash_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
