"""The defaults of ``mcsd serve``, and what one request may ask for (``ServeLimits``).

The library's own defaults (trees, rules, sampling) are in ``mcsd.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcsd.errors import ParamError


@dataclass(frozen=True, kw_only=True)
class ServeDefaults:
    """``mcsd serve`` (``mcsd.server``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64  # requests waiting for a row; more get 429
    api_key_env: str = "MCSD_API_KEY"  # where --api-key is read from when not given
    drain_timeout_s: float = 30.0  # SIGTERM: how long running requests may take to finish
    graceful_shutdown_s: float = 5.0  # after the drain: responses still being sent may finish
    max_batch: int = 1  # generations decoded side by side (rows of the batch engine)
    adaptive_tree: bool = False  # measure the step cost; the default tree shrinks with the batch
    disconnect_poll_s: float = 0.05  # how often a waiting request checks its client is there
    unbounded_max_tokens: int = 1 << 20  # max_tokens cap when the models declare no limit


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one request to ``mcsd serve`` may ask for (400 / 413 beyond it, naming the field)."""

    max_body_bytes: int = 16 << 20  # far beyond any context, small enough to refuse junk early
    max_prompt_tokens: int | None = None  # None: the models' context
    max_tokens: int | None = None  # largest max_tokens; None: the models' context
    max_stop: int = 16  # stop strings per request (OpenAI allows 4; vLLM clients send more)
    max_stop_length: int = 256  # characters of one stop string

    def __post_init__(self) -> None:
        optional = ("max_prompt_tokens", "max_tokens")  # None: the models' context
        for name in ("max_body_bytes", *optional, "max_stop", "max_stop_length"):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParamError(
                    f"{name} must be an integer >= 1, got {value!r}",
                    param=name,
                    allowed="an integer >= 1",
                )
