"""A fake model for tests, the demo and benchmarks, speaking every format Sluice does.

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/responses`` (OpenAI), ``POST /v1/messages``
(Anthropic), ``GET /v1/models``, and ``GET /mock/requests`` (what it saw).

It answers deterministically: the reply is the last user message (for
completions, the prompt) echoed back, streamed one word per chunk, with usage
counted by ``proxy.tokens``, so it is exactly what the gateway would count
itself. A ``mock`` object in the request body steers it (the gateway passes
unknown body fields through, so a test talks to the mock through the
gateway). Fields, all optional (where a field is not for an endpoint, the
answer is a 400 naming it):

    reply            exact reply text
    chunk_chars      stream this many characters per chunk (default: one word
                     and its following whitespace per chunk)
    delay_ms         pause before each streamed chunk (default: the app's delay,
                     which also precedes a non-streamed answer)
    status           answer this HTTP status with an error body in the
                     endpoint's shape (OpenAI's, or Anthropic's on /v1/messages)
    drop_after       stream this many content deltas, then cut the connection
                     (not streamed: cut it without sending any response)
    stall_before_ms  pause before sending the response headers
    stall_after      {"chunks": N, "ms": M}: pause M ms after N content deltas
    raw              strings written verbatim, one write each, as the SSE body
                     (malformed streams, recorded provider shapes)
    raw_body         a string sent verbatim as the whole JSON body of a
                     non-streamed answer, with ``status`` if given (a
                     provider's own answer or error, byte for byte)
    usage            false: never report usage, even when asked (not on
                     /v1/messages: Anthropic always reports it)
    ignore_cap       true: answer in full whatever the request's cap says (an
                     upstream that ignores max_tokens)
    tool_call        {"name": ..., "arguments": "..."}: answer with a tool call
                     whose arguments stream in pieces (on /v1/messages the
                     arguments must be a JSON object: the tool_use input)
    no_done          chat and completions: leave out the final ``data: [DONE]``
    reasoning        chat: reasoning streamed before the answer (it counts
                     against the cap); /v1/responses: a reasoning item with
                     this summary text
    reasoning_field  chat: "reasoning_content" (default, DeepSeek's) or
                     "reasoning" (vLLM's), the field reasoning goes in
    thinking         /v1/messages: a thinking block with this text
    refusal          chat: answer in ``refusal`` instead of content;
                     /v1/responses: the message is a refusal with this text
    error_after      /v1/responses and /v1/messages: after N deltas, an ``error``
                     event ends the stream (Anthropic's: overloaded_error); not
                     streamed: a 500 (OpenAI) or 529 overloaded_error
    fail_after       /v1/responses: after N deltas, ``response.failed`` ends
                     the stream (usage null); not streamed: status "failed"
    cached_tokens    /v1/responses and /v1/messages: report this many prompt
                     tokens as read from the cache

The request's own fields count too: ``n`` gives that many chat/completions
choices, interleaved in the stream; ``max_completion_tokens`` (else
``max_tokens``; ``max_output_tokens`` on /v1/responses) cuts the reply with
finish_reason "length" (status "incomplete", stop_reason "max_tokens");
``stream_options.include_usage`` adds the chat usage chunk; chat's
``logprobs`` / ``top_logprobs`` give each content or refusal piece an entry.

Everything received is recorded in ``app[MOCK_STATE]`` (and served at
``GET /mock/requests``), with a count of clients that left before their
answer was complete, so tests can check what reached the upstream and that
the gateway hung up on it.
"""

from .app import MOCK_MODELS, create_mock_app, run_mock_upstream
from .control import MockControl, MockError
from .plan import plan_answer
from .state import MOCK_STATE, MockState

__all__ = [
    "MOCK_MODELS",
    "MOCK_STATE",
    "MockControl",
    "MockError",
    "MockState",
    "create_mock_app",
    "plan_answer",
    "run_mock_upstream",
]
