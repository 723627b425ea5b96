"""Tasks read from a `questions-words.txt`-format file (Mikolov et al. 2013's analogy test set).

The format: section lines `: capital-common-countries`, then lines of four words `a b c d` meaning
a : b :: c : d. gensim ships the file as `gensim/test/test_data/questions-words.txt`; it is found
there when gensim is installed (found, never imported), else pass its path as `words_file`.

- `analogy`: "Athens is to Greece as Baghdad is to" -> " Iraq", multiple choice among the right word
  and three others that end analogies of the same section.
- `capitals`: "The capital of Greece is" -> " Athens", multiple choice among four capitals (from the
  two capital-* sections); an easy task, so small models' curves start above the floor.
- `words()`: the file's lower-case words, the vocabulary of the scrambling tasks (scramble.py).
- `capital_of`, `currency_of`, `nationality_of`, `plural_of`, `comparative_of` (the `words` instruction
  family of SFT, eval/tasks/instructions.py), and `female_of`, `adverb_of`, `opposite_of`, `superlative_of`,
  `participle_of`, `past_tense_of`, `third_person_of` (the rest of the file's relations): generation,
  "Q: What is the capital of Greece?\n\nA:" -> " Athens", each key of the file asked once, split by the
  seed into demonstrations, a validation part and the test items (`QUESTIONS`, `word_question`).
"""

from __future__ import annotations

import importlib.util
import random
from functools import lru_cache
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.eval.tasks import Item, Task, register, split_pool

POOL = 100
N_CHOICES = 4


def default_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "test" / "test_data" / "questions-words.txt"
            if path.is_file():
                return path
    raise LmlabError("the analogy, capitals and scrambling tasks need a questions-words.txt file: "
                     "`pip install gensim` (which ships one) or pass its path (--words_file)")


@lru_cache(maxsize=4)
def read_sections(path: str | Path | None = None) -> dict[str, list[tuple[str, str, str, str]]]:
    path = Path(path) if path else default_file()
    if not path.is_file():
        raise LmlabError(f"words file not found: {path}")
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
            continue
        parts = line.split()
        if not parts:
            continue
        if current is None or len(parts) != 4:
            raise LmlabError(f"{path}, line {n}: expected four words after a ': section' line, got {line!r}")
        current.append(tuple(parts))  # type: ignore[arg-type]
    return sections


def words(path: str | Path | None = None, min_len: int = 4, max_len: int = 15) -> list[str]:
    """Distinct lower-case alphabetic words of the file, sorted (GPT-3 used words of 4-15 letters)."""
    found = {w for rows in read_sections(path).values() for row in rows for w in row}
    return sorted(w for w in found if w.isalpha() and w.islower() and min_len <= len(w) <= max_len)


def _choices(rng: random.Random, right: str, others: list[str], avoid: set[str]) -> tuple[tuple[str, ...], int]:
    distractors = rng.sample(sorted(set(others) - avoid - {right}), N_CHOICES - 1)
    gold = rng.randrange(N_CHOICES)
    return tuple(distractors[:gold] + [right] + distractors[gold:]), gold


