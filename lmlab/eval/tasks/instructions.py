"""Instruction pairs for SFT, generated offline from the few-shot tasks' own generators.

Each generation task's question becomes a chat conversation: a short system prompt, the user's turn
(an instruction for the task family, then the item's context as the few-shot prompts show it) and
the assistant's answer. The pairs are drawn from another seeded stream than the evaluation's and never
share an evaluation test item's question (nor, for the scrambling tasks, its word), so accuracy on the
test items after SFT is accuracy on held-out questions; a whole family can be left out of SFT too.

A turn may also carry k solved demonstrations before the question (`demos`), joined exactly as the
plain few-shot prompt joins them (harness.fewshot.build_prompt): the k-shot chat form. Training pairs
can mix 0-shot and k-shot turns (`shots`), their demonstrations drawn from the same task's other
training items, so no test question enters a training turn as a demonstration either.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lmlab.errors import LmlabError
from lmlab.eval.harness.fewshot import build_prompt
from lmlab.eval.tasks import Item, Task, load_task

SYSTEM = "Reply with the answer only."

# generation tasks by family, and the instruction each family's questions get in a chat turn
FAMILIES: dict[str, list[str]] = {
    "arithmetic": ["arithmetic_2d+", "arithmetic_2d-", "arithmetic_3d+", "arithmetic_2dx", "arithmetic_1dc"],
    "scramble": ["reversed_words", "cycle_letters", "anagrams1", "random_insertion"],
    "sequences": ["counting", "days", "months", "letters"],
    "words": ["capital_of", "currency_of", "nationality_of", "plural_of", "comparative_of"],
    # Two regroupings of the questions-words relations, for a held-out family whose answers are knowledge:
    # the words family's place questions, and every other relation of the file (its grammar questions and
    # the file's remaining sections; US city-in-state is left out, being place knowledge too)
    "geography": ["capital_of", "currency_of"],
    "lexicon": ["nationality_of", "plural_of", "comparative_of", "female_of", "adverb_of", "opposite_of",
                "superlative_of", "participle_of", "past_tense_of", "third_person_of"],
}
# every task a family's instruction covers: FAMILIES' own, and more that a recipe may add to training
MEMBERS: dict[str, list[str]] = {
    "arithmetic": FAMILIES["arithmetic"] + ["arithmetic_3d-", "arithmetic_4d+", "arithmetic_4d-"],
    "scramble": FAMILIES["scramble"] + ["anagrams2"],
    "sequences": FAMILIES["sequences"],
    "words": FAMILIES["words"],
    "geography": FAMILIES["geography"],
    "lexicon": FAMILIES["lexicon"],
}
INSTRUCTIONS = {
    "arithmetic": "Answer the question with a number.\n",
    "scramble": "",  # these tasks carry their own instruction (Task.description)
    "sequences": "Write the next item of this list.\n",
    "words": "Answer the question with one word.\n",
    "geography": "Answer the question with one word.\n",
    "lexicon": "Answer the question with one word.\n",
}
SCRAMBLE = set(FAMILIES["scramble"])


def family_of(task_name: str) -> str:
    """The first family listing the task (the regrouped ones come last and share the words instruction)."""
    for family, names in MEMBERS.items():
        if task_name in names:
            return family
    raise LmlabError(f"task '{task_name}' is in no instruction family ({', '.join(FAMILIES)})")


def conversation(task: Task, item: Item, with_answer: bool = True, demos: Sequence[Item] = ()) -> list[dict[str, str]]:
    """The chat form of a task item: system prompt, instruction + (demonstrations and) question, and (for
    training) the answer. With no demos the user turn is the instruction, the task's description, the question."""
    user = INSTRUCTIONS[family_of(task.name)] + build_prompt(task, item, list(demos))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return messages + [{"role": "assistant", "content": item.answer.strip()}] if with_answer else messages


def _key(task_name: str, item: Item) -> str:
    # a scrambled word's answer is the word itself: another scrambling of a test word would teach it
    return item.target if task_name in SCRAMBLE else item.context


def instruction_pairs(task_names: list[str], n_per_task: int, *, seed: int, held_out: dict[str, Task],
                      shots: Sequence[int] = (0,)) -> list[dict]:
    """Up to `n_per_task` conversations per task, from the task's generator seeded apart from the
    evaluation, with no question of `held_out[name]`'s test items; {"messages": [...], "task": name,
    "shots": k}. Each conversation shows k solved demonstrations, k drawn uniformly from `shots`, taken
    from the task's other training items."""
    if not shots or min(shots) < 0:
        raise LmlabError(f"instruction_pairs: shots must be non-negative counts, got {list(shots)}")
    out = []
    for name in task_names:
        if name not in held_out:
            raise LmlabError(f"instruction_pairs: no evaluation task given for '{name}' to keep its test items out")
        banned = {_key(name, it) for it in held_out[name].items}
        task = load_task(name, n_items=n_per_task * 2, seed=f"sft-{seed}")
        seen: set[str] = set()
        kept = []
        for it in task.pool + task.items:
            k = _key(name, it)
            if k not in banned and k not in seen:
                seen.add(k)
                kept.append(it)
        rng = random.Random(f"sft-{seed}/{name}/shots")
        for i, it in enumerate(kept[:n_per_task]):
            k = rng.choice(list(shots))
            others = kept[:i] + kept[i + 1:]
            if k > len(others):
                raise LmlabError(f"instruction_pairs: {k} demonstrations need more than {len(kept)} items of {name}")
            demos = rng.sample(others, k)
            out.append({"messages": conversation(task, it, demos=demos), "task": name, "shots": k})
    return out
