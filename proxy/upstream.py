"""The upstream side: one pooled ``aiohttp.ClientSession`` per configured provider.

A session per upstream keeps keep-alive connections warm and lets each
provider have its own timeouts. Errors of the transport are turned into the
gateway's own errors here, so the request path never sees an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Mapping

import aiohttp
from yarl import URL

from .auth import model_matches
from .circuit import CircuitBreaker
from .config import UpstreamConfig
from .errors import GatewayError, UpstreamFailure

# Request headers a client may send on to the provider, per upstream ``api``; everything
# else (Authorization and x-api-key above all, hop-by-hop headers, cookies) stays at the gateway.
FORWARDED_REQUEST_HEADERS = {
    "openai": ("accept", "user-agent", "openai-beta"),
    # The Messages API wants the client's anthropic-version, and anthropic-beta opts into features.
    "anthropic": ("accept", "user-agent", "anthropic-version", "anthropic-beta"),
}
# Response headers a provider may send back to the client.
FORWARDED_RESPONSE_HEADERS = (
    "content-type",
    "openai-model",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
)


def forwarded_response_headers(headers: Mapping[str, str], body: bool = True) -> dict[str, str]:
    """The provider's headers a client may see; ``body=False`` when the gateway writes its own body and type."""
    kept = {name: headers[name] for name in FORWARDED_RESPONSE_HEADERS if name in headers and (body or name != "content-type")}
    if "x-request-id" in headers:
        kept["x-upstream-request-id"] = headers["x-request-id"]
    return kept


UPSTREAM_READ_BUFSIZE = 16 * 1024


class Upstream:
    """One provider: its config, its API key and its connection pool."""

    def __init__(self, config: UpstreamConfig, environ: Mapping[str, str] | None = None):
        self.config = config
        self.name = config.name
        environ = os.environ if environ is None else environ
        self._api_key = environ.get(config.api_key_env) if config.api_key_env else None
        self._session: aiohttp.ClientSession | None = None
        self.breaker = CircuitBreaker(config.circuit_failures, config.circuit_cooldown_seconds)
        self._urls: dict[str, URL] = {}  # parsed once per path, not per request

    def serves(self, model: str) -> bool:
        return model_matches(model, self.config.models)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self.config.connect_timeout_seconds,
            sock_read=self.config.read_timeout_seconds,
        )
        # TLS is always verified: against the system's CAs, or the configured bundle only.
        tls: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=self.config.ca_bundle) if self.config.ca_bundle else True
        )
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True, ssl=tls)
        # We ask for identity encoding; should a provider compress anyway, aiohttp
        # decompresses and content-encoding is not among the forwarded headers.
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),  # a provider's cookies are no business of other clients
            trust_env=False,
            # aiohttp pauses the socket at twice this much unread: a stream whose client reads
            # slowly holds that much of its upstream's answer (2 x 64 KB by default).
            read_bufsize=UPSTREAM_READ_BUFSIZE,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request_headers(self, client_headers: Mapping[str, str], request_id: str) -> dict[str, str]:
        forwarded = FORWARDED_REQUEST_HEADERS[self.config.api]
        headers = {name: client_headers[name] for name in forwarded if name in client_headers}
        headers["content-type"] = "application/json"
        headers["accept-encoding"] = "identity"
        headers["x-request-id"] = request_id
        if self._api_key:
            if self.config.api == "anthropic":
                headers["x-api-key"] = self._api_key  # Anthropic's header for the key
            else:
                headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Send a request; the caller must release the response."""
        assert self._session is not None, "upstream not started"
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.config.base_url + path)
        try:
            return await self._session.post(url, data=body, headers=headers)
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise upstream_timeout(self.name) from None
        except aiohttp.ClientConnectorError as exc:
            raise upstream_unreachable(self.name, exc) from None
        except aiohttp.ClientError as exc:
            raise upstream_broken(self.name, exc) from None


def upstream_timeout(name: str) -> UpstreamFailure:
    return UpstreamFailure(504, "upstream_timeout", f"The upstream {name!r} did not answer in time.", "timeout")


def upstream_unreachable(name: str, exc: BaseException) -> UpstreamFailure:
    """No connection could be made: safe to retry elsewhere, nothing to charge."""
    reason = type(exc).__name__
    return UpstreamFailure(502, "upstream_error", f"The upstream {name!r} could not be reached ({reason}).", "connect")


def upstream_broken(name: str, exc: BaseException) -> UpstreamFailure:
    """The connection broke after the request went out: the provider may have seen it."""
    reason = type(exc).__name__
    return UpstreamFailure(502, "upstream_error", f"The upstream {name!r} broke the connection ({reason}).", "broken")


def upstream_bad_answer(message: str) -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_error", message, "bad_response")


class Router:
    """Model name to provider: the first upstream whose globs match wins."""

    def __init__(self, upstreams: list[Upstream]):
        self.upstreams = upstreams

    def route(self, model: str) -> list[Upstream]:
        """Every upstream serving ``model``, in config order: the first, then its fallbacks."""
        candidates = [upstream for upstream in self.upstreams if upstream.serves(model)]
        if not candidates:
            raise GatewayError(
                404, "model_not_found", f"The model {model!r} does not exist or is not served here.", "model"
            )
        return candidates

    async def start(self) -> None:
        for upstream in self.upstreams:
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.close()


async def send_with_failover(
    candidates: list[Upstream],
    path: str,
    body: bytes,
    client_headers: Mapping[str, str],
    request_id: str,
    *,
    max_attempts: int,
    backoff_seconds: float,
    on_retry: Callable[[Upstream], None],
) -> tuple[Upstream, aiohttp.ClientResponse]:
    """Send to the first upstream whose circuit is closed; on a connect error or a 5xx, try the next.

    Only failures before the first byte of the answer are retried, so nothing a
    client has seen is ever sent twice. A timeout is not retried: a slow
    provider would make every retry as slow. The caller must release the response.
    """
    now = time.monotonic()
    allowed = [upstream for upstream in candidates if upstream.breaker.allows(now)]
    if not allowed:
        raise UpstreamFailure(
            502, "upstream_error", "Every upstream for this model is failing; retry later.", "circuit_open"
        )
    tries = allowed[:max_attempts]
    for attempt, upstream in enumerate(tries):
        last = attempt == len(tries) - 1
        if attempt:
            await asyncio.sleep(backoff_seconds * 2 ** (attempt - 1))
        try:
            resp = await upstream.post(path, body, upstream.request_headers(client_headers, request_id))
        except UpstreamFailure as exc:
            if exc.kind == "connect":
                upstream.breaker.record_failure(time.monotonic())
            if last or exc.kind != "connect":
                raise
            on_retry(upstream)
            continue
        if resp.status < 500:
            upstream.breaker.record_success()
            return upstream, resp
        upstream.breaker.record_failure(time.monotonic())
        if last:
            return upstream, resp  # the provider's own 5xx passes through
        resp.release()
        on_retry(upstream)
    raise AssertionError("unreachable: the last attempt returns or raises")
