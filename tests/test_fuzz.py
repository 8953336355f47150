"""Bad input: the HTTP surface and the SSE decoder, fuzzed with hypothesis.

Random JSON shapes, huge and deeply nested bodies, invalid UTF-8, header
injection, oversized headers, slow clients and broken upstream streams.
Each must get a clear 4xx or be handled: never a 500, never a traceback in a
response, never a stall for the other clients.

The hypothesis tests are synchronous and talk to one gateway (and its mock
upstream) that runs in a thread of its own for the whole module, so each
example costs one loopback request and no start-up.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ALICE, BOB, UPSTREAM_KEY, gateway_config, start_mock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import GatewayProcess
from test_faults import SSE_HEAD, RawUpstream, http_chunk, parse_stream

from proxy.formats import FORMATS
from proxy.auth import hash_key
from proxy.config import load_settings
from proxy.app import GatewayServer
from proxy.stream.sse import EventTooLarge, SSEDecoder

CAROL = "sk-test-carol-0123456789"  # team research, with token budgets: answers are capped
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
RULES = [
    {"name": "banned", "type": "terms", "terms": ["launch codes"], "action": "block"},
    {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
    {"name": "ticket", "type": "regex", "pattern": "TCK-[0-9]{6}", "max_match_chars": 10, "action": "flag"},
]
# The ``gw`` fixture only re-reads a counter per test, so a function-scoped fixture is harmless here.
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


# -- one gateway for the module, in a thread of its own ----------------------------


class ThreadedGateway:
    """The mock upstream, a hand-written SSE upstream and a gateway, on an event loop in a thread."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)
        self.server: GatewayServer | None = None
        self.mock_state: Any = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the gateway thread did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # report it to the test thread instead of hanging
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        self._mock_runner, mock = await start_mock()
        self.mock_state = mock.state
        self._raw = RawUpstream(_scripted_sse)
        await self._raw.__aenter__()
        config = gateway_config(mock.url, moderation={"rules": RULES})
        # The mock (an aiohttp app) takes bodies up to 1 MiB; so does the gateway in front of it here.
        config["server"]["max_body_bytes"] = 1024 * 1024
        config["keys"].append(
            {"id": "carol", "team": "research", "sha256": hash_key(CAROL), "limits": {"tokens_per_day": 10**12}}
        )
        config["upstreams"].append({**config["upstreams"][0], "name": "raw", "base_url": self._raw.url, "models": ["raw-*"]})
        path = self.tmp / "fuzz.yaml"
        path.write_text(yaml.safe_dump(config))
        self.server = GatewayServer(load_settings(path), host="127.0.0.1", port=0, config_path=path)
        await self.server.start()
        self.port = self.server.port

    async def _stop(self) -> None:
        assert self.server is not None
        await self.server.stop()
        await self._raw.__aexit__()
        await self._mock_runner.cleanup()

    def idle(self) -> None:
        """Every request has ended (the gateway's own count), and none since the last look was a 5xx."""
        assert self.server is not None
        self.call(asyncio.wait_for(self.server.gateway.wait_idle(), 5))
        assert self.server.gateway.inflight == 0
        failures = self._five_hundreds()
        new, self._seen_failures = failures - self._seen_failures, failures
        assert new == 0, f"the gateway counted {new:g} request(s) as a 5xx"

    def forget_failures(self) -> None:
        """Start each test afresh, whatever the one before it left."""
        self._seen_failures = self._five_hundreds()

    _seen_failures = 0.0

    def _five_hundreds(self) -> float:
        assert self.server is not None
        return sum(
            sample.value
            for metric in self.server.gateway.metrics.requests.collect()
            for sample in metric.samples
            if sample.name == "sluice_requests_total" and sample.labels["status"].startswith("5")
        )


async def _scripted_sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    """The hand-written upstream sends the bytes the test put in the request, in the slices it chose."""
    writer.write(SSE_HEAD)
    for piece in body.get("sse_pieces", []):
        writer.write(http_chunk(base64.b64decode(piece)))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


