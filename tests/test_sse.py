"""The SSE decoder: any split of a byte stream decodes to the same events."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stream.sse import Event, EventTooLarge, SSEDecoder, encode_data


def decode_all(chunks, max_event_bytes=None):
    decoder = SSEDecoder(max_event_bytes)
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events


def test_lf_and_crlf_and_cr_line_endings_are_equivalent():
    body = 'data: {"a": 1}\n\ndata: two\n\n'
    expected = [Event('{"a": 1}'), Event("two")]
    assert decode_all([body.encode()]) == expected
    assert decode_all([body.replace("\n", "\r\n").encode()]) == expected
    assert decode_all([body.replace("\n", "\r").encode()]) == expected


def test_multiline_data_fields_join_with_newline():
    assert decode_all([b"data: first\ndata: second\ndata:third\n\n"]) == [Event("first\nsecond\nthird")]


def test_comments_and_keepalives_are_not_events():
    assert decode_all([b": keep-alive\n\n: another\ndata: x\n\n"]) == [Event("x")]


def test_event_id_and_retry_fields():
    events = decode_all([b"event: delta\nid: 7\nretry: 1500\ndata: x\n\n"])
    assert events == [Event("x", event="delta", id="7", retry=1500)]


def test_last_event_without_blank_line_is_kept_at_finish():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: [DONE]") == [Event("a")]
    assert decoder.finish() == [Event("[DONE]")]


def test_cr_at_chunk_end_followed_by_lf_is_one_line_end():
    assert decode_all([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]) == [Event("a"), Event("b")]


def test_a_whole_event_after_part_of_a_line_continues_that_line():
    assert decode_all([b"data: a", b"data: b\n\n"]) == [Event("adata: b")]
    assert decode_all([b"data: a\r", b"data: b\n\n", b"\ndata: c\n\n"]) == [Event("a\nb"), Event("c")]


def test_utf8_split_inside_a_character():
    raw = 'data: héllo 🌊\n\n'.encode()
    split = raw.index("🌊".encode()) + 2
    assert decode_all([raw[:split], raw[split:]]) == [Event("héllo 🌊")]


def test_bom_at_stream_start_is_ignored_even_when_split():
    raw = b"\xef\xbb\xbfdata: x\n\n"
    assert decode_all([raw[:1], raw[1:2], raw[2:]]) == [Event("x")]


def test_event_over_the_limit_raises():
    with pytest.raises(EventTooLarge):
        decode_all([b"data: " + b"x" * 100 + b"\n\n"], max_event_bytes=50)
    # A partial line that keeps growing without a newline is caught too.
    decoder = SSEDecoder(max_event_bytes=50)
    with pytest.raises(EventTooLarge):
        for _ in range(10):
            decoder.feed(b"xxxxxxxxxx")


def test_encode_data_round_trips_through_the_decoder():
    assert decode_all([encode_data(b"line1\nline2")]) == [Event("line1\nline2")]


_field_values = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)
_events = st.lists(
    st.tuples(st.lists(_field_values, min_size=1, max_size=3), st.one_of(st.none(), _field_values)), min_size=1, max_size=6
)


def _render(events, newline):
    out = ""
    for data_lines, comment in events:
        if comment is not None:
            out += ":" + comment + newline
        for line in data_lines:
            out += "data: " + line + newline
        out += newline
    return out.encode()


@settings(max_examples=300, deadline=None)
@given(events=_events, newline=st.sampled_from(["\n", "\r\n", "\r"]), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_decodes_to_the_same_events(events, newline, cuts):
    raw = _render(events, newline)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]
    assert decode_all(chunks) == decode_all([raw])
    assert decode_all(chunks) == [Event("\n".join(lines)) for lines, _ in events]


_single_events = st.lists(
    st.tuples(
        st.lists(_field_values, min_size=1, max_size=2),
        st.sampled_from(["", "event: delta\n", "id: 7\n", ": note\n", "retry: 100\n"]),
        st.sampled_from(["\n", "\r\n"]),
        st.integers(0, 50),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(events=_single_events)
def test_one_event_per_chunk_decodes_like_the_whole_stream(events):
    """Providers send a chunk per event, the case the decoder takes without splitting lines;
    some events here arrive in two pieces, so a whole one can follow part of another."""
    chunks = []
    for lines, before, newline, cut in events:
        raw = (before + "".join(f"data: {line}\n" for line in lines) + "\n").replace("\n", newline).encode()
        cut %= len(raw)
        chunks += [raw[:cut], raw[cut:]] if cut else [raw]
    assert decode_all(chunks) == decode_all([b"".join(chunks)])
    assert decoded_or_too_large(chunks, 12) == decoded_or_too_large([b"".join(chunks)], 12)


def decoded_or_too_large(chunks, max_event_bytes):
    try:
        return decode_all(chunks, max_event_bytes)
    except EventTooLarge:
        return "too large"
