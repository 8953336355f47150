"""An OpenAI-compatible fake model for tests, the demo and benchmarks.

It answers deterministically: the reply is the last user message (for
/v1/completions, the prompt) echoed back, streamed one word per chunk. A
``mock`` object in the request body steers it, so a test can ask for exactly
the misbehaviour it wants to see the gateway survive; the gateway passes
unknown body fields through untouched, so the test talks to the mock through
the gateway. Fields of ``mock`` (all optional):

    reply            exact reply text
    chunk_chars      stream this many characters per chunk (default: one word
                     and its following whitespace per chunk)
    delay_ms         pause before each streamed chunk (default: the app's delay,
                     which also precedes a non-streamed answer)
    status           answer this HTTP status with an OpenAI-shaped error body
    drop_after       stream this many content chunks, then cut the connection
                     (not streamed: cut it without sending any response)
    stall_before_ms  pause before sending the response headers
    stall_after      {"chunks": N, "ms": M}: pause M ms after N content chunks
    raw              strings written verbatim as the SSE body (malformed streams)
    no_done          true: leave out the final ``data: [DONE]``
    usage            false: never report usage, even when asked
    ignore_max_tokens  true: answer in full whatever max_tokens says (a provider that overspends)
    tool_call        {"name": ..., "arguments": "..."}: answer with a tool call
                     whose arguments stream in pieces

The request's own fields count too: ``n`` gives that many choices,
interleaved in the stream; ``max_completion_tokens`` (else ``max_tokens``)
cuts the reply to that many tokens with finish_reason "length";
``stream_options.include_usage`` adds the usage chunk. Usage is counted with
``proxy.tokens``, so it is exactly what the gateway would count itself.

Everything received is recorded in ``app[MOCK_STATE]`` (and served at
``GET /mock/requests``), with a count of clients that left before their
answer was complete, so tests can check what reached the upstream and that
the gateway hung up on it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from proxy import tokens
from proxy.app import LISTEN_BACKLOG

MOCK_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "mock-model",
)
# A fixed timestamp keeps /v1/models byte-for-byte stable across runs.
_MODELS_CREATED = 1_700_000_000
# Benchmarks push many requests through one mock; keep only the latest.
MAX_RECORDED_REQUESTS = 10_000
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_CHOICES = 128
# How often a pause checks whether the client is still there. aiohttp only
# cancels a handler whose client left when it runs with handler_cancellation,
# so the mock looks for itself and notices within this much time either way.
_DISCONNECT_POLL_SECONDS = 0.02
# One word and the whitespace after it; a whitespace-only text is one chunk.
_WORD = re.compile(r"\s*\S+\s*|\s+")


class MockState:
    """What the mock saw: requests (newest last) and clients that left early."""

    def __init__(self, delay_ms: float):
        self.delay_ms = delay_ms
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self._disconnected = asyncio.Event()
        self._answers = 0

    def next_answer_number(self) -> int:
        self._answers += 1
        return self._answers

    def record_request(self, request: web.Request, body: Any, raw: bytes = b"") -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": body,
                "raw": raw.decode("utf-8", "backslashreplace"),  # the bytes as sent, for tests of the encoding
            }
        )
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[0]

    def record_disconnect(self) -> None:
        self.disconnects += 1
        # Wake everyone waiting now; later waiters wait on a fresh event.
        self._disconnected.set()
        self._disconnected = asyncio.Event()

    async def wait_for_disconnect(self, timeout: float = 1.0, count: int = 1) -> bool:
        """True once ``count`` clients in all have left early; False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.disconnects < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._disconnected.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def reset(self) -> None:
        """Forget requests and disconnects, for tests that share one mock."""
        self.requests.clear()
        self.disconnects = 0


MOCK_STATE = web.AppKey("mock_state", MockState)


