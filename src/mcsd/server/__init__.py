"""OpenAI-compatible HTTP server for speculative decoding (``mcsd serve``).

``create_app(pair, defaults)`` builds the FastAPI app; ``mcsd.commands.serve`` runs it under
uvicorn. Modules: ``app`` (endpoints, streaming), ``schemas`` (request validation),
``worker`` (the one-generation-at-a-time FIFO queue), ``metrics`` (Prometheus).
"""

from mcsd.server.app import create_app

__all__ = ["create_app"]
