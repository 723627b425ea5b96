"""Chat templates: the Jinja2 program a model ships (GGUF `tokenizer.chat_template`, or
`tokenizer_config.json`'s `chat_template`) that turns a list of messages into the prompt text.

A template comes with a downloaded file, so it is untrusted code: it runs in Jinja's
`ImmutableSandboxedEnvironment`, which refuses attribute access to internals (`__class__`, ...) and
calls that mutate lists/dicts. The environment follows the conventions templates are written for
(Hugging Face `apply_chat_template`): `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `raise_exception(message)` global, and `tojson` without HTML escaping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmlab.errors import LmlabError


def _raise(message: str) -> None:
    raise LmlabError(f"chat template: {message}")


def _tojson(x: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(x, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=8)
def _compile(source: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LmlabError("chat templates need the `jinja2` package: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmlabError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        if not source:
            raise LmlabError("this model ships no chat template")
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = _compile(source)

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]); with
        `add_generation_prompt` it ends where the assistant's reply begins."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise LmlabError(f"chat message {i} must be a dict with 'role' and 'content'")
        import jinja2
        from jinja2.sandbox import SecurityError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except SecurityError as e:
            raise LmlabError(f"chat template tried something the sandbox forbids: {e}") from None
        except jinja2.TemplateError as e:
            raise LmlabError(f"chat template failed: {e}") from None


def chat_template_for(tokenizer: Any) -> ChatTemplate:
    """The chat template a tokenizer carries (`tokenizer.chat_template`), with its bos/eos tokens."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise LmlabError("this model's tokenizer has no chat template")
    sp = tokenizer.specials
    return ChatTemplate(source, bos_token=sp.bos, eos_token=sp.eos)
