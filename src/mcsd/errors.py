"""``ParamError``: a bad value of one named parameter, with the name and the allowed values as
data, so a caller (the server's 400 ``param``, a command-line option) never parses a message.

It imports nothing of mcsd: every module may raise it.
"""

from __future__ import annotations

import math


class ParamError(ValueError):
    """A bad value of the parameter ``param`` (as the raising API spells it: a ``SpecConfig``
    field, ``"temperature"``, ...); ``allowed`` says what it may be (``"an integer >= 1"``),
    ``None`` where the message says it best. ``str(error)`` is the full message."""

    def __init__(self, message: str, *, param: str, allowed: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.allowed = allowed


def check_int(
    name: str, value: object, low: int, high: int | None = None, *, param: str | None = None
) -> None:
    """``value`` is an integer in ``[low, high]`` (``high=None``: no upper bound), else
    ``ParamError`` naming ``name`` (``param``: the field, where ``name`` is a longer phrase)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParamError(
            f"{name} must be an integer >= {low}, got {value!r}",
            param=param or name,
            allowed=allowed,
        )
    if high is not None and value > high:
        raise ParamError(
            f"{name} must be an integer <= {high}, got {value!r}",
            param=param or name,
            allowed=allowed,
        )


def check_number(name: str, value: object) -> float:
    """``value`` as a float: any int or float but NaN (and never a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ParamError(f"{name} must be a number, got {value!r}", param=name, allowed="a number")
    return float(value)