@pytest.fixture(scope="module")
def module_gateway(tmp_path_factory):
    previous = os.environ.get("SLUICE_TEST_UPSTREAM_KEY")
    os.environ["SLUICE_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    gateway = ThreadedGateway(tmp_path_factory.mktemp("fuzz"))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
        if previous is None:
            os.environ.pop("SLUICE_TEST_UPSTREAM_KEY", None)
        else:
            os.environ["SLUICE_TEST_UPSTREAM_KEY"] = previous


@pytest.fixture
def gw(module_gateway):
    module_gateway.forget_failures()
    return module_gateway


# -- a plain, blocking HTTP client ---------------------------------------------------


def request(
    gw: ThreadedGateway, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def check_answer(status: int, headers: Any, data: bytes) -> None:
    """What every answer to a fuzzed request must look like."""
    assert status < 500, (status, data[:2000])
    request_id = headers.get("x-request-id")
    assert request_id and REQUEST_ID.match(request_id), request_id
    if status >= 400:
        body = json.loads(data)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert "Traceback" not in body["error"]["message"]
    elif "text/event-stream" in headers.get("content-type", ""):
        # The mock upstream is healthy (the fuzz never scripts it), so every stream must complete.
        assert parse_stream(data.decode("utf-8", "replace"))[1] == "done", data[-2000:]
    else:
        json.loads(data)


def post(gw: ThreadedGateway, path: str, body: bytes, key: str = ALICE) -> None:
    status, headers, data = request(
        gw, "POST", path, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    check_answer(status, headers, data)


# -- strategies -------------------------------------------------------------------------

KNOWN = {"model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "mock"}
keys = st.text(max_size=8).filter(lambda k: k not in KNOWN)
odd_texts = st.sampled_from(
    ["", " ", "\ud800", "a\udcffb", "launch codes", "mail a@b.co now", "TCK-123456", "l\u200baunch c\u00adodes",
     "<|endoftext|>", "\x00", "\u202e", "ｌａｕｎｃｈ ｃｏｄｅｓ", "e\u0301" * 20]
)
texts = st.text(max_size=40) | odd_texts
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | texts
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=16
)
models = st.sampled_from(["gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "mock-model", "no-such-model", "", " ", "gpt-4o*"]) | json_values
token_counts = st.integers(min_value=-3, max_value=2**70) | json_values
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]) | json_values},
    optional={"text": texts | json_values, "image_url": json_values},
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | json_values},
    optional={
        "content": texts | st.none() | st.lists(part, max_size=3) | json_values,
        "name": texts | json_values,
        "tool_calls": json_values,
        "tool_call_id": json_values,
    },
)
common = {
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}) | json_values,
    "max_tokens": token_counts,
    "max_completion_tokens": token_counts,
    "n": st.integers(min_value=-1, max_value=130) | json_values,
    "temperature": json_values,
}
prompts = texts | st.lists(texts, max_size=3) | st.lists(st.integers(-5, 2**40), max_size=5) | st.lists(
    st.lists(st.integers(-5, 2**40), max_size=3), max_size=3
) | json_values


def _body(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    base = st.fixed_dictionaries(required, optional=optional)
    return st.tuples(base, st.dictionaries(keys, json_values, max_size=3)).map(lambda pair: {**pair[1], **pair[0]})


chat_bodies = _body({"model": models, "messages": st.lists(message, min_size=1, max_size=4) | json_values}, common)
completion_bodies = _body({"model": models, "prompt": prompts}, common)
embedding_bodies = _body(
    {"model": models, "input": prompts},
    {"dimensions": st.integers(-1, 5000) | json_values, "encoding_format": st.sampled_from(["float", "base64"]) | json_values},
)
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


def dumps(value: Any) -> bytes:
    # NaN and Infinity as Python writes them: not JSON, but what a sloppy client sends.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# -- random JSON and bytes to every endpoint ---------------------------------------------------


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.one_of(chat_bodies, completion_bodies, embedding_bodies),
    key=st.sampled_from([ALICE, BOB, CAROL]),
)
def test_near_valid_bodies_get_an_answer_or_a_clear_4xx(gw, endpoint, body, key):
    post(gw, endpoint, dumps(body), key)
    gw.idle()


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(dumps),
        st.binary(max_size=60).map(
            lambda raw: b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
            + raw.replace(b"\\", b"").replace(b'"', b"")
            + b'"}]}'
        ),
    ),
)
def test_random_bytes_and_invalid_utf8_get_an_answer_or_a_clear_4xx(gw, endpoint, body):
    status, headers, data = request(gw, "POST", endpoint, body, {"Authorization": f"Bearer {ALICE}"})
    check_answer(status, headers, data)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        assert status == 400 and json.loads(data)["error"]["code"] == "invalid_request", data
    gw.idle()


