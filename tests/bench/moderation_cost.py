"""Streaming moderation cost per KB, timed and counted, for this engine or another copy of it.

Run as a file (not with ``-m``), so that ``PYTHONPATH`` can put another copy's
``proxy`` package first; the corpus and this script come from here:

    python tests/bench/moderation_cost.py                          # timed, this tree's engine
    PYTHONPATH=/work/wt-base python tests/bench/moderation_cost.py # timed, another tree's
    python tests/bench/moderation_cost.py --callgrind              # instructions per KB

The rules are ``moderation_quality``'s cost rules: a 10,000-term block list
and all six PII rules redacting. The texts: the clean multilingual corpus,
its English prose, and the PII cases (every entity, dense). Each is streamed
through one window at ``--chunk``-character chunks.

``--callgrind`` runs this script under valgrind's callgrind twice per text,
once streaming it ``--rounds`` times and once not at all (the same start-up:
imports, compiling the rules and one stream to warm the caches, with
``PYTHONHASHSEED=0``), and divides the
difference of their instruction counts by the KB streamed. The count barely
moves from run to run, whatever else the machine is doing; the time does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # the corpus; ``proxy`` comes first from wherever the path says

from moderation_corpus import clean, pii  # noqa: E402
from moderation_quality import ENTITIES, cost_terms  # noqa: E402

TEXTS = {
    "clean": lambda: "\n".join(text for _, text in clean.cases()),
    "prose": lambda: " ".join(text for language, text in clean.cases() if language == "en"),
    "pii": lambda: "\n".join(text for text, _ in pii.CASES),
}


def build_engine():
    from proxy.config import ModerationConfig
    from proxy.moderation import ModerationEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "terms.txt"
        path.write_text("\n".join(cost_terms(10_000)) + "\n", encoding="utf-8")
        rules = [{"name": f"pii-{e}", "type": "pii", "entity": e, "action": "redact"} for e in ENTITIES]
        rules.append({"name": "banned", "type": "terms", "terms_file": str(path), "action": "block"})
        return ModerationEngine.from_config(ModerationConfig(rules=rules))


def stream(engine, chunks: list[str]) -> None:
    window = engine.stream("output")
    for chunk in chunks:
        window.feed(chunk)
    window.finish()


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def timed(args: argparse.Namespace) -> None:
    import proxy

    engine = build_engine()
    print(f"engine: {Path(proxy.__file__).parent}; {args.chunk}-char chunks; CPU ms per KB, best of {args.repeat}")
    for name in args.texts:
        text = TEXTS[name]()
        chunks = chunked(text, args.chunk)
        kb = len(text.encode()) / 1024
        stream(engine, chunks)
        best = float("inf")
        for _ in range(args.repeat):
            started = time.process_time()
            stream(engine, chunks)
            best = min(best, time.process_time() - started)
        print(f"  {name:6} ({kb:5.1f} KB): {best * 1000 / kb:.3f} ms/KB")


def instructions(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, *argv],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no totals")


def counted(args: argparse.Namespace) -> None:
    import proxy

    print(f"engine: {Path(proxy.__file__).parent}; {args.chunk}-char chunks; instructions per KB ({args.rounds} rounds)")
    for name in args.texts:
        kb = len(TEXTS[name]().encode()) / 1024
        common = ["--texts", name, "--chunk", str(args.chunk)]
        idle = instructions([*common, "--run", "0"])
        busy = instructions([*common, "--run", str(args.rounds)])
        print(f"  {name:6} ({kb:5.1f} KB): {(busy - idle) / args.rounds / kb / 1e6:.3f} M instructions/KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=lambda s: s.split(","), default=list(TEXTS), help="clean,prose,pii")
    parser.add_argument("--chunk", type=int, default=4, help="characters per chunk (default 4)")
    parser.add_argument("--repeat", type=int, default=20, help="timings per figure (default 20)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead of timing")
    parser.add_argument("--rounds", type=int, default=5, help="streams per count (default 5)")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)  # the child under callgrind
    args = parser.parse_args()
    if args.run is not None:
        engine = build_engine()
        chunks = chunked(TEXTS[args.texts[0]](), args.chunk)
        for _ in range(1 + args.run):  # one to warm the caches, in both children alike
            stream(engine, chunks)
    elif args.callgrind:
        counted(args)
    else:
        timed(args)


if __name__ == "__main__":
    main()
