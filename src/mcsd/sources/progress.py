"""Progress output of a fetch: step lines and byte bars on stderr (rich), warnings always."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class _Reporter:
    """Progress lines and bars on stderr when ``enabled``; warnings always."""

    enabled: bool

    def step(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bytes(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A byte progress bar; yields ``advance(n_bytes)``."""
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