@pytest.mark.parametrize("depth", [10, 900, 100_000])
@pytest.mark.parametrize("where", ["an extra field", "the whole body", "a message's content"])
def test_deeply_nested_bodies(gw, depth, where):
    nested = "[" * depth + "]" * depth
    if where == "an extra field":
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":' + nested + "}"
    elif where == "the whole body":
        body = nested
    else:
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":' + nested + "}]}"
    post(gw, "/v1/chat/completions", body.encode())
    gw.idle()


def test_huge_bodies(gw):
    limit = 1024 * 1024  # this gateway's max_body_bytes
    for body in (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * (5 * limit) + b'"}]}',
        json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "m"}] * 100_000}).encode(),
        json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "m"}] * 25_000}).encode(),
        json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "x": list(range(100_000))}).encode(),
        json.dumps({"model": "text-embedding-3-small", "input": [[1] * 100] * 2000}).encode(),
    ):
        path = "/v1/embeddings" if b"text-embedding" in body[:40] else "/v1/chat/completions"
        status, headers, data = request(gw, "POST", path, body, {"Authorization": f"Bearer {ALICE}"})
        check_answer(status, headers, data)
        assert status == (413 if len(body) > limit else 200), (len(body), status, data[:300])
    gw.idle()


# -- headers -----------------------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (every request here says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def raw_request(extra_headers: bytes, key: bytes = f"Bearer {ALICE}".encode(), path: bytes = b"/v1/chat/completions") -> bytes:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Authorization: " + key + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra_headers + b"\r\n" + body
    )


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, raw[:500]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return int(match.group(1)), headers, body


def assert_still_serving(gw: ThreadedGateway) -> None:
    status, _, data = request(
        gw, "POST", "/v1/chat/completions", json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ok?"}]}).encode(),
        {"Authorization": f"Bearer {ALICE}"},
    )
    assert status == 200, data
    assert json.loads(data)["choices"][0]["message"]["content"] == "ok?"


HEADER_NAMES = [b"x-request-id", b"authorization", b"user-agent", b"openai-beta", b"accept", b"content-type", b"x-anything"]


@FUZZ
@given(
    name=st.sampled_from(HEADER_NAMES),
    value=st.binary(max_size=40) | st.sampled_from(
        [b"abc\r\nX-Injected: 1", b"abc\nX-Injected: 1", b"abc\rX-Injected: 1", b"a\r\n\r\nGET / HTTP/1.1", b"\xff\xfe", b"\xc3\xa9",
         b"Bearer \xff", b"Bearer " + ALICE.encode() + b"\xff", b"id\x00", b" \t ", b"x" * 129]
    ),
)
def test_header_injection_and_odd_header_bytes(gw, name, value):
    if name == b"authorization":
        extra, key = b"", value
    else:
        extra, key = name + b": " + value + b"\r\n", f"Bearer {ALICE}".encode()
    gw.mock_state.reset()
    raw = raw_exchange(gw.port, raw_request(extra, key=key))
    status, headers, body = split_response(raw)
    assert status < 500, raw[:3000]
    assert "x-injected" not in headers, headers
    if "x-request-id" in headers:  # aiohttp's own 400s for unparsable requests carry none
        assert REQUEST_ID.match(headers["x-request-id"]), headers
        assert headers["content-type"].startswith("application/json"), headers
        if status >= 400:
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    for seen in gw.mock_state.requests:  # and nothing injected went upstream
        assert "x-injected" not in {h.lower() for h in seen["headers"]}, seen["headers"]
    gw.idle()


@pytest.mark.parametrize(
    "data",
    [
        raw_request(b"x-big: " + b"a" * 100_000 + b"\r\n"),
        raw_request(b"x-big: " + b"a" * 8000 + b"\r\n"),
        raw_request(b"".join(b"x-h%d: 1\r\n" % i for i in range(1000))),
        raw_request(b"", path=b"/v1/chat/completions?" + b"q" * 100_000),
        raw_request(b"", key=b"Bearer " + b"k" * 100_000),
        raw_request(b"x-request-id: " + b"r" * 5000 + b"\r\n"),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"x-h: 1\r\n" * 10_000 + b"\r\n",
    ],
    ids=["100 KB header", "8 KB header", "1000 headers", "100 KB URL", "100 KB key", "5 KB request id", "10000 header lines"],
)
def test_oversized_headers(gw, data):
    status, _, body = split_response(raw_exchange(gw.port, data))
    assert status in (200, 400, 401, 413, 414, 431), (status, body[:500])
    assert_still_serving(gw)
    gw.idle()


