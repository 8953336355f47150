"""LiteLLM's proxy as a peer for the gateway benchmark: same mock model, same load.

The benchmark compares three targets fed the same load: the mock model called
directly, Sluice, and LiteLLM's proxy pointed at the same mock. This module
holds what is specific to LiteLLM, so the benchmark only has to do:

    python = os.environ[LITELLM_ENV]          # or make_venv(path)
    config = write_config(tmp, {"gpt-4o-mini": mock_base_url}, SECRET)
    proc = subprocess.Popen(command(python, config, "127.0.0.1", port), env=environment(), ...)
    # poll f"http://127.0.0.1:{port}{HEALTH_PATH}" until 200, then send
    # /v1/chat/completions with "Authorization: Bearer SECRET"

LiteLLM lives in its own interpreter (its dependency tree is large and pins
versions that need not agree with Sluice's), named by the environment variable
``SLUICE_BENCH_LITELLM``. Nothing here imports litellm.

Fairness choices, so that the comparison measures LiteLLM as users run it:

- LiteLLM's defaults are kept wherever they are what a user gets: the uvicorn
  server, uvloop, h11 (``litellm[proxy]`` does not bring httptools), the
  ``openai`` SDK's httpx client upstream, uvicorn's log level (info, with one access-log line per
  request on stdout, much as Sluice logs one line per request), LiteLLM's own
  loggers at WARNING, no callbacks, no cache, no guardrails.
- The worker count written out (``--num_workers``, 1 by default): one is
  LiteLLM's default today, but some releases and their docs defaulted to
  one per CPU, and ``NUM_WORKERS`` in the environment would change it. The
  suite runs it with as many workers as each Sluice it runs beside.
- Only what would reach outside the machine is turned off (see
  ``environment()``): by default LiteLLM fetches its model cost map and some
  other JSON files from GitHub at import. The machine has no internet; the
  bundled copies are the same data, and the benchmark must not time a failed
  download.
- No database: LiteLLM's virtual keys, spend logs and budgets need Postgres;
  without ``DATABASE_URL`` it authenticates with the master key alone, like
  Sluice's single bench key (but with no per-team limiter behind it).

What to expect (litellm 1.106.2, 2-core machine): about 10 s from start to
ready (importing litellm's proxy is most of it), ~320 MB RSS, and a slow
first chat request (~1 s of lazy imports and route set-up, during which a
stream's early chunks pile up): warm it up before measuring. Without a
database a wrong key gets 400 "No connected db." and a missing key a 500
(its error path imports ``prisma``, which ``litellm[proxy]`` does not
install); the benchmark always sends the master key, so neither is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

LITELLM_ENV = "SLUICE_BENCH_LITELLM"
"""Names the Python interpreter that has ``litellm[proxy]`` installed."""

HEALTH_PATH = "/health/readiness"
"""Unauthenticated; answers 200 once the proxy has loaded its config and router.

