"""User tasks as JSONL: one item per line, plus an optional first line of task settings.

    {"task": {"name": "colours", "separator": "\\n", "target_delimiter": " "}}
    {"context": "The sky is", "choices": ["blue", "green"], "gold": 0, "split": "train"}
    {"context": "Grass is", "choices": ["blue", "green"], "gold": 1}

An item with `choices` and `gold` is multiple choice; one with `target` is a generation item (the
stop strings are the task's `stop` setting, default a newline); a file holds one kind. Items with
`"split": "train"` are the demonstration pool; when there are none, a seeded third of the items is
set aside as the pool. Every problem is reported with the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.eval.tasks import Item, Task

SETTINGS = {"name": str, "kind": str, "separator": str, "target_delimiter": str, "stop": list,
            "max_new_tokens": int, "description": str}


def _item(row: object, where: str) -> tuple[Item, str, str]:
    """(item, kind, split) of one parsed line."""
    if not isinstance(row, dict):
        raise LmlabError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "context" not in row or not isinstance(row["context"], str):
        raise LmlabError(f"{where}: missing field 'context' (a string)")
    split = row.get("split", "test")
    if split not in ("train", "test"):
        raise LmlabError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
    if "choices" in row or "gold" in row:
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise LmlabError(f"{where}: missing field 'choices' (a list of at least two strings)")
        if gold is None:
            raise LmlabError(f"{where}: missing field 'gold' (the index of the right choice)")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise LmlabError(f"{where}: gold index {gold!r} out of range for {len(choices)} choices")
        return Item(context=row["context"], choices=tuple(choices), gold=gold), "multiple_choice", split
    if "target" not in row or not isinstance(row["target"], str):
        raise LmlabError(f"{where}: missing field 'target' (generation items) or 'choices' and 'gold' "
                         "(multiple-choice items)")
    return Item(context=row["context"], target=row["target"]), "generation", split


def load_jsonl_task(path: str | Path, *, n_items: int = 0, seed: int = 0) -> Task:
    """The task in a JSONL file; `n_items` > 0 keeps the first n test items."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"task file not found: {path}")
    settings: dict = {}
    test, pool, kind = [], [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "task" in row:
            if test or pool or settings:
                raise LmlabError(f"{where}: the task settings line must come first")
            settings = _settings(row["task"], where)
            continue
        item, k, split = _item(row, where)
        if kind is not None and k != kind:
            raise LmlabError(f"{where}: a {k.replace('_', ' ')} item in a file of {kind.replace('_', ' ')} items")
        kind = k
        (pool if split == "train" else test).append(item)
    if kind is None:
        raise LmlabError(f"{path}: no items")
    if settings.get("kind", kind) != kind:
        raise LmlabError(f"{path}: the settings say kind '{settings['kind']}' but the items are {kind}")
    if not pool:
        order = list(range(len(test)))
        random.Random(seed).shuffle(order)
        chosen = set(order[: len(test) // 3])
        pool = [it for i, it in enumerate(test) if i in chosen]
        test = [it for i, it in enumerate(test) if i not in chosen]
    if not test:
        raise LmlabError(f"{path}: no test items (every item has \"split\": \"train\")")
    settings.setdefault("name", path.stem)
    settings["kind"] = kind
    if "stop" in settings:
        settings["stop"] = tuple(settings["stop"])
    return Task(items=test[:n_items] if n_items > 0 else test, pool=pool, **settings)


def _settings(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise LmlabError(f"{where}: 'task' must be an object of settings")
    for key, value in raw.items():
        if key not in SETTINGS:
            raise LmlabError(f"{where}: unknown task setting '{key}' (known: {', '.join(SETTINGS)})")
        if not isinstance(value, SETTINGS[key]) or isinstance(value, bool):
            raise LmlabError(f"{where}: task setting '{key}' must be a {SETTINGS[key].__name__}")
    if raw.get("kind", "multiple_choice") not in ("multiple_choice", "generation"):
        raise LmlabError(f"{where}: kind must be 'multiple_choice' or 'generation'")
    return dict(raw)
