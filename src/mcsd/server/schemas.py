"""Request bodies of the OpenAI-compatible endpoints, and their translation into a ``SpecConfig``.

Validation has two layers, both answering 400 with an OpenAI-style error naming the field:
1. shape and types (pydantic, strict: ``"5"`` is not an integer, unknown fields are refused);
2. values, with the same rules as the command line: the request's sampling and ``mcsd``
   overrides are merged into the server's default ``SpecConfig`` and built through
   ``SamplingConfig`` / ``TokenTree`` / ``SpecConfig``, whose errors (``mcsd.errors.ParamError``)
   name the parameter in the message and carry it as data (``error.param``): ``param_error``
   turns one into a 400 whose ``param`` is the request's field.

The ``mcsd`` extension object overrides the server's speculation settings for one request::

    {"mcsd": {"tree": "4,2,2", "rule": "mcss-wor", "draft_temperature": 0.7}}

``tree`` takes a k-config (``"4,2,2"`` or ``[4, 2, 2]``), ``"dynamic:BUDGET[:WIDTH[:DEPTH]]"``,
``"none"`` (the target alone) or a list of paths
(``[[0], [1], [0, 0]]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mcsd.config import NO_SPECULATION, SamplingConfig, SpecConfig, parse_tree
from mcsd.errors import ParamError
from mcsd.server.defaults import ServeLimits
from mcsd.verify.rules import get_rule


class APIError(Exception):
    """An error the client can see: rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param)


# A SpecConfig / SamplingConfig field -> the request field that sets it (the rest are the same)
REQUEST_FIELDS = {
    "stop_strings": "stop",
    "max_new_tokens": "max_tokens",
    "rule": "mcsd.rule",
    "tree": "mcsd.tree",
    "draft": "mcsd.draft_temperature",
}


def param_error(error: ValueError, *, fields: dict[str, str] | None = None) -> APIError:
    """A 400 for a configuration error; ``param`` is the request field its ``ParamError`` names
    (``fields`` first, then ``REQUEST_FIELDS``), ``None`` for a plain ``ValueError``."""
    param = error.param if isinstance(error, ParamError) else None
    if param is not None:
        param = (fields or {}).get(param) or REQUEST_FIELDS.get(param, param)
    return invalid(str(error), param)


class _Strict(BaseModel):
    # strict: JSON types are taken as they are (no "5" -> 5, no 1.5 -> int); unknown fields refused
    model_config = ConfigDict(extra="forbid", strict=True)


class McsdOptions(_Strict):
    """The ``mcsd`` extension: per-request speculation settings (None = the server's)."""

    tree: str | list[int] | list[list[int]] | None = None
    rule: str | None = None
    draft_temperature: float | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


# OpenAI fields mcsd does not implement, accepted only at the value that changes nothing, so a
# client that always sends them (with defaults) keeps working; anything else is a clear 400.
_NEUTRAL = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