@register("analogy")
def analogy(name: str, n_items: int, seed: int | str, words_file: str | None = None) -> Task:
    sections = {k: v for k, v in read_sections(words_file).items() if len({r[3] for r in v}) > N_CHOICES}
    names = sorted(sections)

    def make(rng: random.Random) -> Item:
        rows = sections[rng.choice(names)]
        a, b, c, d = rng.choice(rows)
        choices, gold = _choices(rng, d, [r[3] for r in rows], {a, b, c})
        return Item(context=f"{a} is to {b} as {c} is to", choices=choices, gold=gold)

    n_rows = len({r for rows in sections.values() for r in rows})
    n_pool = min(POOL, n_rows // 3)
    items, pool = split_pool(make, min(n_items, n_rows - n_pool), n_pool, seed)
    return Task(name=name, kind="multiple_choice", items=items, pool=pool, separator="\n")


@register("capitals")
def capitals(name: str, n_items: int, seed: int | str, words_file: str | None = None) -> Task:
    rows = [r for k, v in read_sections(words_file).items() if k.startswith("capital") for r in v]
    city_of = dict(sorted({(r[1], r[0]) for r in rows} | {(r[3], r[2]) for r in rows}))
    if len(city_of) < 3 * N_CHOICES:
        raise LmlabError("the words file has too few capital-* analogies for the capitals task")
    rng = random.Random(seed)
    countries = sorted(city_of)
    rng.shuffle(countries)
    # a third of the countries only ever appear as demonstrations; the test items cycle through the
    # rest (about 80 in Mikolov's file, so 200 items ask each about 2-3 times, with other distractors)
    n_pool = len(countries) // 3
    cities = sorted(set(city_of.values()))

    def item(country: str) -> Item:
        choices, gold = _choices(rng, city_of[country], cities, set())
        return Item(context=f"The capital of {country} is", choices=choices, gold=gold)

    pool = [item(c) for c in countries[:n_pool]]
    rest = countries[n_pool:]
    items = [item(rest[i % len(rest)]) for i in range(n_items)]
    return Task(name=name, kind="multiple_choice", items=items, pool=pool, separator="\n")


# Generation tasks asking for one word the file pairs with another (the `words` instruction family):
# name -> (section prefix, whether the section's rows are `answer key` rather than `key answer`, question).
QUESTIONS = {
    "capital_of": ("capital-", True, "What is the capital of {}?"),  # rows: Athens Greece
    "currency_of": ("currency", False, "What is the currency of {}?"),
    "nationality_of": ("gram6-nationality-adjective", False, "What is the adjective for people from {}?"),
    "plural_of": ("gram8-plural", False, "What is the plural of {}?"),
    "comparative_of": ("gram3-comparative", False, "What is the comparative form of {}?"),
    # the rest of the file's word relations (the `lexicon` family of SFT, trained only, never evaluated)
    "female_of": ("family", False, "What is the female form of {}?"),
    "adverb_of": ("gram1-adjective-to-adverb", False, "What is the adverb formed from {}?"),
    "opposite_of": ("gram2-opposite", False, "What is the opposite of {}?"),
    "superlative_of": ("gram4-superlative", False, "What is the superlative form of {}?"),
    "participle_of": ("gram5-present-participle", False, "What is the present participle of {}?"),
    "past_tense_of": ("gram7-past-tense", False, "What is the past tense of {}?"),
    "third_person_of": ("gram9-plural-verbs", False, "What is the third-person singular of {}?"),
}
QUESTION_POOL = 8         # demonstrations per task (a 5-shot prompt draws five of them)
VALIDATION_SHARE = 0.25   # of the questions outside the pool: the validation part; the rest are test items


def word_pairs(name: str, words_file: str | Path | None = None) -> dict[str, str]:
    """key -> answer for a `QUESTIONS` task, from every section whose name starts with its prefix."""
    prefix, swapped, _ = QUESTIONS[name]
    out: dict[str, str] = {}
    for section, rows in sorted(read_sections(words_file).items()):
        if not section.startswith(prefix):
            continue
        for row in rows:
            for a, b in (row[:2], row[2:]):
                key, answer = (b, a) if swapped else (a, b)
                if out.setdefault(key, answer) != answer:
                    raise LmlabError(f"{name}: '{key}' has two answers in the words file ({out[key]}, {answer})")
    return out


@register(*QUESTIONS)
def word_question(name: str, n_items: int, seed: int | str, words_file: str | None = None,
                  split: str = "test") -> Task:
    """"Q: What is the capital of Greece?\\n\\nA:" -> " Athens", one question per key of the file, none twice.

    The keys are shuffled by the seed into three disjoint parts: `QUESTION_POOL` demonstrations, a
    validation part (`VALIDATION_SHARE` of the rest) and the test part. `split="test"` gives the first
    `n_items` test questions, `split="validation"` the first `n_items` validation questions (both with
    the same pool); there are at most as many items as the part has questions (no repeats)."""
    if split not in ("test", "validation"):
        raise LmlabError(f"{name}: split must be 'test' or 'validation', not '{split}'")
    pairs = word_pairs(name, words_file)
    question = QUESTIONS[name][2]
    keys = sorted(pairs)
    if len(keys) < QUESTION_POOL + 2:
        raise LmlabError(f"{name}: the words file has only {len(keys)} questions for this task")
    random.Random(seed).shuffle(keys)
    pool_keys, rest = keys[:QUESTION_POOL], keys[QUESTION_POOL:]
    n_val = max(1, round(len(rest) * VALIDATION_SHARE))
    chosen = rest[:n_val] if split == "validation" else rest[n_val:]

    def item(key: str) -> Item:
        return Item(context=f"Q: {question.format(key)}\n\nA:", target=pairs[key])

    return Task(name=name, kind="generation", items=[item(k) for k in chosen[:n_items]],
                pool=[item(k) for k in pool_keys], separator="\n\n", stop=("\n",), max_new_tokens=10)
