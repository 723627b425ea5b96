"""ELIZA (Weizenbaum 1966): the lineage's rule-based rung — keywords, decomposition, reassembly.

For each input: split into clauses at punctuation and "but", keep the first clause holding a
keyword, rewrite words by the script's PRE table, then try the keywords present from the highest
rank down (ties: first in the sentence). A keyword's rules are decomposition patterns; the first one
that matches picks the rule's next reassembly (each rule cycles through its replies), whose (n)
slots are filled with the captured words after pronoun reflection ("my job" -> "your job").
Nothing matched: a remembered reply if any (the MEMORY mechanism), else a generic one.

No seed: every cycle starts at its first reply, as in the original, so a conversation is fully
determined by its inputs. An integer seed starts each cycle at a seeded random reply instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from lmlab.models.eliza import script as S

_CLAUSE = re.compile(r"[.,;!?]+|\bbut\b")
_SLOT = re.compile(r"\((\d+)\)")


def _words(text: str) -> list[str]:
    out: list[str] = []
    for w in re.findall(r"[a-z0-9']+", text.lower()):
        out += S.PRE.get(w.strip("'"), w.strip("'")).split()
    return out


def match(pattern: list[str], words: list[str]) -> list[list[str]] | None:
    """Captures of `pattern` (words, `*` for any run, `@class` for one word of a class) against
    `words`, or None. Backtracking is fine: patterns and sentences are short."""
    if not pattern:
        return [] if not words else None
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        for n in range(len(words) + 1):
            tail = match(rest, words[n:])
            if tail is not None:
                return [words[:n]] + tail
        return None
    if not words:
        return None
    if head.startswith("@"):
        if words[0] not in S.SYNONYMS[head[1:]]:
            return None
        tail = match(rest, words[1:])
        return None if tail is None else [[words[0]]] + tail
    return match(rest, words[1:]) if words[0] == head else None


def reflect(words: list[str]) -> str:
    """Swap first and second person: "i need my mother" -> "you need your mother"."""
    out = []
    for i, w in enumerate(words):
        if w == "you":  # subject "I" at the start or after a conjunction, object "me" elsewhere
            out.append("I" if i == 0 or words[i - 1] in ("and", "that", "because", "if") else "me")
        else:
            out.append(S.REFLECT.get(w, w))
    return " ".join(out)


def _keywords(words: list[str]) -> list[str]:
    """Keywords present in `words`, best first: higher rank, then earlier in the sentence."""
    found: dict[str, int] = {}
    for pos, w in enumerate(words):
        for key in (w, *[c for c, members in S.SYNONYMS.items() if w in members]):
            if key in S.KEYWORDS and key not in found:
                found[key] = pos
    return sorted(found, key=lambda k: (-S.KEYWORDS[k][0], found[k]))


class Eliza:
    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed) if seed is not None else None
        self.cursor: dict[tuple[str, int], int] = {}
        self.memory: list[str] = []
        self.generic = 0

    def _next_reply(self, key: str, rule: int, replies: list[str]) -> str:
        at = self.cursor.get((key, rule))
        if at is None:
            at = self.rng.randrange(len(replies)) if self.rng else 0
        self.cursor[(key, rule)] = at + 1
        return replies[at % len(replies)]

    def _apply(self, key: str, words: list[str], depth: int = 0) -> str | None:
        for r, (pattern, replies) in enumerate(S.KEYWORDS[key][1]):
            remember = pattern.startswith("$")
            caps = match(pattern.lstrip("$ ").split(), words)
            if caps is None:
                continue
            reply = self._next_reply(key, r, replies)
            if reply.startswith("goto "):
                if depth < 3:
                    return self._apply(reply[5:], words, depth + 1)
                continue
            slots = [int(n) for n in _SLOT.findall(reply)]
            if any(n > len(caps) or not caps[n - 1] for n in slots):
                continue  # a slot would be empty: "Why do you think you are ?"
            text = _SLOT.sub(lambda m, caps=caps: reflect(caps[int(m.group(1)) - 1]), reply)
            if remember:
                self.memory.append(text)
                continue
            return text
        return None

    def respond(self, text: str) -> str:
        words = _words(text)
        if any(w in S.QUIT for w in words[:1]):
            return S.GOODBYE
        clauses = [_words(c) for c in _CLAUSE.split(text.lower())]
        clause = next((c for c in clauses if _keywords(c)), words)
        for key in _keywords(clause):
            reply = self._apply(key, clause)
            if reply is not None:
                return reply[0].upper() + reply[1:]
        if self.memory:
            return self.memory.pop(0)
        self.generic += 1
        return S.NONE[(self.generic - 1) % len(S.NONE)]


class ElizaSession:
    """`lmlab chat eliza`: ChatSession's interface (`reply` streams the answer)."""

    greeting = S.GREETING

    def __init__(self, seed: int | None = None):
        self.eliza = Eliza(seed)

    def reply(self, user: str, cfg: object = None) -> Iterator[str]:
        yield self.eliza.respond(user)
