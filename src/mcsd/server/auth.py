"""API-key authentication of ``mcsd serve`` (``--api-key`` or the ``MCSD_API_KEY`` variable).

Every request except ``GET /health`` (for load balancers and orchestrators) must carry
``Authorization: Bearer <key>``; anything else is answered 401 with an OpenAI-style error body,
as vLLM and llama.cpp do. The comparison takes the same time whatever the header holds
(``hmac.compare_digest``), so the key cannot be guessed byte by byte from response times.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health",)


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization`` is exactly ``Bearer <key>``."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        if not key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not given else "invalid API key"
        body = {
            "error": {
                "message": f"{message}: send the header 'Authorization: Bearer <key>'",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only lets this machine connect (a name other than localhost
    counts as reachable from outside)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
