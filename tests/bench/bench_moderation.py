"""Micro-benchmark: CPU microseconds to moderate a whole text, and per streamed chunk.

Run from the repository root:  python -m tests.bench.bench_moderation [--repeat N]

The rules are the suite's (all six PII entities redacting, a 10,000-term
block list). Whole texts are what a prompt or a non-streamed answer costs;
chunks are one word each, as the mock streams them, through the stream
rewriter (SSE decoding, JSON, the window, the splice). Prose without a digit,
an "@" or a secret's prefix skips most PII searching; the lines with a digit
and with an e-mail address show the cost when it cannot. Each figure is the
best of five timings, so other work on the machine shows less.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from proxy.config import ModerationConfig
from proxy.moderation import ModerationEngine
from proxy.formats import AnswerContext
from proxy.formats.chat import ChatFormat
from proxy.formats.base import ParsedRequest
from proxy.stream.pipeline import StreamPipeline
from tests.bench.harness import moderation_terms, words
from tests.bench.suite import TERMS, moderation_rules


def best_microseconds(work: Callable[[], object], number: int) -> float:
    work()
    return min(timeit.repeat(work, number=number, repeat=5, timer=time.process_time)) / number * 1e6


def stream_chunks(text: str) -> list[bytes]:
    chunks = []
    for i, word in enumerate(text.split(" ")):
        delta = {"content": word if i == 0 else " " + word}
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        chunks.append(f"data: {json.dumps(event)}\n\n".encode())
    return chunks


CAP: int | None = None  # the answer cap the gateway holds where a token budget applies


def relay(engine: ModerationEngine | None, chunks: list[bytes]) -> None:
    parsed = ParsedRequest({}, "gpt-4o", stream=True)
    pipeline = StreamPipeline(ChatFormat().stream_rewriter(parsed, AnswerContext("gpt-4o", engine, cap=CAP)), 1 << 20)
    for chunk in chunks:
        pipeline.feed(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="calls per timing (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        terms_file = Path(tmp) / "terms.txt"
        terms_file.write_text("\n".join(moderation_terms(TERMS)) + "\n", encoding="utf-8")
        engine = ModerationEngine.from_config(ModerationConfig(rules=moderation_rules(terms_file)))
    texts = {
        "20 words of prose": words(20),
        "200 words of prose": words(200),
        "200 words and a year (a digit)": "In 2023, " + words(200),
        "200 words and an e-mail address": "Mail bob@example.com: " + words(200),
    }
    print(f"moderation: six PII rules and a {TERMS:,}-term block list; CPU microseconds, best of 5")
    for label, text in texts.items():
        cost = best_microseconds(lambda text=text: engine.moderate(text, "input"), args.repeat)
        print(f"  whole text, {label}: {cost:,.1f} us ({cost / len(text.encode()) * 1000:,.1f} us per KB)")
    chunks = stream_chunks(words(200))
    for label, rules in (("without moderation", None), ("with moderation", engine)):
        cost = best_microseconds(lambda rules=rules: relay(rules, chunks), max(args.repeat // 20, 5)) / len(chunks)
        print(f"  streamed, one word per chunk, {label}: {cost:,.1f} us per chunk")


if __name__ == "__main__":
    main()