class MockError(Exception):
    """An answer with an OpenAI-shaped error body, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        if self.status == 429:
            error_type = "requests"
        elif self.status >= 500:
            error_type = "server_error"
        else:
            error_type = "invalid_request_error"
        body = {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def _bad(param: str, message: str) -> MockError:
    return MockError(400, message, param=param, code="invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str


@dataclass(frozen=True)
class MockControl:
    """The parsed ``mock`` body field; see the module docstring for each field."""

    reply: str | None = None
    chunk_chars: int | None = None
    delay_ms: float | None = None
    status: int | None = None
    drop_after: int | None = None
    stall_before_ms: float = 0.0
    stall_after_chunks: int | None = None
    stall_after_ms: float = 0.0
    raw: tuple[str, ...] | None = None
    no_done: bool = False
    usage: bool = True
    ignore_max_tokens: bool = False
    tool_call: ToolCall | None = None

    @classmethod
    def parse(cls, value: Any) -> MockControl:
        """Validate ``mock``; a typo'd or mistyped field is a 400 naming it, not silently ignored."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise _bad("mock", "`mock` must be an object")
        fields: dict[str, Any] = {}
        for key, item in value.items():
            param = f"mock.{key}"
            if key == "reply":
                if not isinstance(item, str):
                    raise _bad(param, "must be a string")
                fields["reply"] = item
            elif key in ("chunk_chars", "drop_after"):
                minimum = 1 if key == "chunk_chars" else 0
                if not _is_int(item) or item < minimum:
                    raise _bad(param, f"must be an integer >= {minimum}")
                fields[key] = item
            elif key in ("delay_ms", "stall_before_ms"):
                if not _is_number(item) or item < 0:
                    raise _bad(param, "must be a number >= 0")
                fields[key] = float(item)
            elif key == "status":
                if not _is_int(item) or not 400 <= item <= 599:
                    raise _bad(param, "must be an HTTP error status (400-599)")
                fields["status"] = item
            elif key == "stall_after":
                chunks = item.get("chunks") if isinstance(item, dict) else None
                ms = item.get("ms") if isinstance(item, dict) else None
                if not (_is_int(chunks) and chunks >= 0 and _is_number(ms) and ms >= 0):
                    raise _bad(param, 'must be {"chunks": integer >= 0, "ms": number >= 0}')
                fields["stall_after_chunks"] = chunks
                fields["stall_after_ms"] = float(ms)
            elif key == "raw":
                if not isinstance(item, list) or not all(isinstance(piece, str) for piece in item):
                    raise _bad(param, "must be a list of strings")
                fields["raw"] = tuple(item)
            elif key in ("no_done", "usage", "ignore_max_tokens"):
                if not isinstance(item, bool):
                    raise _bad(param, "must be true or false")
                fields[key] = item
            elif key == "tool_call":
                name = item.get("name") if isinstance(item, dict) else None
                arguments = item.get("arguments", "") if isinstance(item, dict) else None
                if not (isinstance(name, str) and name and isinstance(arguments, str)):
                    raise _bad(param, 'must be {"name": non-empty string, "arguments": string}')
                fields["tool_call"] = ToolCall(name, arguments)
            else:
                raise _bad(param, f"unknown mock field {key!r}")
        return cls(**fields)


# --- request parsing --------------------------------------------------------


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, recorded before it is judged (tests inspect bad ones too)."""
    state = request.app[MOCK_STATE]
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        state.record_request(request, None, raw)
        raise MockError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    state.record_request(request, body, raw)
    if not isinstance(body, dict):
        raise MockError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "you must provide a model parameter")
    return model


def _wants_stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    return stream is True


def _wants_usage(body: dict[str, Any], control: MockControl) -> bool:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    return control.usage and isinstance(options, dict) and options.get("include_usage") is True


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise _bad("n", f"must be an integer from 1 to {MAX_CHOICES}")
    return n


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The completion token limit: max_completion_tokens, else max_tokens."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 0:
            raise _bad(field, "must be an integer >= 0")
        return value
    return None


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                )
            return ""
    return ""


def _prompt_text(prompt: Any) -> str:
    """What a completion echoes: the prompt, or the first of several; token-id prompts echo nothing."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""


