"""Tuned default trees, saved by ``mcsd tune`` in the mcsd cache (``tuned.json``).

Keyed by target, draft, device type, dtype and decoding mode (``greedy`` or ``sampling``): the
best tree depends on all of them. ``tuned_tree`` is what ``generate`` / ``serve`` can consult
when the user gives no ``--tree``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcsd.sources import cache_dir

FILENAME = "tuned.json"


def tuned_key(target: str, draft: str, device: str, dtype: str, greedy: bool) -> str:
    device_type = device.split(":")[0]
    return f"{target}|{draft}|{device_type}|{dtype}|{'greedy' if greedy else 'sampling'}"


def tuned_file(cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / FILENAME


def load_all(cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    path = tuned_file(cache)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        message = f"{path} is not valid JSON ({error}); delete it and re-run mcsd tune"
        raise ValueError(message) from None
    return data if isinstance(data, dict) else {}


def save_tuned(
    key: str, entry: dict[str, Any], cache: str | os.PathLike[str] | None = None
) -> Path:
    """Store ``entry`` (at least ``tree``) under ``key``; other keys are kept."""
    if "tree" not in entry:
        raise ValueError("a tuned entry needs a 'tree'")
    data = load_all(cache)
    data[key] = entry | {"saved": datetime.now(UTC).isoformat(timespec="seconds")}
    path = tuned_file(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)  # atomic: a reader never sees half a file
    return path


def tuned_tree(
    target: str,
    draft: str,
    device: str,
    dtype: str,
    greedy: bool,
    cache: str | os.PathLike[str] | None = None,
) -> str | None:
    """The tree ``mcsd tune`` saved for this pair and setting, or None."""
    entry = load_all(cache).get(tuned_key(target, draft, device, dtype, greedy))
    return entry.get("tree") if isinstance(entry, dict) else None
