"""Counting without keeping the text, and billing what a client that left never got: pure properties.

``StreamingTokenCounter`` keeps only a bounded tail of the text; whatever
the chunking, its total is tiktoken's count of the whole text.
``StreamPipeline.count_unsent`` bills bytes the relay read but never fed
(the client left): the usage is the same as if they had been sent.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.token_counter import _SETTLE_AT_CHARS, StreamingTokenCounter
from proxy.tokens import count_text
from test_stream_pipeline import MODEL, chunk, pipeline, sse

# Words, digits, CJK, emoji, whitespace runs and punctuation: where tiktoken's pieces merge and split.
TEXTS = st.text(
    alphabet=st.sampled_from(list("ab xyz  \n\t0123456789'sllve.,!?-") + ["\u4e2d", "\u6587", "\U0001f600", "\u00e9"]),
    max_size=3000,
)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 3000), max_size=40))
def test_any_chunking_counts_as_the_whole_text(text, cuts):
    counter = StreamingTokenCounter(MODEL)
    points = sorted({c % (len(text) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(text)]):
        counter.add(text[a:b])
    assert counter.total() == count_text(MODEL, text)
    assert counter.bound() >= counter.total()


def test_a_long_text_keeps_only_a_bounded_tail():
    counter = StreamingTokenCounter(MODEL)
    for _ in range(20_000):
        counter.add("lorem ipsum dolor sit amet ")
    assert len(counter._tail) <= _SETTLE_AT_CHARS + 64  # noqa: SLF001  the memory is the tail's, not the text's
    assert counter.total() == count_text(MODEL, "lorem ipsum dolor sit amet " * 20_000)


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab cd\u4e2d.", min_size=1, max_size=20), min_size=1, max_size=30),
       sent=st.integers(0, 30), cut=st.integers(0, 10_000))
def test_unsent_bytes_are_billed_as_if_sent(pieces, sent, cut):
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
    data = sse(events)
    whole = pipeline(engine=None)
    whole.feed(data)
    whole.client_gone()
    split = pipeline(engine=None)
    at = min(len(data), sum(len(sse([e])) for e in events[: sent + 1]) + cut % 7)
    split.feed(data[:at])
    split.client_gone()
    split.count_unsent(data[at:])
    assert split.rewriter.usage(5) == whole.rewriter.usage(5)
    assert split.rewriter.usage(5)[1] == count_text(MODEL, "".join(pieces))