# --- the answer -------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What every choice says: the generated text (content or tool arguments) and why it ended."""

    text: str
    finish_reason: str
    pieces: list[str]


def _plan_answer(model: str, text: str, max_tokens: int | None, control: MockControl, natural_finish: str) -> _Answer:
    """Cut ``text`` to ``max_tokens`` (finish_reason "length") and split it into stream chunks."""
    # A lone surrogate (valid JSON, invalid Unicode) becomes U+FFFD, so every
    # chunk encodes as UTF-8.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    finish_reason = natural_finish
    if max_tokens is not None and not control.ignore_max_tokens:
        encoding = tokens.encoding_for_model(model)
        ids = encoding.encode_ordinary(text)
        if len(ids) > max_tokens:
            # Dropping a torn multi-byte character keeps the text valid UTF-8.
            text = encoding.decode_bytes(ids[:max_tokens]).decode("utf-8", "ignore")
            finish_reason = "length"
    if control.chunk_chars is not None:
        size = control.chunk_chars
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
    else:
        pieces = _WORD.findall(text)
    return _Answer(text, finish_reason, pieces)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.Request, ms: float) -> None:
    """Sleep ``ms``, but raise ConnectionResetError as soon as the client hangs up."""
    if ms <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ms / 1000
    while True:
        if _client_gone(request):
            raise ConnectionResetError("the client closed the connection")
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, _DISCONNECT_POLL_SECONDS))


def _hang_up(request: web.Request) -> None:
    """Close the client's connection, flushing what was already written."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _no_answer(request: web.Request) -> web.Response:
    """``drop_after`` on a non-streamed request: the connection closes with no response at all."""
    _hang_up(request)
    # aiohttp fails to send this on the closed connection and lets it go quietly.
    return web.Response(status=500)


class _EventStream:
    """An SSE response: ``data: <json>`` events, then optionally ``data: [DONE]``."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, event: dict[str, Any]) -> None:
        # Raw UTF-8, as OpenAI sends it, so a consumer's decoder meets
        # multi-byte characters (and, with chunk_chars, characters split
        # across network reads).
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(b"data: " + data.encode() + b"\n\n")

    async def write_raw(self, text: str) -> None:
        # surrogatepass: even a lone surrogate a test sends goes out verbatim.
        await self.response.write(text.encode("utf-8", "surrogatepass"))

    async def finish(self, with_done: bool) -> web.StreamResponse:
        if with_done:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response

    def cut(self) -> None:
        """Close the connection mid-body: what has been written is flushed, the rest never comes."""
        _hang_up(self.request)


async def _stream_content(
    stream: _EventStream,
    control: MockControl,
    delay_ms: float,
    answer: _Answer,
    n: int,
    make_chunk: Callable[[int, str], dict[str, Any]],
) -> bool:
    """Send each piece to every choice in turn; False if ``drop_after`` cut the stream."""
    sent = 0
    if control.stall_after_chunks == 0:
        await _pause(stream.request, control.stall_after_ms)
    for piece in answer.pieces:
        for index in range(n):
            if control.drop_after is not None and sent >= control.drop_after:
                stream.cut()
                return False
            await _pause(stream.request, delay_ms)
            await stream.send(make_chunk(index, piece))
            sent += 1
            if sent == control.stall_after_chunks:
                await _pause(stream.request, control.stall_after_ms)
    if control.drop_after is not None:
        # Fewer chunks than drop_after: still no final chunk and no [DONE].
        stream.cut()
        return False
    return True


async def _send_raw(request: web.Request, raw: tuple[str, ...], delay_ms: float) -> web.StreamResponse:
    stream = _EventStream(request)
    await stream.open()
    for text in raw:
        await _pause(request, delay_ms)
        await stream.write_raw(text)
    return await stream.finish(with_done=False)