class _Generation(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI; vLLM accepts it at the top level too
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # accepted and ignored
    return_token_ids: bool = False  # vLLM's extension: each choice also carries its token ids
    mcsd: McsdOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    def check(self) -> None:
        """Value rules pydantic's types cannot say; raises a 400 ``APIError``."""
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and value not in neutral:
                raise invalid(
                    f"{name}={value!r} is not supported by mcsd (it supports n=1 and no "
                    "penalties, logprobs, logit_bias, best_of, echo or suffix)",
                    name,
                )
        if self.n != 1:
            raise invalid(
                f"n must be 1 (mcsd returns one choice per request; send n requests for n "
                f"samples), got {self.n}",
                "n",
            )
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed with stream=true", "stream_options")

    @property
    def new_tokens_limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Messages may carry fields that do not matter to a plain text model (name, refusal, ...).
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    @property
    def new_tokens_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


def parse_request(model: type[_Generation], body: object) -> _Generation:
    """Validate a decoded JSON body; every failure becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise _from_validation_error(error) from None
    request.check()
    return request


def _from_validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    message = str(first.get("msg", "invalid value"))
    kind = first.get("type")
    param = _param_name(first.get("loc", ()))
    if kind == "missing":
        return invalid(f"{param} is required", param)
    if kind == "extra_forbidden":
        return invalid(f"unknown field {param!r}", param)
    return invalid(f"{param}: {message}", param)


def _param_name(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"``: drop union tags."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
        else:
            break
    return name or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the server knows before it sees a prompt (``ServeLimits`` met with the models)."""

    vocab_size: int  # token ids in a prompt must be below this
    max_tokens: int  # largest max_tokens a request may ask for (the model context or less)
    max_stop: int = ServeLimits.max_stop  # stop strings per request
    max_stop_length: int = ServeLimits.max_stop_length  # characters of one stop string
    # The prompt-token limit needs the tokenizer: the worker checks it (``--max-prompt-tokens``).


def check_stop(stop: str | list[str] | None, limits: Limits) -> None:
    """At most ``max_stop`` stop strings of at most ``max_stop_length`` characters each."""
    strings = [stop] if isinstance(stop, str) else stop or []
    if len(strings) > limits.max_stop:
        raise invalid(
            f"stop: at most {limits.max_stop} stop strings are allowed (--max-stop), "
            f"got {len(strings)}",
            "stop",
        )
    for index, string in enumerate(strings):
        if len(string) > limits.max_stop_length:
            raise invalid(
                f"stop: a stop string may have at most {limits.max_stop_length} characters "
                f"(--max-stop-length), stop[{index}] has {len(string)}",
                "stop",
            )


def prompt_of(request: CompletionRequest, limits: Limits) -> str | list[int]:
    """The single prompt of a completions request (text or token ids)."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise invalid(
                f"prompt: one prompt per request (got {len(prompt)}); batched prompts are not "
                "supported",
                "prompt",
            )
        prompt = prompt[0]  # type: ignore[assignment]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(prompt, list):
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]  # type: ignore[operator]
        if bad:
            raise invalid(
                f"prompt: token ids must be in [0, {limits.vocab_size}), got {bad[0]}", "prompt"
            )
    return prompt  # type: ignore[return-value]


def messages_of(request: ChatCompletionRequest) -> list[dict[str, str]]:
    if not request.messages:
        raise invalid("messages must not be empty", "messages")
    return [m.as_template_message() for m in request.messages]


def spec_for(request: _Generation, defaults: SpecConfig, limits: Limits) -> SpecConfig:
    """The server's default ``SpecConfig`` with this request's overrides, validated like the CLI."""
    limit_name = "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        limit_name = "max_completion_tokens"
    max_new = request.new_tokens_limit
    if max_new is not None and not 1 <= max_new <= limits.max_tokens:
        raise invalid(
            f"{limit_name} must be an integer in [1, {limits.max_tokens}] (the model context "
            f"or --max-tokens, the smaller), got {max_new}",
            limit_name,
        )
    check_stop(request.stop, limits)
    base = defaults.target
    try:
        target = SamplingConfig(
            temperature=_pick(request.temperature, base.temperature),
            top_k=_pick(request.top_k, base.top_k),
            top_p=_pick(request.top_p, base.top_p),
        )
    except ValueError as error:
        raise param_error(error) from None
    options = request.mcsd or McsdOptions()
    draft = defaults.draft
    if options.draft_temperature is not None:
        like = defaults.draft or target
        try:
            draft = SamplingConfig(
                temperature=options.draft_temperature, top_k=like.top_k, top_p=like.top_p
            )
        except ValueError as error:
            raise invalid(f"mcsd.draft_{error}", "mcsd.draft_temperature") from None
    tree = defaults.tree
    if options.tree is not None:
        try:
            tree = parse_tree(options.tree, defaults.max_tree_nodes)
        except ValueError as error:
            raise invalid(f"mcsd.tree: {error}", "mcsd.tree") from None
    # the server's rule is for its trees: a request without speculation verifies nothing
    rule = defaults.rule if tree != NO_SPECULATION else None
    if options.rule is not None:
        try:
            rule = get_rule(options.rule).name
        except ValueError as error:
            raise invalid(f"mcsd.{error}", "mcsd.rule") from None
    stop = request.stop if request.stop is not None else defaults.stop_strings
    try:
        return SpecConfig(
            tree=tree,
            rule=rule,
            target=target,
            draft=draft,
            max_new_tokens=_pick(max_new, min(defaults.max_new_tokens, limits.max_tokens)),
            stop_token_ids=defaults.stop_token_ids,
            stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
            seed=_pick(request.seed, defaults.seed),
            max_tree_nodes=defaults.max_tree_nodes,
        )
    except ValueError as error:
        raise param_error(error, fields={"max_new_tokens": limit_name}) from None


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value
