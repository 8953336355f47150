"""Token counting with tiktoken, entirely offline.

The gateway charges quotas in tokens, so it must count exactly what OpenAI
counts, and it must never reach for the network to do so: tiktoken's own
``get_encoding`` downloads its vocabularies and caches them in a temp
directory, which a locked-down deployment has neither network nor writable
disk for. The vocabularies therefore ship in the package
(``proxy/encodings``) and are read straight from there, hash-checked, once
per process.

Everything here is pure (text in, integers out) and never raises on odd but
valid request shapes: the server validates types before it counts, and a
counting hiccup must not turn a good request into a 500.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"
DEFAULT_ENCODING = O200K_BASE

# The regexes and special tokens below are copied from tiktoken_ext.openai_public,
# which only exposes them inside functions that download the vocabulary.
_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

_CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@dataclass(frozen=True)
class _EncodingSpec:
    """What tiktoken needs besides the vocabulary file, and the packaged file's sha256."""

    pat_str: str
    special_tokens: dict[str, int]
    sha256: str | None = None


_KNOWN_ENCODINGS: dict[str, _EncodingSpec] = {
    CL100K_BASE: _EncodingSpec(
        _CL100K_PAT_STR,
        {_ENDOFTEXT: 100257, _FIM_PREFIX: 100258, _FIM_MIDDLE: 100259, _FIM_SUFFIX: 100260, _ENDOFPROMPT: 100276},
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    O200K_BASE: _EncodingSpec(
        _O200K_PAT_STR,
        {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# Special tokens given to a vocabulary from the encodings directory with a name of its own.
_ENCODING_SPECIAL_NAMES = tuple(_KNOWN_ENCODINGS[O200K_BASE].special_tokens)

# Model-name prefixes, checked in order: the o200k families come first because
# "gpt-4o" and "gpt-4.1" also start with the cl100k prefix "gpt-4".
_PREFIX_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("gpt-5", O200K_BASE),
    ("chatgpt-4o", O200K_BASE),
    ("o1", O200K_BASE),
    ("o3", O200K_BASE),
    ("o4", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),  # Azure spells it without the dot
    ("text-embedding-3-", CL100K_BASE),
    ("text-embedding-ada-002", CL100K_BASE),
)

# OpenAI's documented chat framing (the cookbook's num_tokens_from_messages).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# tiktoken's regex engine gives up (a Rust panic, not an exception) on a
# whitespace run of about a million characters, and a single huge piece costs
# superlinear time. Long texts are therefore counted in segments of about this
# many characters (half to twice as many), cut where a piece boundary is
# certain, so ordinary text counts exactly the same as in one go.
SEGMENT_CHARS = 100_000
# A space before a letter or digit: both encodings always start a piece at
# that space (it prefixes the word, or stands alone before digits), whatever
# comes before it.
_SAFE_CUT = re.compile(r" (?=[^\W_])")

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}
_loaded_from_user_files: set[str] = set()
_extra_dir: Path | None = None


class EncodingError(Exception):
    """A vocabulary file that is missing, corrupt or fails its hash check."""


def _parse_tiktoken_file(data: bytes, source: str) -> dict[bytes, int]:
    """The ``.tiktoken`` format: one ``base64(token) rank`` pair per line.

    Parsed here rather than through ``tiktoken.load.load_tiktoken_bpe``, which
    copies every file it reads into a temp-dir cache keyed by path and, without
    a hash, would serve a stale copy after the file changed.
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise EncodingError(f"{source}: line {number} is not `base64-token rank`") from exc
    if not ranks:
        raise EncodingError(f"{source}: no tokens in the file")
    # tiktoken's Rust core panics (not raises) on these, so refuse them here.
    if len(set(ranks.values())) != len(ranks):
        raise EncodingError(f"{source}: two tokens share a rank")
    if min(ranks.values()) < 0 or max(ranks.values()) >= 2**32 - len(_ENCODING_SPECIAL_NAMES):
        raise EncodingError(f"{source}: a rank is out of range")
    return ranks


def _user_file(name: str) -> Path | None:
    # A name is a file name, never a path: "../x" must not escape the directory.
    if _extra_dir is None or not name or Path(name).name != name or name.startswith("."):
        return None
    path = _extra_dir / f"{name}.tiktoken"
    return path if path.is_file() else None


def _load(name: str) -> tuple[tiktoken.Encoding, bool]:
    """Build one encoding, and say whether it came from the encodings directory.

    A user file wins over the packaged encoding of the same name.
    """
    user_path = _user_file(name)
    spec = _KNOWN_ENCODINGS.get(name)
    if user_path is not None:
        # Operators' own files carry no known hash; they are trusted as given.
        try:
            data = user_path.read_bytes()
        except OSError as exc:
            raise EncodingError(f"{user_path}: cannot be read: {exc.strerror or exc}") from exc
        ranks = _parse_tiktoken_file(data, str(user_path))
        if spec is None:
            # An unknown vocabulary gets o200k's splitting rules; its special
            # tokens sit just past its own ranks so no id can collide.
            first_free = max(ranks.values()) + 1
            special = {token: first_free + i for i, token in enumerate(_ENCODING_SPECIAL_NAMES)}
            spec = _EncodingSpec(_O200K_PAT_STR, special)
    elif spec is not None:
        packaged = resources.files("proxy") / "encodings" / f"{name}.tiktoken"
        try:
            data = packaged.read_bytes()
        except OSError as exc:
            raise EncodingError(f"the packaged encoding {name} cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != spec.sha256:
            raise EncodingError(f"the packaged encoding {name} fails its sha256 check")
        ranks = _parse_tiktoken_file(data, f"{name}.tiktoken")
    else:
        raise KeyError(f"unknown encoding {name!r}")
    encoding = tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)
    return encoding, user_path is not None


def get_encoding(name: str) -> tiktoken.Encoding:
    """The encoding called ``name``, loaded on first use and kept for the process.

    Raises ``KeyError`` for a name that is neither packaged nor in the
    encodings directory, and ``EncodingError`` for a broken file.
    """
    encoding = _loaded.get(name)
    if encoding is not None:
        return encoding
    with _lock:
        # Another thread (say, preload in an executor) may have won the race.
        encoding = _loaded.get(name)
        if encoding is None:
            encoding, from_user_file = _load(name)
            _loaded[name] = encoding
            if from_user_file:
                _loaded_from_user_files.add(name)
        return encoding


def set_encodings_dir(path: str | Path | None) -> None:
    """Use ``path``'s ``NAME.tiktoken`` files too (``None``: the packaged ones only).

    A file named like a packaged encoding replaces it. Encodings that came
    from the old directory or have a file in the new one are dropped, so the
    next count reads the files afresh (a config reload picks up edits); the
    packaged ones stay loaded, so a reload does not pay their load again.
    """
    global _extra_dir
    with _lock:
        _extra_dir = Path(path) if path is not None else None
        stale = {name for name in _loaded if name in _loaded_from_user_files or _user_file(name) is not None}
        for name in stale:
            del _loaded[name]
        _loaded_from_user_files.difference_update(stale)


def preload() -> None:
    """Load every packaged encoding now, so no request pays the ~1 s first load."""
    for name in _KNOWN_ENCODINGS:
        get_encoding(name)


@functools.lru_cache(maxsize=4096)
def encoding_name_for_model(model: str) -> str:
    """The encoding OpenAI uses for ``model``; o200k_base when the model is unknown.

    Fine-tuned names (``ft:gpt-4o-mini:org::id``) count like their base model.
    """
    if model.startswith("ft:"):
        model = model[3:].split(":", 1)[0]
    for prefix, name in _PREFIX_ENCODINGS:
        if model.startswith(prefix):
            return name
    return DEFAULT_ENCODING


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """The loaded encoding for ``model`` (see ``encoding_name_for_model``)."""
    return get_encoding(encoding_name_for_model(model))


def _count(encoding: tiktoken.Encoding, text: str) -> int:
    # encode_ordinary == encode(disallowed_special=()): "<|endoftext|>" in user
    # text is plain text, never a special token and never an error.
    if len(text) <= SEGMENT_CHARS:
        return len(encoding.encode_ordinary(text)) if text else 0
    total = 0
    start = 0
    while len(text) - start > SEGMENT_CHARS:
        # The first safe cut past half a segment; a hard cut (off by a token or
        # so) only where twice a segment holds no such space, which is no prose.
        end = start + 2 * SEGMENT_CHARS
        cut = _SAFE_CUT.search(text, start + SEGMENT_CHARS // 2, end)
        stop = cut.start() if cut else end
        total += len(encoding.encode_ordinary(text[start:stop]))
        start = stop
    return total + len(encoding.encode_ordinary(text[start:]))


def count_text(model: str, text: str) -> int:
    """Tokens in ``text`` as ``model`` sees it."""
    return _count(encoding_for_model(model), text)


def _content_text(content: Any) -> list[str]:
    """The text pieces of a message's content: a string, None, or a list of parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
    return []


def _function_text(function: Any) -> list[str]:
    """Name and arguments of a tool call's (or legacy ``function_call``'s) function."""
    if not isinstance(function, dict):
        return []
    return [value for value in (function.get("name"), function.get("arguments")) if isinstance(value, str)]


def _message_texts(message: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(message.get("role"), str):
        texts.append(message["role"])
    texts.extend(_content_text(message.get("content")))
    if isinstance(message.get("name"), str):
        texts.append(message["name"])
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if isinstance(call, dict):
                texts.extend(_function_text(call.get("function")))
    texts.extend(_function_text(message.get("function_call")))
    if isinstance(message.get("tool_call_id"), str):
        texts.append(message["tool_call_id"])
    return texts


def count_chat_prompt(model: str, messages: Any) -> int:
    """Prompt tokens of a chat request, with OpenAI's framing.

    Each message costs 3 tokens plus its role, content, name (+1), tool calls
    and tool_call_id; the reply's priming costs 3 more. Entries that are not
    objects are skipped rather than rejected: validation is the server's job.
    """
    encoding = encoding_for_model(model)
    total = REPLY_PRIMING_TOKENS
    if not isinstance(messages, list):
        return total
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        if isinstance(message.get("name"), str):
            total += TOKENS_PER_NAME
        for text in _message_texts(message):
            total += _count(encoding, text)
    return total


def count_prompt(model: str, prompt: Any) -> int:
    """Prompt tokens of a /v1/completions (or /v1/embeddings) input.

    Accepts every shape OpenAI does: a string, a list of strings, a list of
    token ids (each id is one token) or a list of such lists. Anything else
    counts as nothing.
    """
    encoding = encoding_for_model(model)
    if isinstance(prompt, str):
        return _count(encoding, prompt)
    if not isinstance(prompt, list):
        return 0
    total = 0
    for item in prompt:
        if isinstance(item, str):
            total += _count(encoding, item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += sum(1 for token in item if isinstance(token, int))
    return total
