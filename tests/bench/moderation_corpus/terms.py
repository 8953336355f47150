"""The block list the quality benchmark moderates with, and the leetspeak list.

Chosen to set traps in the clean corpus: English words that contain a term
(Scunthorpe), Russian words spelt only with letters that look Latin ("сор"
reads "cop"), German words with "ß" ("Maß" folded to "mass"), room and
flight numbers that leetspeak would read as a term ("455" is "ass"), and
identifiers in code that contain a term ("kill_process").
"""

BLOCKED = [
    "kill", "bomb", "hack", "sex", "cocaine", "heroin", "terror", "ass", "shit", "porn", "nazi",
    "crap", "cop", "mass", "weed", "meth", "bitch", "launch codes", "credit dump", "zero day",
    "炸弹", "毒品", "恐怖袭击", "爆弾", "麻薬", "бомба", "наркотики", "теракт",
]  # fmt: skip

LEET = ["ass", "lol", "toss", "hate", "kill", "noob"]