async def test_a_malformed_request_leaves_no_traceback_in_the_gateway_log(tmp_path, mock_upstream):
    """aiohttp answers unparsable requests itself (400); the gateway's stderr must not fill with tracebacks."""
    async with GatewayProcess(gateway_config(mock_upstream.url), tmp_path / "sluice.yaml") as gateway:
        loop = asyncio.get_running_loop()
        for data in (raw_request(b"x-request-id: a\x00b\r\n"), raw_request(b"x-big: " + b"a" * 100_000 + b"\r\n")):
            raw = await loop.run_in_executor(None, raw_exchange, gateway.port, data)
            assert split_response(raw)[0] == 400
        assert await gateway.stop() == 0
        stderr = gateway.stderr()
    assert "Traceback" not in stderr, stderr


# -- upstream SSE, fuzzed -------------------------------------------------------------------------------

sse_fields = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(0, 3) | json_values,
        "delta": st.fixed_dictionaries({}, optional={"content": texts | json_values, "role": json_values, "tool_calls": json_values})
        | json_values,
        "text": texts | json_values,
        "finish_reason": st.sampled_from([None, "stop", "length"]) | json_values,
    },
)
sse_events = st.one_of(
    st.fixed_dictionaries(
        {"choices": st.lists(sse_fields, max_size=3) | json_values},
        optional={"id": json_values, "model": json_values, "usage": json_values, "error": json_values},
    ).map(lambda e: b"data: " + dumps(e) + b"\n\n"),
    st.sampled_from([b"data: [DONE]\n\n", b": keep-alive\n\n", b"event: ping\n\n", b"data: {\n\n", b"data: null\n\n", b"\n", b"\r\n", b"retry: 1\n"]),
    st.binary(max_size=30),
)


@FUZZ
@given(events=st.lists(sse_events, max_size=8), cuts=st.lists(st.integers(0, 2000), max_size=5), chat=st.booleans())
def test_random_upstream_streams_end_well_formed(gw, events, cuts, chat):
    raw = b"".join(events)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True) if raw[a:b]]
    body: dict[str, Any] = {"model": "raw-model", "stream": True, "sse_pieces": [base64.b64encode(p).decode() for p in pieces]}
    if chat:
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, _, data = request(gw, "POST", path, dumps(body), {"Authorization": f"Bearer {ALICE}"})
    assert status == 200, data[:2000]
    parse_stream(data.decode("utf-8", "replace"))
    gw.idle()


# -- the SSE decoder on arbitrary bytes -------------------------------------------------------------------


def decode(chunks: list[bytes], max_event_bytes: int | None = None) -> list[Any]:
    decoder = SSEDecoder(max_event_bytes)
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


