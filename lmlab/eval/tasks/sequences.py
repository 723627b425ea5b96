"""Easy sequence continuation: the next number, weekday, month or letter.

"1, 2, 3, 4," -> " 5"; "Monday, Tuesday," -> " Wednesday"; days and months wrap around. Small models
that have seen these lists in training text get some right, so their k-shot curves are not flat at
zero. There are few distinct questions (35 for days), so a third of them is the demonstration pool
and the test items are drawn from the rest, with repeats (tasks.split_finite).
"""

from __future__ import annotations

import string

from lmlab.eval.tasks import Item, Task, register, split_finite

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
LENGTHS = range(2, 7)  # how many members the prompt shows


def _cyclic(names: list[str]) -> list[Item]:
    return [Item(context=", ".join(names[(s + i) % len(names)] for i in range(n)) + ",",
                 target=names[(s + n) % len(names)])
            for s in range(len(names)) for n in LENGTHS]


def _linear(names: list[str]) -> list[Item]:
    return [Item(context=", ".join(names[s:s + n]) + ",", target=names[s + n])
            for s in range(len(names)) for n in LENGTHS if s + n < len(names)]


CANDIDATES = {
    "counting": lambda: _linear([str(i) for i in range(1, 101)]),
    "days": lambda: _cyclic(DAYS),
    "months": lambda: _cyclic(MONTHS),
    "letters": lambda: _linear(list(string.ascii_uppercase)) + _linear(list(string.ascii_lowercase)),
}


@register(*CANDIDATES)
def sequence(name: str, n_items: int, seed: int | str) -> Task:
    candidates = CANDIDATES[name]()
    items, pool = split_finite(candidates, n_items, seed)
    return Task(name=name, kind="generation", items=items, pool=pool, separator="\n", stop=(",", "\n"),
                max_new_tokens=12)  # " September" for a char-level model
