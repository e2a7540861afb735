"""How a generation that broke is answered: the error one request gets while the server goes on.

- device out of memory (``torch.cuda.OutOfMemoryError``): 503 ``out_of_memory``, retryable: the
  request's generation is closed (its cache rows freed) and the allocator's cached blocks are
  returned, so the next request finds the memory again;
- anything else: 500 ``server_error`` with the exception's type and message (never a traceback:
  the server log has that).
"""

from __future__ import annotations

import torch

from mcsd.server.schemas import APIError


def failure_of(error: BaseException) -> APIError:
    """The client-facing error for ``error`` raised inside a generation."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return APIError(
            503,
            "the device ran out of memory during this generation; retry later or ask for fewer "
            "tokens",
            type="server_error",
            code="out_of_memory",
        )
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")
