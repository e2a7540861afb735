"""OpenAI-compatible HTTP server for speculative decoding (``mcsd serve``).

``create_app(pair, defaults)`` builds the FastAPI app; ``mcsd.commands.serve`` runs it under
uvicorn. Modules: ``app`` (endpoints, streaming), ``schemas`` (request validation and limits),
``admission`` (the bounded FIFO queue of waiting requests), ``worker`` (the scheduler that runs
them), ``failures`` (how a broken generation is answered), ``auth`` (the API key), ``drain``
(SIGTERM), ``metrics`` (Prometheus), ``defaults`` (``mcsd serve``'s defaults and
``ServeLimits``).
"""

from mcsd.server.app import create_app

__all__ = ["create_app"]
