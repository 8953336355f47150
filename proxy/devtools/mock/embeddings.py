"""``POST /v1/embeddings``: deterministic pseudo-vectors, as floats or base64."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

from aiohttp import web

from proxy import tokens

from .control import MockControl, bad, is_int
from .fields import model_of
from .wire import before_answer, pause, read_json, verbatim

DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096


def _embedding_items(value: Any) -> list[Any]:
    """One entry per vector: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if all(is_int(item) for item in value):
            return [value]
        if all(isinstance(item, list) and item and all(is_int(t) for t in item) for item in value):
            return value
    raise bad("input", "`input` must be a non-empty string, array of strings, or array of token arrays")


def _vector(item: Any, dimensions: int) -> list[float]:
    """A deterministic pseudo-embedding in [-1, 1], derived from a hash of the input."""
    digest = hashlib.shake_256(json.dumps(item).encode()).digest(dimensions)
    return [round(byte / 127.5 - 1.0, 6) for byte in digest]


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    items = _embedding_items(body.get("input"))
    dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if not is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        raise bad("dimensions", f"must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}")
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise bad("encoding_format", "must be 'float' or 'base64'")
    control = MockControl.parse(body.get("mock"))
    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream=False)) is not None:
        return early
    await pause(request, delay_ms)

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
