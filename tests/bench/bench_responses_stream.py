"""Micro-benchmark: CPU microseconds per streamed delta, a Responses API stream beside a chat stream.

Run from the repository root:  python -m tests.bench.bench_responses_stream [--repeat N]

The same 200 words, one word per delta, through the pure pipeline of each
format (SSE decoding, JSON, the window, the re-encoding), with the suite's
rules (six PII entities, a 10,000-term block list) and without any. A
Responses delta is always parsed (its ``sequence_number`` is renumbered and
its text repeated in the done events), where a chat chunk the rules leave
alone may be forwarded from its text alone. Best of five timings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from proxy.config import ModerationConfig
from proxy.formats import FORMATS, AnswerContext
from proxy.formats.base import ParsedRequest
from proxy.moderation import ModerationEngine
from proxy.stream.pipeline import StreamPipeline
from tests.bench.bench_moderation import best_microseconds, stream_chunks
from tests.bench.harness import moderation_terms, words
from tests.bench.suite import TERMS, moderation_rules

MODEL = "gpt-4o"


def responses_chunks(text: str) -> list[bytes]:
    """A Responses stream's events for ``text``, one word per delta, as OpenAI frames them."""
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [{"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}},
              {"type": "response.output_item.added", "output_index": 0,
               "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}},
              {"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": "", "annotations": []}}]
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        events.append({"type": "response.output_text.delta", **where, "delta": piece, "logprobs": [],
                       "obfuscation": "x" * (16 - len(piece) % 16)})
    chunks = []
    for number, event in enumerate(events):
        chunks.append(f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': number})}\n\n".encode())
    return chunks


def relay(path: str, engine: ModerationEngine | None, chunks: list[bytes]) -> None:
    parsed = ParsedRequest({}, MODEL, stream=True)
    pipeline = StreamPipeline(FORMATS[path].stream_rewriter(parsed, AnswerContext(MODEL, engine)), 1 << 20)
    for chunk in chunks:
        pipeline.feed(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="streams per timing (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        terms_file = Path(tmp) / "terms.txt"
        terms_file.write_text("\n".join(moderation_terms(TERMS)) + "\n", encoding="utf-8")
        engine = ModerationEngine.from_config(ModerationConfig(rules=moderation_rules(terms_file)))
    text = words(200)
    streams = {"/v1/chat/completions": stream_chunks(text), "/v1/responses": responses_chunks(text)}
    print(f"one word per delta, 200 words; CPU microseconds per delta, best of 5 (rules: six PII, {TERMS:,} terms)")
    for label, rules in (("without moderation", None), ("with moderation", engine)):
        for path, chunks in streams.items():
            cost = best_microseconds(lambda path=path, rules=rules, chunks=chunks: relay(path, rules, chunks), args.repeat)
            print(f"  {path}, {label}: {cost / 200:,.1f} us per delta")


if __name__ == "__main__":
    main()
