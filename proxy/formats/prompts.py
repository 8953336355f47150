"""The ``prompt`` of Completions and the ``input`` of Embeddings: text, texts, or token IDs.

Token IDs are text too: a model reads them. Where input rules apply they are
decoded with the model's encoding, moderated like text, and a redaction is
written back as the redacted text's token IDs. IDs the encoding does not
know are refused with a 400 (the provider would refuse them too).
"""

from __future__ import annotations

from typing import Any

from ..errors import invalid_request
from ..tokens import encoding_for_model
from ..validation import is_token_array
from .base import TextRef


class TokenIdsRef(TextRef):
    """A prompt given as token IDs, read and written as text."""

    __slots__ = ("_encoding", "_param")

    def __init__(self, container: Any, key: Any, model: str, param: str):
        super().__init__(container, key)
        self._encoding = encoding_for_model(model)
        self._param = param

    def get(self) -> str:
        try:
            return self._encoding.decode(self.container[self.key], errors="replace")
        except (KeyError, ValueError, OverflowError):
            raise invalid_request(f"'{self._param}' holds a token ID the model's encoding does not know.", self._param) from None

    def set(self, text: str) -> None:
        self.container[self.key] = self._encoding.encode_ordinary(text)


def prompt_refs(payload: dict[str, Any], name: str, model: str, token_ids: bool) -> list[TextRef]:
    """Every text of ``payload[name]``; token IDs too when ``token_ids`` (input rules exist)."""
    value = payload[name]
    if isinstance(value, str):
        return [TextRef(payload, name)]
    refs: list[TextRef] = []
    if is_token_array(value):
        if token_ids:
            refs.append(TokenIdsRef(payload, name, model, name))
        return refs
    for i, item in enumerate(value):
        if isinstance(item, str):
            refs.append(TextRef(value, i))
        elif token_ids and is_token_array(item):
            refs.append(TokenIdsRef(value, i, model, name))
    return refs