async def _before_answer(request: web.Request, control: MockControl) -> float:
    """Stall, fail if told to; returns the per-chunk delay in ms for what follows."""
    await _pause(request, control.stall_before_ms)
    if control.status is not None:
        code = "rate_limit_exceeded" if control.status == 429 else None
        raise MockError(control.status, f"mock upstream error (HTTP {control.status})", code=code)
    return control.delay_ms if control.delay_ms is not None else request.app[MOCK_STATE].delay_ms


def _answer_options(body: dict[str, Any]) -> tuple[bool, MockControl, int, int | None, bool]:
    """What chat and completions read alike: stream, the mock controls, n, max tokens, usage."""
    stream_wanted = _wants_stream(body)
    control = MockControl.parse(body.get("mock"))
    return stream_wanted, control, _choice_count(body), _max_tokens(body), stream_wanted and _wants_usage(body, control)


# --- handlers ---------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "`messages` must be a non-empty array")
    stream_wanted, control, n, max_tokens, include_usage = _answer_options(body)

    delay_ms = await _before_answer(request, control)
    if control.raw is not None:
        return await _send_raw(request, control.raw, delay_ms)

    tool = control.tool_call
    if tool is not None:
        answer = _plan_answer(model, tool.arguments, max_tokens, control, "tool_calls")
    else:
        reply = control.reply if control.reply is not None else _last_user_text(messages)
        answer = _plan_answer(model, reply, max_tokens, control, "stop")
    number = request.app[MOCK_STATE].next_answer_number()
    completion_id = f"chatcmpl-mock-{number}"
    call_id = f"call_mock_{number}"
    created = int(time.time())

    def usage() -> dict[str, int]:
        per_choice = tokens.count_text(model, answer.text)
        if tool is not None:
            per_choice += tokens.count_text(model, tool.name)
        return _usage(tokens.count_chat_prompt(model, messages), per_choice * n)

    if not stream_wanted:
        await _pause(request, delay_ms)
        if control.drop_after is not None:
            return _no_answer(request)
        if tool is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": tool.name, "arguments": answer.text}}
                ],
            }
        else:
            message = {"role": "assistant", "content": answer.text, "refusal": None}
        result: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
                for i in range(n)
            ],
            "system_fingerprint": None,
        }
        if control.usage:
            result["usage"] = usage()
        return web.json_response(result)

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            event["usage"] = None
        return event

    if tool is not None:
        first_delta: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": tool.name, "arguments": ""}}
            ],
        }

        def piece_chunk(index: int, piece: str) -> dict[str, Any]:
            return chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    else:
        first_delta = {"role": "assistant", "content": "", "refusal": None}

        def piece_chunk(index: int, piece: str) -> dict[str, Any]:
            return chunk(index, {"content": piece})

    stream = _EventStream(request)
    await stream.open()
    for index in range(n):
        await stream.send(chunk(index, first_delta))
    if not await _stream_content(stream, control, delay_ms, answer, n, piece_chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, {}, answer.finish_reason))
    if include_usage:
        final = chunk(0, {})
        final["choices"] = []
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise _bad("prompt", "`prompt` must be a string or an array")
    stream_wanted, control, n, max_tokens, include_usage = _answer_options(body)

    delay_ms = await _before_answer(request, control)
    if control.raw is not None:
        return await _send_raw(request, control.raw, delay_ms)

    reply = control.reply if control.reply is not None else _prompt_text(prompt)
    answer = _plan_answer(model, reply, max_tokens, control, "stop")
    completion_id = f"cmpl-mock-{request.app[MOCK_STATE].next_answer_number()}"
    created = int(time.time())

    def usage() -> dict[str, int]:
        return _usage(tokens.count_prompt(model, prompt), tokens.count_text(model, answer.text) * n)

    def completion(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}

    if not stream_wanted:
        await _pause(request, delay_ms)
        if control.drop_after is not None:
            return _no_answer(request)
        result = completion([choice(i, answer.text, answer.finish_reason) for i in range(n)])
        if control.usage:
            result["usage"] = usage()
        return web.json_response(result)

    def chunk(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        event = completion([choice(index, text, finish_reason)])
        if include_usage:
            event["usage"] = None
        return event

    stream = _EventStream(request)
    await stream.open()
    if not await _stream_content(stream, control, delay_ms, answer, n, chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, "", answer.finish_reason))
    if include_usage:
        final = completion([])
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)


