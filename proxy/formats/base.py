"""The contract every wire-format adapter fulfils, and the plain values adapters share.

An adapter is the only code that knows a format's field names: where a
request's text is, the answer cap, how usage is asked for and comes back,
which fields of an answer and of a stream event a user reads, how a block is
signalled and what an error looks like. The request path, the stream
pipeline, the accounting and the logs call these methods and never look
inside a payload themselves, so a new format is one new module.

Adapters are pure: bytes and dicts in, bytes and dicts out, no I/O, no clock.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .. import jsonio
from ..errors import GatewayError

if TYPE_CHECKING:
    from ..moderation import Action, ModerationEngine
    from ..stream.sse import Event


@dataclass(slots=True)
class ParsedRequest:
    """A validated request: the payload as sent, and what the gateway read from it."""

    payload: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool = False  # the client asked for the usage a stream ends with
    n: int = 1  # choices asked for


class TextRef:
    """One prompt text inside a payload, readable and writable in place (for redaction)."""

    __slots__ = ("container", "key")

    def __init__(self, container: Any, key: Any):
        self.container = container
        self.key = key

    def get(self) -> str:
        return self.container[self.key]

    def set(self, text: str) -> None:
        self.container[self.key] = text


class Usage(NamedTuple):
    """Tokens as the provider reported them; ``None`` where it did not say."""

    prompt: int | None
    completion: int | None


def usage_from(value: Any, prompt_key: str, completion_key: str) -> Usage | None:
    """A provider's usage object read with the format's key names, or None if it holds no count."""
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get(prompt_key), value.get(completion_key)
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0 else None
    completion = (
        completion if isinstance(completion, int) and not isinstance(completion, bool) and completion >= 0 else None
    )
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion)


@dataclass(slots=True)
class AnswerContext:
    """What moderating and counting one answer needs, the same for every format."""

    model: str
    engine: ModerationEngine | None  # None: no output rules
    client_wants_usage: bool = False
    cap: int | None = None  # the most completion tokens a choice may have, held by the gateway


@dataclass(slots=True)
class Moderated:
    """What moderating a whole answer did: the bytes to send and what the accounting needs."""

    body: bytes
    actions: list[Action] = field(default_factory=list)
    usage: Usage | None = None  # the provider's
    counted_completion: int = 0  # tiktoken over every text field, for when the provider gave none


class StreamBroken(Exception):
    """The upstream's stream cannot be relayed further (bad JSON, its own error event)."""


class End(NamedTuple):
    """How the answer ended as the rewriter saw it: ``done``, ``blocked`` or ``capped``."""

    kind: str


class EventRewriter(abc.ABC):
    """One stream's pure core: each upstream event in, the bytes for the client out.

    ``end`` is set once, by the event that ends the answer (the format's own
    end, a block, or the answer cap); nothing is accepted after it.
    ``delivered_text`` turns true with the first text released to the client.
    """

    end: End | None = None
    delivered_text: bool = False

    def __init__(self) -> None:
        self.actions: list[Action] = []

    @abc.abstractmethod
    def event(self, event: Event) -> bytes:
        """The bytes to send for one upstream event (may be empty); raises ``StreamBroken``."""

    @abc.abstractmethod
    def upstream_closed(self) -> bytes:
        """The upstream's body ended: the closing bytes if the answer was complete, else ``StreamBroken``."""

    @abc.abstractmethod
    def broken(self, message: str, code: str) -> bytes:
        """The stream cannot go on: what the windows hold (moderated), then the format's error event."""

    @abc.abstractmethod
    def usage(self, prompt_tokens: int) -> tuple[int, int]:
        """(prompt, completion) tokens to bill: the provider's numbers, else what was counted."""


class WireFormat(abc.ABC):
    """One wire format. Subclasses set the class attributes and implement the methods."""

    endpoint: ClassVar[str]  # the label in metrics and logs
    path: ClassVar[str]  # posted to the upstream's ``{base_url}{path}``
    api: ClassVar[str] = "openai"  # the upstream ``api`` it needs
    streams: ClassVar[bool] = True
    input_param: ClassVar[str | None] = None  # the param a blocked prompt's error names

    @abc.abstractmethod
    def parse(self, body: bytes) -> ParsedRequest:
        """Validate the fields the gateway reads; raise a 400 naming the field."""

    @abc.abstractmethod
    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        """The prompt's tokens, counted the way the provider bills them."""

    @abc.abstractmethod
    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        """Every text of the request a model reads, to moderate in place."""

    def requested_tokens(self, parsed: ParsedRequest, default: int) -> int:
        """Completion tokens to reserve for the whole request (every choice)."""
        return 0

    def cap_fields(self, parsed: ParsedRequest, per_choice: int) -> dict[str, Any]:
        """The request fields that cap each choice's answer at ``per_choice`` tokens."""
        return {}

    def check_cap(self, per_choice: int) -> None:
        """Refuse a cap the provider would refuse (raise a 429 naming what is left)."""

    def stream_fields(self, parsed: ParsedRequest) -> dict[str, Any]:
        """Fields a streamed request gets so that its usage comes back (hidden again from the client)."""
        return {}

    @abc.abstractmethod
    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        """Moderate, cap and count a whole (non-streamed) 200 answer."""

    def stream_rewriter(self, parsed: ParsedRequest, ctx: AnswerContext) -> EventRewriter:
        raise NotImplementedError(f"{self.endpoint} does not stream")

    def blocked_prompt(self, rule: str) -> GatewayError:
        return GatewayError(
            400, "content_filter", f"The prompt was blocked by the moderation rule {rule!r}.", self.input_param
        )

    def error_body(self, error: GatewayError) -> bytes:
        """The gateway's own error in this format's shape (OpenAI's unless overridden)."""
        return jsonio.dumps(error.body())


ChoiceFilter = Callable[[Any], bool]
