"""The gateway's configuration: one YAML file, overridable by ``SLUICE_*`` env vars.

Every model forbids unknown fields, so a typo in a config is an error that names
the field instead of a silently ignored setting. Problems are collected and
reported all at once (``ConfigError.problems``), one line each, because an
operator fixing a config wants the whole list, not one error per restart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import re2
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SLUICE_"
CONFIG_PATH_ENV = "SLUICE_CONFIG"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(Exception):
    """A config the gateway refuses to run with; ``problems`` has one line per fault."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    keepalive_seconds: float = Field(15, gt=0)
    max_event_bytes: int = Field(1024 * 1024, gt=0)
    # A client that takes no streamed bytes for this long is dropped (its upstream too).
    send_timeout_seconds: float = Field(30, gt=0)
    # A whole (non-streamed) answer larger than this is refused as an upstream error, not buffered.
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # Bounds on what a client may hold without a key (proxy/connections.py):
    header_timeout_seconds: float = Field(10, gt=0)  # a new connection's request headers, complete
    body_timeout_seconds: float = Field(30, gt=0)  # the longest pause between a request body's bytes
    idle_timeout_seconds: float = Field(65, gt=0)  # a kept-alive connection with no request in progress
    max_connections: int = Field(8192, ge=1)  # open client connections; beyond, 503 and close at once
    shutdown_grace_seconds: float = Field(30, ge=0)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # serve /metrics here instead of on `port`
    max_upstream_attempts: int = Field(2, ge=1, le=10)  # connect errors and 5xx before the first byte retry
    retry_backoff_seconds: float = Field(0.05, ge=0)  # doubled after each retry
    # Processes sharing the port, each with its own event loop; "auto" = one per core this process may use.
    workers: int | Literal["auto"] = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _worker_count(cls, value: Any) -> Any:
        """One clear message instead of one per member of the union."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
            return value
        raise ValueError('must be a number of processes from 1 to 1024, or "auto" (one per core)')


def worker_count(server: ServerConfig) -> int:
    """How many worker processes ``server.workers`` asks for on this machine.

    "auto" counts the cores this process may run on (its CPU affinity, which
    a container's cpuset or ``taskset`` narrows), not every core the machine has.
    """
    if server.workers != "auto":
        return server.workers
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class UpstreamConfig(_Strict):
    name: str = Field(min_length=1)
    # The wire format this upstream speaks: "openai" (Chat Completions, Completions,
    # Embeddings, Responses) or "anthropic" (the Messages API, posted to
    # {base_url}/messages with the key as x-api-key). A request of the other
    # format routed here is refused, never translated.
    api: Literal["openai", "anthropic"] = "openai"
    base_url: str
    api_key_env: str | None = None
    models: list[str] = Field(min_length=1)
    connect_timeout_seconds: float = Field(5, gt=0)
    read_timeout_seconds: float = Field(60, gt=0)
    ca_bundle: str | None = None  # PEM file of CAs to trust instead of the system's (TLS is always verified)
    circuit_failures: int = Field(5, ge=1)  # failures in a row that take the upstream out
    circuit_cooldown_seconds: float = Field(30, gt=0)  # how long it stays out before a trial request

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class LimitsConfig(_Strict):
    """Every limit is optional; ``None`` means unlimited."""

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    max_concurrent_requests: int | None = Field(None, ge=0)


class TeamConfig(_Strict):
    name: str = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["*"])
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


class KeyConfig(_Strict):
    id: str = Field(min_length=1)
    team: str
    sha256: str
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hex characters (run `sluice hash-key SECRET`)")
        return value


class AdminConfig(_Strict):
    key_sha256: str | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return KeyConfig._hex_digest(value)


class RuleConfig(_Strict):
    """One moderation rule. Which fields apply depends on ``type``."""

    name: str = Field(min_length=1)
    type: Literal["terms", "regex", "pii"]
    action: Literal["block", "redact", "flag"] = "block"
    apply_to: list[Literal["input", "output"]] = Field(default_factory=lambda: ["input", "output"], min_length=1)
    # terms
    terms: list[str] = Field(default_factory=list)
    terms_file: str | None = None
    match: Literal["word", "substring"] = "word"
    leetspeak: bool = False
    # regex
    pattern: str | None = None
    max_match_chars: int | None = Field(None, gt=0)
    # pii
    entity: Literal["email", "phone", "credit_card", "ipv4", "iban", "secret"] | None = None

    @model_validator(mode="after")
    def _fields_fit_type(self) -> "RuleConfig":
        if self.type == "terms" and not (self.terms or self.terms_file):
            raise ValueError("a terms rule needs `terms` or `terms_file`")
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("a regex rule needs `pattern`")
            if self.max_match_chars is None:
                raise ValueError("a regex rule needs `max_match_chars` (it bounds the text held back)")
            options = re2.Options()
            options.log_errors = False
            try:
                re2.compile(self.pattern, options)
            except re2.error as exc:
                reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise ValueError(
                    f"rule {self.name!r}: `pattern` is not a regular expression RE2 can run ({reason}); "
                    "patterns run in a linear-time engine, without lookarounds or backreferences"
                ) from None
        if self.type == "pii" and self.entity is None:
            raise ValueError("a pii rule needs `entity`")
        return self


class ModerationConfig(_Strict):
    redaction: str = "[REDACTED:{rule}]"
    rules: list[RuleConfig] = Field(default_factory=list)


class AccountingConfig(_Strict):
    store: Literal["memory", "sqlite", "redis"] = "sqlite"
    sqlite_path: str = "sluice.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_store_error: Literal["reject", "allow"] = "reject"
    default_max_tokens: int = Field(4096, gt=0)
    encodings_dir: str | None = None


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """The whole config. Environment (``SLUICE_SECTION__FIELD``) beats the file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    teams: list[TeamConfig] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    accounting: AccountingConfig = Field(default_factory=AccountingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after[_fields_fit_type(), RuleConfig]",))
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{_format_location(loc)}: {message}")
    return problems


def _cross_field_problems(settings: Settings, environ: dict[str, str]) -> list[str]:
    """What one field cannot know alone: references, duplicates, missing secrets."""
    problems: list[str] = []
    if not settings.upstreams:
        problems.append("upstreams: at least one upstream is required")
    team_names = [t.name for t in settings.teams]
    for name in sorted({n for n in team_names if team_names.count(n) > 1}):
        problems.append(f"teams: the name {name!r} is used twice")
    upstream_names = [u.name for u in settings.upstreams]
    for name in sorted({n for n in upstream_names if upstream_names.count(n) > 1}):
        problems.append(f"upstreams: the name {name!r} is used twice")
    seen_ids: set[str] = set()
    seen_digests: set[str] = set()
    for i, key in enumerate(settings.keys):
        if key.team not in team_names:
            problems.append(f"keys[{i}].team: no team is named {key.team!r}")
        if key.id in seen_ids:
            problems.append(f"keys[{i}].id: the id {key.id!r} is used twice")
        if key.sha256 in seen_digests:
            problems.append(f"keys[{i}].sha256: the same key is configured twice")
        seen_ids.add(key.id)
        seen_digests.add(key.sha256)
    for i, upstream in enumerate(settings.upstreams):
        if upstream.api_key_env and not environ.get(upstream.api_key_env):
            problems.append(
                f"upstreams[{i}].api_key_env: the environment variable {upstream.api_key_env} is not set"
            )
    for i, upstream in enumerate(settings.upstreams):
        if upstream.ca_bundle and not Path(upstream.ca_bundle).is_file():
            problems.append(f"upstreams[{i}].ca_bundle: no such file: {upstream.ca_bundle}")
    workers = worker_count(settings.server)
    if workers > 1 and settings.accounting.store == "memory":
        asked = f"{workers} ('auto': one per core)" if settings.server.workers == "auto" else str(workers)
        problems.append(
            f"server.workers: {asked} workers cannot share the memory store: each would count alone, "
            f"so every limit would admit up to {workers} times its value; use accounting.store sqlite or redis, or one worker"
        )
    rule_names = [r.name for r in settings.moderation.rules]
    for name in sorted({n for n in rule_names if rule_names.count(n) > 1}):
        problems.append(f"moderation.rules: the name {name!r} is used twice")
    return problems


def resolve_path(value: str, config_dir: Path) -> str:
    """A relative path names a file in the working directory, else beside the config."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return str(path)
    beside = config_dir / path
    return str(beside) if beside.exists() else str(path)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML{at}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


def load_settings(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Settings:
    """Read, validate and cross-check a config file; raise ``ConfigError`` with every problem."""
    environ = dict(os.environ if environ is None else environ)
    data = read_config_file(path)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc)) from None
    problems = _cross_field_problems(settings, environ)
    if problems:
        raise ConfigError(problems)
    config_dir = Path(path).resolve().parent
    rules = [
        rule.model_copy(update={"terms_file": resolve_path(rule.terms_file, config_dir)}) if rule.terms_file else rule
        for rule in settings.moderation.rules
    ]
    return settings.model_copy(update={"moderation": settings.moderation.model_copy(update={"rules": rules})})
