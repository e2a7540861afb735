"""CUDA-graph capture and replay per static shape, for any runtime with persistent inputs.

A runtime that keeps its inputs in persistent device buffers (tokens, positions, mask, write
slots) can run a forward of a given static shape as a replayed CUDA graph: after two eager
warm-up runs on a side stream, one forward is captured; later calls with the same key just
refresh the buffers and replay it. ``GraphRunner.run(key, fn)`` does exactly that and returns
the graph's (persistent) output. If capture fails, it logs one warning and runs ``fn`` eagerly
from then on (what the runtime would have done without graphs). On a CPU device it always runs
eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class GraphRunner:
    """Captured graphs of one runtime, keyed by shape; all share one memory pool."""

    def __init__(self, device: torch.device, *, enabled: bool = True, label: str = "") -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.label = label
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.captures = 0  # shapes captured so far (reported by the benchmarks)

    def run(self, key: Hashable, fn: Callable[[], Tensor]) -> Tensor:
        """``fn()`` as a replay of the graph captured for ``key`` (capturing it on first use),
        or eagerly when graphs are off. ``fn`` must read its inputs from persistent buffers."""
        if not self.enabled:
            return fn()
        if key not in self._graphs:
            self._capture(key, fn)
            if key not in self._graphs:  # capture failed: graphs are off now
                return fn()
        graph, output = self._graphs[key]
        graph.replay()
        return output

    def _capture(self, key: Hashable, fn: Callable[[], Tensor]) -> None:
        """Warm up twice on a side stream, then capture one call. The warm-up runs compute
        exactly what the replay will (same buffers), so whatever they write is harmless."""
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = fn()
            self._graphs[key] = (graph, output)
            self.captures += 1
        except Exception as error:  # any failure: fall back to eager, say so once
            log.warning(
                "mcsd: CUDA graph capture of %s failed for shape %s (%s: %s); running eagerly "
                "from now on",
                self.label,
                key,
                type(error).__name__,
                error,
            )
            self.enabled = False
            self._graphs.clear()
