"""GPT-3's word scrambling and manipulation tasks (Brown et al. 2020, Sec. 3.9.2), from a seed.

Each shows a garbled word and asks for the word back:
- cycle letters (CL): the letters rotated, "lyinevitab" -> "inevitably";
- anagrams 1 (A1): all but the first and last letters shuffled, "criroptuon" -> "corruption";
- anagrams 2 (A2): all but the first two and last two shuffled, "opoepnnt" -> "opponent";
- random insertion (RI): a punctuation mark or space between every two letters,
  "s.u!c/c!e.s s i/o/n" -> "succession";
- reversed words (RW): "stcejbo" -> "objects".
The prompt follows the paper's "Please unscramble the letters into a word, and write that word:"
instruction, given once before the demonstrations; each item is "{garbled} =" -> " {word}".
Words are the 4-15 letter lower-case words of the questions-words file (words.py), each used once
per task, so a test word is never a demonstration.
"""

from __future__ import annotations

import random

from lmlab.eval.tasks import Item, Task, register, split_pool
from lmlab.eval.tasks.words import words

POOL = 100
INSTRUCTION = "Please unscramble the letters into a word, and write that word:\n"
INSERTED = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ "   # string.punctuation and a space


def cycle_letters(word: str, rng: random.Random) -> str:
    k = rng.randrange(1, len(word))
    return word[k:] + word[:k]


def _shuffle_middle(word: str, keep: int, rng: random.Random) -> str:
    mid = list(word[keep:-keep])
    for _ in range(10):  # a different order where the letters allow one
        rng.shuffle(mid)
        if "".join(mid) != word[keep:-keep]:
            break
    return word[:keep] + "".join(mid) + word[-keep:]


def anagram1(word: str, rng: random.Random) -> str:
    return _shuffle_middle(word, 1, rng)


def anagram2(word: str, rng: random.Random) -> str:
    return _shuffle_middle(word, 2, rng)


def random_insertion(word: str, rng: random.Random) -> str:
    return "".join(c + rng.choice(INSERTED) for c in word[:-1]) + word[-1]


def reversed_word(word: str, rng: random.Random) -> str:
    return word[::-1]


GARBLE = {"cycle_letters": cycle_letters, "anagrams1": anagram1, "anagrams2": anagram2,
          "random_insertion": random_insertion, "reversed_words": reversed_word}


@register(*GARBLE)
def scramble(name: str, n_items: int, seed: int | str, words_file: str | None = None) -> Task:
    garble = GARBLE[name]
    # A2 keeps four letters in place, so it needs words of at least six to scramble anything
    vocab = [w for w in words(words_file) if len(w) >= (6 if name == "anagrams2" else 4)]

    def make(rng: random.Random) -> Item:
        word = rng.choice(vocab)
        return Item(context=f"{garble(word, rng)} =", target=word)

    n_pool = min(POOL, len(vocab) // 3)
    items, pool = split_pool(make, min(n_items, len(vocab) - n_pool), n_pool, seed, key=lambda it: it.target)
    return Task(name=name, kind="generation", items=items, pool=pool, separator="\n", description=INSTRUCTION,
                stop=("\n",), max_new_tokens=16)  # a 15-letter word, one character per token
