"""The stdlib docstring-package task (lmlab/data/docstring_task.py) for a language model, text in, text out.

Two forms of one question, both scored as multiple choice over the class names (the choice of highest
log-likelihood wins, so every answer is a valid class and accuracy compares with an encoder's):

- few-shot (`fewshot_task`): the harness's plain prompt (lmlab/eval/harness/fewshot.py), the question
  with the class names once at the top, then k solved `Docstring: ... / Package: NAME` demonstrations
  from the train split and the test item;
- chat (`conversation`, `chat_pairs`): the question as one user turn under a short system prompt, the
  class name as the assistant's reply. SFT trains on exactly these conversations (train split), and the
  zero-shot chat score of the base model and of the fine-tuned one reads the same rendering: context =
  every untrained token of `lmlab.data.chat.encode_chat`, continuation = the trained ones (the name and
  the end-of-turn marker), so the score is what SFT optimised.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.data.chat import encode_chat
from lmlab.data.docstring_task import LabelledText
from lmlab.eval.tasks import Item, Task

SYSTEM = "Reply with the package name only."


def question(labels: Sequence[str]) -> str:
    return (f"Which package of Python's standard library is this docstring from: {', '.join(labels[:-1])} or "
            f"{labels[-1]}? (Package names in the text are replaced by ___.)")


def fewshot_task(items: Sequence[LabelledText], *, test_split: str = "test", pool_split: str = "train",
                 name: str = "stdlib_package") -> Task:
    """A multiple-choice Task: test items from `test_split`, demonstrations from `pool_split`."""
    labels = sorted({it.label for it in items})

    def item(it: LabelledText) -> Item:
        return Item(context=f"Docstring: {it.text}\nPackage:", choices=tuple(labels), gold=labels.index(it.label))

    return Task(name=name, kind="multiple_choice", items=[item(it) for it in items if it.split == test_split],
                pool=[item(it) for it in items if it.split == pool_split], description=question(labels) + "\n\n",
                separator="\n\n", target_delimiter=" ")


def conversation(item: LabelledText, labels: Sequence[str], answer: str | None = None) -> list[dict[str, str]]:
    """System prompt, the question with the docstring, and the reply (`answer`, default the gold label)."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{question(labels)}\n\n{item.text}"},
            {"role": "assistant", "content": answer if answer is not None else item.label}]


def chat_pairs(template, tokenizer, bos: Sequence[int], item: LabelledText,
               labels: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids of every label as the reply to `item`'s question, for
    `TorchLM.loglikelihood_tokens`: the continuation is what SFT trains on that conversation."""
    out = []
    for label in labels:
        ids, trained = encode_chat(template, tokenizer, conversation(item, labels, label), bos)
        first = trained.index(True)
        assert all(trained[first:]), "the reply is the conversation's last and only trained turn"
        out.append((ids[:first], ids[first:]))
    return out