sse_bytes = st.lists(
    st.sampled_from([b"data:", b"data: ", b"event: x", b"id: 1", b"retry: 5", b":", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xa9", b"x", b" ", b"\x00"])
    | st.binary(max_size=8),
    max_size=40,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(raw=sse_bytes, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_sse_decoder_any_bytes_any_split(raw, cuts):
    whole = decode([raw])
    assert decode(split(raw, cuts)) == whole
    assert decode([bytes([b]) for b in raw]) == whole


@settings(max_examples=300, deadline=None)
@given(raw=sse_bytes, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_sse_decoder_limit_only_stops_what_is_too_large(raw, cuts):
    limit = 64
    lines = re.split(rb"\r\n|\r|\n", raw)
    events = decode([raw])
    small = all(len(line) <= limit // 4 for line in lines) and all(len(e.data.encode()) <= limit // 4 for e in events)
    try:
        got = decode(split(raw, cuts), max_event_bytes=limit)
    except EventTooLarge:
        assert not small, "an event well under the limit was refused"
    else:
        assert got == events


# -- slow clients must not hold up the others -------------------------------------------------------------


def _timed_requests(port: int, count: int) -> list[float]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "quick"}]}).encode()
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": f"Bearer {ALICE}"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        finally:
            conn.close()
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    return latencies


async def timed_requests(port: int, count: int) -> list[float]:
    """``count`` requests one after another from another thread, so a stalled event loop shows; their latencies."""
    return await asyncio.to_thread(_timed_requests, port, count)


async def test_a_client_sending_a_byte_at_a_time(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": RULES}))
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slowly does it"}]}).encode()
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + ALICE.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    async def dribble() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.004)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    slow = asyncio.create_task(dribble())
    latencies = await timed_requests(gw.server.port, 15)
    assert len(latencies) == 15 and not slow.done()  # all served while the slow client was still sending
    answer = await slow
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"slowly does it" in answer
    await asyncio.wait_for(gw.server.gateway.wait_idle(), 5)


async def test_slowloris_connections_and_a_reader_that_never_reads(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    writers = []
    for _ in range(50):  # connections that send half a request head, then nothing
        _, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
        writers.append(writer)
    # About 10 MB of stream for a client that never reads: more than the socket buffers hold, so the
    # gateway must wait on that one client, and on it alone.
    body = json.dumps(
        {
            "model": "gpt-4o-mini", "stream": True, "n": 128, "messages": [{"role": "user", "content": "x"}],
            "mock": {"reply": "word " * 16_000, "chunk_chars": 4000},
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.server.port))
    await loop.sock_sendall(
        sock,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + ALICE.encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    try:
        await asyncio.sleep(0.5)
        active = gw.server.gateway.metrics.registry.get_sample_value("sluice_active_streams")
        assert active == 1, "the stream to the client that does not read should still be waiting"
        latencies = await timed_requests(gw.server.port, 10)
        assert len(latencies) == 10  # each answered 200 while that client still held its stream
    finally:
        sock.close()
        for writer in writers:
            writer.close()
    await asyncio.wait_for(gw.server.gateway.wait_idle(), 5)
    assert gw.server.gateway.metrics.registry.get_sample_value("sluice_active_streams") == 0
    assert await mock_upstream.state.wait_for_disconnect(timeout=5.0)  # and the upstream was let go


async def test_a_huge_prompt_does_not_stall_other_clients(mock_upstream, start_gateway, monkeypatch):
    """A prompt near max_body_bytes is counted off the event loop and moderated in turns, so other clients go on.

    Checked by where the work runs, not by a latency threshold that a busy machine could break.
    """
    rules = [
        {"name": "banned", "type": "terms", "terms": ["launch codes"], "action": "block"},
        {"name": "email", "type": "pii", "entity": "email", "action": "flag"},  # flag: the prompt keeps its size
        {"name": "phone", "type": "pii", "entity": "phone", "action": "flag"},
        {"name": "card", "type": "pii", "entity": "credit_card", "action": "flag"},
        {"name": "ticket", "type": "regex", "pattern": "TCK-[0-9]{6}", "max_match_chars": 10, "action": "flag"},
    ]
    gw = await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": rules}))
    loop_thread = threading.get_ident()
    worker_threads: dict[str, set[int]] = {"moderate": set(), "count": set()}
    engine = gw.server.gateway.runtime.moderation
    moderate = engine.moderate

    def recording_moderate(text, direction):
        if direction == "input":  # the (short) answer is moderated where it arrives
            worker_threads["moderate"].add(threading.get_ident())
        return moderate(text, direction)

    chat = FORMATS["/v1/chat/completions"]
    count = chat.prompt_tokens

    def recording_count(parsed):
        worker_threads["count"].add(threading.get_ident())
        return count(parsed)

    monkeypatch.setattr(engine, "moderate", recording_moderate)
    monkeypatch.setattr(chat, "prompt_tokens", recording_count)
    # Just under the mock's own 1 MiB body limit.
    words = ("call 555-123-4567 or mail a@b.co about TCK-123456 " * 20_000)[:1_000_000]
    body = {"model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": words}]}

    async def big() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
                await resp.read()
                return resp.status

    def probe() -> list[float]:
        """/healthz from another thread for as long as the big request runs."""
        latencies = []
        while not task.done():
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", gw.server.port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
            finally:
                conn.close()
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        return latencies

    task = asyncio.create_task(big())
    latencies = await asyncio.to_thread(probe)
    assert await task == 200
    assert latencies  # /healthz kept answering while the big prompt was worked on
    # Counting runs in the prompt thread; moderation runs on the loop in short turns (proxy/prompt_turns.py,
    # tests/test_prompt_turns.py), fed in slices, so the engine's whole-text ``moderate`` is not called for it.
    assert worker_threads["count"] and loop_thread not in worker_threads["count"]
    assert not worker_threads["moderate"]
