"""The OpenAI request schemas `lmlab serve` accepts, and the errors it answers in OpenAI's shape.

Policy (docs/serve/README.md lists the fields): a field the official clients send is accepted at its
default value (`frequency_penalty=0`, an empty `logit_bias`, `user`, ...); one we do not implement
given any other value is a 400 naming it, never silently ignored; a field OpenAI does not define is
a 400 too (`extra="forbid"`). Ranges follow OpenAI's API reference.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16          # choices per request
MAX_LOGPROBS = 20   # OpenAI's limit for logprobs / top_logprobs
MAX_STOP = 4        # stop sequences (OpenAI: "up to 4")


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_overloaded"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


Prob = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Tokens = Annotated[int, Field(ge=1)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Sampling(_Strict):
    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Prob | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None   # an extension (vLLM, llama.cpp): 0 = off
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted only at their default value (checked by `unsupported`)
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] \
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Tokens | None = 16       # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    return_tokens_as_token_ids: bool | None = False  # vLLM's extension: tokens as "token_id:N"


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    # accepted only at their default value
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = False
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None


# field -> a predicate that holds for the values we accept (the default and its equivalents)
_DEFAULT_ONLY = {
    "frequency_penalty": lambda v: not v,
    "presence_penalty": lambda v: not v,
    "logit_bias": lambda v: not v,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True,  # without tools it changes nothing
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none", "auto"),
    "store": lambda v: not v,
    "metadata": lambda v: True,             # stored nowhere, changes nothing
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
    "reasoning_effort": lambda v: v is None,
}


def unsupported(req: _Sampling) -> None:
    """A 400 naming the first field given a value we do not implement."""
    for name in req.model_fields_set:
        ok = _DEFAULT_ONLY.get(name)
        if ok is not None and not ok(getattr(req, name)):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve (only its default value)", param=name,
                           code="unsupported_parameter")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise ApiError(400, "'best_of' is not supported by lmlab serve (only best_of = n)", param="best_of",
                       code="unsupported_parameter")


_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def parse(model: type[_Strict], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        # keep field names and list indices; drop pydantic's union-member tags ('str', 'list[int]', 'StreamOptions')
        loc = [str(x) for x in err["loc"]
               if isinstance(x, int) or (re.fullmatch(r"[a-z_][a-z0-9_]*", x) and x not in _TAGS)]
        param = ".".join(loc) or None
        msg = err["msg"] if err["type"] != "extra_forbidden" else "unknown field (not part of the OpenAI API)"
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param, code=err["type"]) from None
    unsupported(req)
    return req
