"""GPT-3's synthetic arithmetic tasks (Brown et al. 2020, Sec. 3.9.1), regenerated from a seed.

n-digit addition / subtraction (nD+, nD-, n = 2..5) draw both operands uniformly from [0, 10^n), so
a difference may be negative; 2Dx multiplies two such 2-digit numbers; 1DC composes three one-digit
numbers with two of + - *, one pair in parentheses. The prompt is the paper's
"Q: What is 98 plus 45?\\n\\nA:" and the answer " 143" is generated and compared by exact match.
"""

from __future__ import annotations

import random

from lmlab.eval.tasks import Item, Task, register, split_pool

WORDS = {"+": "plus", "-": "minus", "x": "times"}
POOL = 100  # demonstrations drawn before the test items


def _question(text: str, answer: int) -> Item:
    return Item(context=f"Q: What is {text}?\n\nA:", target=str(answer))


def _binary(digits: int, op: str):
    def make(rng: random.Random) -> Item:
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return _question(f"{a} {WORDS[op]} {b}", value)
    return make


def _composite(rng: random.Random) -> Item:
    a, b, c = (rng.randrange(10) for _ in range(3))
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    text = f"({a} {op1} {b}) {op2} {c}" if rng.random() < 0.5 else f"{a} {op1} ({b} {op2} {c})"
    return _question(text, eval(text))  # noqa: S307 - our own digits and operators only


@register(*(f"arithmetic_{d}d{op}" for d in (2, 3, 4, 5) for op in "+-"), "arithmetic_2dx", "arithmetic_1dc")
def arithmetic(name: str, n_items: int, seed: int | str) -> Task:
    code = name.removeprefix("arithmetic_")
    make = _composite if code == "1dc" else _binary(int(code[0]), code[-1])
    items, pool = split_pool(make, n_items, POOL, seed)
    return Task(name=name, kind="generation", items=items, pool=pool, separator="\n\n", stop=("\n",),
                max_new_tokens=10)  # " -20999" is 7 tokens under digit-splitting tokenizers