uvicorn binds its socket only after the app's startup (config, router,
guardrails) has finished, so any answer here means requests can be served.
``/health/liveliness`` (or ``/health/liveness``) would do as well; plain
``/health`` is not a readiness probe: it needs the master key and calls every
model upstream.
"""

PACKAGE = "litellm[proxy]"

# Inherited variables that would change what is measured: a database, a worker
# count, a log level, a .env mode, a port. The benchmark's config and argv decide.
_SCRUBBED_PREFIXES = ("LITELLM_", "DATABASE_", "DIRECT_URL", "REDIS_", "STORE_MODEL_IN_DB")
_SCRUBBED_NAMES = frozenset({
    "NUM_WORKERS", "DEFAULT_NUM_WORKERS_LITELLM_PROXY", "JSON_LOGS", "HOST", "PORT",
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "USE_AWS_KMS", "PROMETHEUS_MULTIPROC_DIR",
})


def make_venv(path: Path, package: str = PACKAGE) -> Path:
    """Create a venv at ``path`` with ``litellm[proxy]`` from PyPI; return its python.

    A separate venv because litellm pins its own versions of pydantic, openai,
    aiohttp, etc., which must not change the interpreter Sluice is measured in.
    pip uses whatever index the machine is configured for (pip.conf, PIP_*).
    Pass ``package`` (e.g. ``"litellm[proxy]==1.106.2"``) to pin a release.
    """
    path = Path(path)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", package], check=True)
    return python


def version(python: str | os.PathLike[str]) -> str:
    """The litellm version installed for ``python``, for the benchmark's header."""
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def write_config(directory: Path, routes: Mapping[str, str], master_key: str,
                 moderation_terms: Sequence[str] | None = None) -> Path:
    """Write LiteLLM's proxy config, the equivalent of Sluice's bench config; return its path.

    - Each model of ``routes`` (model name -> mock base url, e.g.
      ``http://127.0.0.1:P/v1``) goes to its mock through LiteLLM's ``openai``
      provider (the OpenAI-compatible client, as Sluice's upstream is
      OpenAI-compatible), as Sluice routes each model to its upstream. The
      mock accepts any key; LiteLLM's openai client insists on having one.
    - ``general_settings.master_key``: requests must carry
      ``Authorization: Bearer <master_key>``, as Sluice's need its bench key.
      LiteLLM requires master keys to start with ``sk-``.
    - No ``database_url``, no cache, no callbacks: defaults otherwise.

    ``moderation_terms``: the counterpart of the benchmark's ``--moderation``
    (email redaction + a block list), with LiteLLM's built-in, offline
    ``litellm_content_filter`` guardrail: prebuilt ``email`` pattern masked,
    each term a BLOCK keyword, on the request (pre_call) and on the answer,
    streamed or not (post_call). None (the default) adds no guardrail.
    Its keyword match is a case-insensitive substring test, not a word match.
    On a streamed answer it holds back the last 50 characters
    (CONTENT_FILTER_STREAMING_HOLDBACK_CHARS) until more arrive, so that a
    pattern split across chunks is caught: chunks reach the client later.
    """
    if not master_key.startswith("sk-"):
        raise ValueError("LiteLLM rejects master keys that do not start with 'sk-'")
    directory = Path(directory)
    config: dict[str, object] = {
        "model_list": [
            {"model_name": model, "litellm_params": {
                "model": f"openai/{model}", "api_base": url.rstrip("/"), "api_key": "sk-mock-accepts-anything"}}
            for model, url in routes.items()
        ],
        "general_settings": {"master_key": master_key},
    }
    if moderation_terms is not None:
        words_file = directory / "litellm-blocked-words.json"  # JSON is YAML
        words_file.write_text(json.dumps({"blocked_words": [
            {"keyword": term, "action": "BLOCK"} for term in moderation_terms
        ]}), encoding="utf-8")
        config["guardrails"] = [{
            "guardrail_name": "bench-content-filter",
            "litellm_params": {
                "guardrail": "litellm_content_filter",
                "mode": ["pre_call", "post_call"],
                "default_on": True,
                "patterns": [{"pattern_type": "prebuilt", "pattern_name": "email", "action": "MASK"}],
                "blocked_words_file": str(words_file),
            },
        }]
    path = directory / "litellm.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def command(python: str | os.PathLike[str], config: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """The argv that starts LiteLLM's proxy on ``host:port`` with ``config``.

    The ``litellm`` console script next to ``python`` is what users run
    (``litellm --config ...``); ``python`` is not resolved, since a venv's
    python is a symlink out of the venv. If the script is missing (litellm
    installed some other way), ``python -m litellm.proxy.proxy_cli`` runs the
    same click command.

    ``--num_workers 1``: LiteLLM's default (DEFAULT_NUM_WORKERS_LITELLM_PROXY=1),
    written out so that no environment or release changes it. With one worker
    uvicorn serves in this very process: the Popen pid is the one whose CPU
    to read. ``workers`` > 1 is LiteLLM's own way to use more cores (uvicorn
    forks that many processes onto one socket); the suite then reads the
    CPU and memory of the whole process tree. Logging is left at LiteLLM's defaults (no ``--debug``,
    ``--detailed_debug`` or ``--log_config``).
    """
    script = Path(python).parent / "litellm"
    runner = [str(script)] if script.is_file() else [str(python), "-m", "litellm.proxy.proxy_cli"]
    return runner + ["--config", str(config), "--host", host, "--port", str(port), "--num_workers", str(workers)]


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for LiteLLM's proxy: ``base`` (default: ours) made offline and reproducible.

    Set, because each would otherwise reach the internet (and on a machine
    without it, wait, warn and fall back to the bundled copy). Only the first
    happens at startup with this config: a DNS lookup and 3 attempts in ~8 s,
    with a warning per attempt on stderr.

    - ``LITELLM_LOCAL_MODEL_COST_MAP=True``: the model price/context map bundled
      with the package instead of fetching it from raw.githubusercontent.com.
    - ``LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True``: likewise for a JSON file of
      Anthropic beta headers, fetched on first use (Anthropic-style requests).
    - ``LITELLM_LOCAL_POLICY_TEMPLATES``, ``LITELLM_LOCAL_AUTOROUTER_PRESETS``,
      ``LITELLM_LOCAL_BLOG_POSTS``: the same for files only the admin UI reads;
      set so no code path can fetch them.
    - ``LITELLM_MODE=PRODUCTION``: in its default ``DEV`` mode the CLI loads a
      ``.env`` file (python-dotenv), which could bring in a stray DATABASE_URL
      or keys. Nothing else reads LITELLM_MODE.
    - ``PYTHONUNBUFFERED=1``: as the benchmark runs Sluice (and as container
      images set it), so each access-log line is written when the request ends.

    Removed from ``base``: anything that would add a database, Redis, workers,
    a log level or JSON logs (``LITELLM_*``, ``DATABASE_*``, ``REDIS_*``,
    ``NUM_WORKERS``, ``JSON_LOGS``, ...), and ``SLUICE_*``.
    There is no telemetry to turn off: ``--telemetry`` is a no-op in current
    releases, and no usage data is sent without a callback configured.
    """
    env = {
        name: value for name, value in (os.environ if base is None else base).items()
        if not name.startswith(("SLUICE_", *_SCRUBBED_PREFIXES)) and name not in _SCRUBBED_NAMES
    }
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
        "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
        "LITELLM_LOCAL_BLOG_POSTS": "True",
        "LITELLM_MODE": "PRODUCTION",
        "PYTHONUNBUFFERED": "1",
    })
    return env
