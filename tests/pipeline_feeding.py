"""Feeding a ``StreamPipeline`` the way h11's tests feed a reader: the same bytes, cut anywhere."""

from __future__ import annotations


def feed(pipe, data: bytes, cuts=()):
    """Feed ``data`` cut at ``cuts`` (taken modulo its length), then the upstream's close; (bytes out, end)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out = b""
    end = None
    for a, b in zip([0, *points], [*points, len(data)]):
        if data[a:b]:
            piece, end = pipe.feed(data[a:b])
            out += piece
    if end is None:
        piece, end = pipe.upstream_closed()
        out += piece
    return out, end