def _embedding_items(value: Any) -> list[Any]:
    """One entry per vector: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if all(_is_int(item) for item in value):
            return [value]
        if all(isinstance(item, list) and item and all(_is_int(t) for t in item) for item in value):
            return value
    raise _bad("input", "`input` must be a non-empty string, array of strings, or array of token arrays")


def _vector(item: Any, dimensions: int) -> list[float]:
    """A deterministic pseudo-embedding in [-1, 1], derived from a hash of the input."""
    digest = hashlib.shake_256(json.dumps(item).encode()).digest(dimensions)
    return [round(byte / 127.5 - 1.0, 6) for byte in digest]


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(body)
    items = _embedding_items(body.get("input"))
    dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if not _is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        raise _bad("dimensions", f"must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}")
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise _bad("encoding_format", "must be 'float' or 'base64'")
    control = MockControl.parse(body.get("mock"))
    delay_ms = await _before_answer(request, control)
    await _pause(request, delay_ms)

    data = []
    for index, item in enumerate(items):
        vector = _vector(item, dimensions)
        embedding: Any = vector
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt_tokens = tokens.count_prompt(model, body["input"])
    result: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if control.usage:
        result["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return web.json_response(result)


async def list_models(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].record_request(request, None)
    data = [
        {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "sluice-mock"} for name in MOCK_MODELS
    ]
    return web.json_response({"object": "list", "data": data})


async def recorded_requests(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    return web.json_response({"requests": list(state.requests), "disconnects": state.disconnects})


@web.middleware
async def _errors_and_disconnects(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render MockError; count clients that left before their answer was complete.

    A whole answer carries ``openai-processing-ms``, the model's own time, as
    OpenAI's API does: the benchmarks subtract it to see the time spent
    outside the model (client, network hops, a gateway), without the jitter
    of the mock's own sleep.
    """
    started = time.perf_counter()
    try:
        response = await handler(request)
        if not response.prepared:
            response.headers["openai-processing-ms"] = f"{(time.perf_counter() - started) * 1000:.3f}"
        return response
    except MockError as exc:
        return exc.response()
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client leaves (with handler_cancellation).
        request.app[MOCK_STATE].record_disconnect()
        raise
    except ConnectionResetError:
        request.app[MOCK_STATE].record_disconnect()
        # Nobody will read this; returning (not raising) keeps aiohttp from
        # logging a client's hang-up as a server error.
        return web.Response(status=499)


async def _preload_encodings(app: web.Application) -> None:
    # Off the event loop: the first load takes about a second.
    await asyncio.get_running_loop().run_in_executor(None, tokens.preload)


def create_mock_app(delay_ms: float = 0.0) -> web.Application:
    """The mock as an aiohttp app; ``delay_ms`` paces every streamed chunk and non-streamed answer."""
    app = web.Application(middlewares=[_errors_and_disconnects])
    app[MOCK_STATE] = MockState(delay_ms)
    app.on_startup.append(_preload_encodings)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/mock/requests", recorded_requests)
    return app


async def run_mock_upstream(host: str, port: int, delay_ms: float) -> None:
    """Serve the mock on ``host:port`` until cancelled."""
    runner = web.AppRunner(create_mock_app(delay_ms), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()  # benchmarks open thousands of streams
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
