"""Moderation quality and cost: disguise recall, false blocks, PII precision/recall, ms per KB.

Run from the repository root:

    python -m tests.bench.moderation_quality

To measure another copy of the engine (the one before a change, say), put
its ``proxy`` package first on the path; the corpus and this script come
from here:

    git archive <commit> proxy | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python tests/bench/moderation_quality.py

Prints, from the corpus in ``tests/bench/moderation_corpus``:

* recall on the disguise set, per class (a case counts when the blocked
  term is blocked), and the defensible misses (reported, not counted);
* false blocks on the clean multilingual corpus (English, Chinese,
  Japanese, Russian, German, French, Spanish, code), per language;
* PII precision and recall per entity (a value counts as found when the
  output no longer holds it and holds that entity's redaction);
* cost: CPU milliseconds per KB with a 10,000-term list and every PII rule,
  for whole texts and streamed at 4-character chunks, and CPU microseconds
  per chunk (best of ``--repeat`` timings, so other load shows less).
"""

from __future__ import annotations

import argparse
import collections
import random
import string
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # the corpus; ``proxy`` comes first from wherever the path says

from moderation_corpus import clean, disguises, pii, terms  # noqa: E402

from proxy.config import ModerationConfig  # noqa: E402
from proxy.moderation import ModerationEngine  # noqa: E402

ENTITIES = ("email", "phone", "credit_card", "ipv4", "iban", "secret")


def quality_engine() -> ModerationEngine:
    rules = [
        {"name": "blocked", "type": "terms", "terms": terms.BLOCKED, "action": "block"},
        {"name": "leet", "type": "terms", "terms": terms.LEET + disguises.LATIN_TERMS, "leetspeak": True,
         "action": "block"},
        {"name": "disguise", "type": "terms", "terms": disguises.LATIN_TERMS, "action": "block"},
    ]  # fmt: skip
    return ModerationEngine.from_config(ModerationConfig(rules=rules))


def pii_engine() -> ModerationEngine:
    rules = [{"name": e, "type": "pii", "entity": e, "action": "redact"} for e in ENTITIES]
    return ModerationEngine.from_config(ModerationConfig(redaction="[REDACTED:{rule}]", rules=rules))


def disguise_recall(engine: ModerationEngine) -> None:
    by_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, text in disguises.cases():
        by_class[name][1] += 1
        if engine.moderate(text, "output").blocked is not None:
            by_class[name][0] += 1
    caught = sum(c for c, _ in by_class.values())
    total = sum(n for _, n in by_class.values())
    classes_caught = sum(1 for c, n in by_class.values() if c == n)
    print(f"disguise recall: {caught}/{total} cases ({caught / total:.1%}); "
          f"{classes_caught}/{len(by_class)} classes caught in every case")  # fmt: skip
    for name, (c, n) in by_class.items():
        print(f"  {'ok  ' if c == n else 'MISS'} {name}: {c}/{n}")
    missed = collections.Counter(name for name, text in disguises.misses() if engine.moderate(text, "output").blocked is None)
    print("  defensible misses (not counted): " + ", ".join(f"{name} {missed[name]}/{len(disguises.LATIN_TERMS)} missed" for name in disguises.MISSES))


def false_blocks(engine: ModerationEngine) -> None:
    cases = clean.cases()
    by_language: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    examples = []
    for language, text in cases:
        by_language[language][1] += 1
        result = engine.moderate(text, "output")
        if result.blocked is not None:
            by_language[language][0] += 1
            examples.append(f"{language}: {text[:60]!r} ({result.blocked.rule})")
    blocked = sum(b for b, _ in by_language.values())
    print(f"false blocks on the clean corpus: {blocked}/{len(cases)}")
    print("  " + ", ".join(f"{lang} {b}/{n}" for lang, (b, n) in by_language.items()))
    for example in examples[:12]:
        print(f"    {example}")


def pii_scores(engine: ModerationEngine) -> None:
    tp: collections.Counter[str] = collections.Counter()
    fn: collections.Counter[str] = collections.Counter()
    fp: collections.Counter[str] = collections.Counter()
    misses = []
    for text, items in pii.CASES:
        output = engine.moderate(text, "output").text
        found: collections.Counter[str] = collections.Counter()
        for entity, value in items:
            if value not in output and f"[REDACTED:{entity}]" in output:
                tp[entity] += 1
                found[entity] += 1
            else:
                fn[entity] += 1
                misses.append(f"missed {entity}: {output[:70]!r}")
        for entity in ENTITIES:
            extra = output.count(f"[REDACTED:{entity}]") - found[entity]
            if extra > 0:
                fp[entity] += extra
                misses.append(f"false {entity}: {output[:70]!r}")
    print("PII precision / recall per entity:")
    for entity in ENTITIES:
        precision = tp[entity] / (tp[entity] + fp[entity]) if tp[entity] + fp[entity] else 1.0
        recall = tp[entity] / (tp[entity] + fn[entity]) if tp[entity] + fn[entity] else 1.0
        print(f"  {entity:12} precision {precision:6.1%} ({tp[entity]}/{tp[entity] + fp[entity]})   "
              f"recall {recall:6.1%} ({tp[entity]}/{tp[entity] + fn[entity]})")  # fmt: skip
    for miss in misses[:15]:
        print(f"    {miss}")


def cost_terms(count: int) -> list[str]:
    """``count`` deterministic made-up terms, every tenth a two-word phrase (as the suite's)."""
    rng = random.Random(1234)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 11)))
        if word in seen:
            continue
        seen.add(word)
        if len(out) % 10 == 9:
            word += " " + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
        out.append(word)
    return out


def cost(repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "terms.txt"
        path.write_text("\n".join(cost_terms(10_000)) + "\n", encoding="utf-8")
        rules = [{"name": f"pii-{e}", "type": "pii", "entity": e, "action": "redact"} for e in ENTITIES]
        rules.append({"name": "banned", "type": "terms", "terms_file": str(path), "action": "block"})
        engine = ModerationEngine.from_config(ModerationConfig(rules=rules))
    texts = {
        "clean multilingual corpus": "\n".join(text for _, text in clean.cases()),
        "English prose only": " ".join(text for language, text in clean.cases() if language == "en"),
        "PII cases": "\n".join(text for text, _ in pii.CASES),
    }
    print(f"cost: a 10,000-term list and all six PII rules; CPU time, best of {repeat}")
    for label, text in texts.items():
        kb = len(text.encode()) / 1024
        chunks = [text[i : i + 4] for i in range(0, len(text), 4)]

        def stream() -> None:
            window = engine.stream("output")
            for chunk in chunks:
                window.feed(chunk)
            window.finish()

        whole = _best(lambda: engine.moderate(text, "output"), repeat)
        streamed = _best(stream, repeat)
        print(f"  {label} ({kb:.1f} KB): whole {whole * 1000 / kb:.3f} ms/KB; 4-char chunks "
              f"{streamed * 1000 / kb:.3f} ms/KB = {streamed * 1e6 / len(chunks):.1f} us per chunk")  # fmt: skip


def _best(work, repeat: int) -> float:
    work()
    timings = []
    for _ in range(repeat):
        started = time.process_time()
        work()
        timings.append(time.process_time() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timings per cost figure (default 5)")
    parser.add_argument("--no-cost", action="store_true", help="only the quality figures")
    args = parser.parse_args()
    import proxy

    print(f"engine: {Path(proxy.__file__).parent}")
    engine = quality_engine()
    disguise_recall(engine)
    false_blocks(engine)
    pii_scores(pii_engine())
    if not args.no_cost:
        cost(args.repeat)


if __name__ == "__main__":
    main()
