"""One adapter per wire format; ``FORMATS`` maps each public path to its adapter.

Adding a format is adding a module here and a line to ``FORMATS``.
"""

from .base import AnswerContext, EventRewriter, Moderated, ParsedRequest, StreamBroken, TextRef, WireFormat
from .chat import ChatFormat
from .completions import CompletionsFormat
from .embeddings import EmbeddingsFormat
from .messages import MessagesFormat
from .responses import ResponsesFormat

FORMATS: dict[str, WireFormat] = {
    "/v1/chat/completions": ChatFormat(),
    "/v1/completions": CompletionsFormat(),
    "/v1/embeddings": EmbeddingsFormat(),
    "/v1/messages": MessagesFormat(),
    "/v1/responses": ResponsesFormat(),
}

__all__ = [
    "FORMATS",
    "AnswerContext",
    "EventRewriter",
    "Moderated",
    "ParsedRequest",
    "StreamBroken",
    "TextRef",
    "WireFormat",
]
