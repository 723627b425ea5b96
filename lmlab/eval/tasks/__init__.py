"""In-context evaluation tasks: items, a demonstration pool, and how a prompt is put together.

A task is scored one of two ways (as GPT-3 and lm-evaluation-harness do):

- multiple choice: `context` + `target_delimiter` + each of `choices`; the model picks the choice of
  highest log-likelihood (`acc`) or of highest log-likelihood per character (`acc_norm`);
- generation: greedy continuation of `context` until a stop string, compared with `target` by exact
  match (whitespace at either end ignored).

A k-shot prompt is k solved demonstrations from `pool` (never from `items`), each
`context + target_delimiter + answer`, joined by `separator`, then the test item's context.
Built-in tasks are seeded generators (`BUILTIN`); user tasks are JSONL files (tasks/jsonl.py).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmlab.errors import LmlabError

Kind = Literal["multiple_choice", "generation"]


@dataclass(frozen=True)
class Item:
    context: str
    target: str = ""                     # generation: the expected answer
    choices: tuple[str, ...] = ()        # multiple choice
    gold: int = 0                        # multiple choice: index of the right choice

    @property
    def answer(self) -> str:
        """What a solved demonstration shows after the context."""
        return self.choices[self.gold] if self.choices else self.target


@dataclass(kw_only=True)
class Task:
    name: str
    kind: Kind
    items: list[Item]                    # test items
    pool: list[Item]                     # demonstrations; disjoint from `items`
    separator: str = "\n\n"              # between demonstrations and before the test item
    target_delimiter: str = " "          # between a context and its answer (lm-eval's default)
    stop: tuple[str, ...] = ("\n",)      # generation stops at the first of these
    max_new_tokens: int = 16
    description: str = ""                # text before the first demonstration (a task instruction)


# name -> generator(name, n_items, seed, **options) -> Task; filled in by the modules imported below
BUILTIN: dict[str, Callable[..., Task]] = {}


def register(*names: str):
    def wrap(fn: Callable[..., Task]) -> Callable[..., Task]:
        for n in names:
            BUILTIN[n] = fn
        return fn
    return wrap


def load_task(spec: str, n_items: int, seed: int = 0, **options) -> Task:
    """A built-in task by name (`arithmetic_2d+`, ...), or a user task from a `.jsonl` file."""
    from lmlab.eval.tasks import arithmetic, scramble, sequences, words  # noqa: F401 (they register)

    if spec in BUILTIN:
        # each task its own stream, so 2D+ and 2D- do not ask about the same pairs of numbers
        make = BUILTIN[spec]
        accepted = inspect.signature(make).parameters
        kw = {k: v for k, v in options.items() if k in accepted and v is not None}
        return make(spec, n_items, f"{seed}/{spec}", **kw)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        from lmlab.eval.tasks.jsonl import load_jsonl_task

        return load_jsonl_task(spec, n_items=n_items, seed=seed)
    groups = ", ".join(sorted(GROUPS))
    raise LmlabError(f"unknown task '{spec}'. Built-in tasks: {', '.join(sorted(BUILTIN))}; groups: {groups}; "
                     "or give a .jsonl file")


# short names for families of tasks on the command line
GROUPS = {
    "arithmetic": [f"arithmetic_{t}" for t in ("2d+", "2d-", "3d+", "3d-", "4d+", "4d-", "5d+", "5d-", "2dx", "1dc")],
    "scramble": ["cycle_letters", "anagrams1", "anagrams2", "random_insertion", "reversed_words"],
    "analogy": ["analogy"],
    "easy": ["counting", "days", "months", "letters", "capitals"],
}


def expand(specs: list[str]) -> list[str]:
    """Task names with group names replaced by their members, in order, without repeats."""
    out: list[str] = []
    for s in specs:
        for name in GROUPS.get(s, [s]):
            if name not in out:
                out.append(name)
    return out


def split_pool(make: Callable[[random.Random], Item], n_items: int, n_pool: int, seed: int | str, *,
               key: Callable[[Item], str] = lambda it: it.context) -> tuple[list[Item], list[Item]]:
    """Draw `n_pool` demonstrations, then `n_items` test items, from one seeded stream, never the same
    `key` twice, so no test item appears as a demonstration. Asking for more items keeps the first
    ones (and the pool) unchanged."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Item] = []
    tries = 0
    while len(out) < n_pool + n_items:
        item = make(rng)
        tries += 1
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
        elif tries > 50 * (n_pool + n_items) + 1000:
            raise LmlabError(f"cannot draw {n_pool + n_items} distinct items for this task "
                             f"(found {len(out)}); ask for fewer --items")
    return out[n_pool:], out[:n_pool]


def split_finite(candidates: list[Item], n_items: int, seed: int | str,
                 pool_share: float = 1 / 3) -> tuple[list[Item], list[Item]]:
    """For tasks with few distinct questions: a seeded share of them is the demonstration pool, and the
    test items are drawn from the rest (with repeats once they run out)."""
    rng = random.Random(seed)
    order = list(candidates)
    rng.shuffle(order)
    n_pool = max(1, round(len(order) * pool_share))
    pool, rest = order[:n_pool], order[n_pool:]
    items = rest[:n_items] + [rng.choice(rest) for _ in range(n_items - len(rest))]
    return items, pool
