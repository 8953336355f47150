"""The log batcher's writes: each at most PIPE_BUF bytes and cut only at a line's end, so workers
sharing one stdout pipe never cut each other's lines (the real pipe: tests/test_workers_logs.py)."""

from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given, settings, strategies as st

from proxy.logs import PIPE_BUF, LineBatcher, cut_writes, line_bytes

# Lines as a log writes them: no newline inside; ASCII mostly, any script and lone surrogates at times;
# lengths around the limit, and beyond it.
ascii_lines = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=3000)
any_lines = st.text(st.characters(blacklist_characters="\n"), max_size=1500)
long_lines = st.integers(PIPE_BUF - 2, PIPE_BUF + 200).map(lambda n: "x" * n)
lines_strategy = st.lists(st.one_of(ascii_lines, any_lines, long_lines), max_size=40)


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@given(lines_strategy, st.sampled_from([PIPE_BUF, 512, 100]))
def test_writes_are_whole_lines_within_the_limit_and_add_up_to_the_input(lines, limit):
    writes = cut_writes(lines, limit)
    assert "".join(writes) == "".join(line + "\n" for line in lines)
    assert all(write.endswith("\n") for write in writes)
    # Each write is a run of whole lines, taken in order.
    rebuilt = [write[:-1].split("\n") for write in writes]
    assert [line for run in rebuilt for line in run] == lines
    for write, run in zip(writes, rebuilt):
        assert utf8_size(write) <= limit or len(run) == 1, (utf8_size(write), len(run))
    # The fewest writes: no two neighbours would have fitted in one.
    for first, second in zip(writes, writes[1:]):
        assert utf8_size(first) + utf8_size(second.split("\n", 1)[0] + "\n") > limit


@given(st.text(max_size=200))
def test_line_bytes_is_the_utf8_size_with_the_newline(line):
    assert line_bytes(line) == utf8_size(line + "\n")


def test_no_lines_no_writes():
    assert cut_writes([]) == []


class Writes(io.StringIO):
    """A file that records what each flush pushed out: one entry per write the batcher made."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []
        self._mark = 0

    def flush(self):
        value = self.getvalue()
        self.flushed.append(value[self._mark:])
        self._mark = len(value)


@settings(max_examples=30)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=30))
def test_a_loop_turn_of_json_lines_goes_out_in_writes_within_pipe_buf(sizes):
    file = Writes()
    batcher = LineBatcher(file)
    lines = [json.dumps({"event": "request", "pad": "p" * size}) for size in sizes]

    async def log_one_turn():
        for line in lines:
            batcher.msg(line)
        await asyncio.sleep(0)  # the flush runs on the next turn

    asyncio.run(log_one_turn())
    assert file.flushed == cut_writes(lines)
    assert all(len(write.encode()) <= PIPE_BUF and write.endswith("\n") for write in file.flushed)
    assert [json.loads(line) for write in file.flushed for line in write.splitlines()] == [json.loads(line) for line in lines]
