"""Tuned default trees, saved by ``mcsd tune`` in the mcsd cache (``tuned.json``).

Keyed by target, draft, device type, dtype and runtime: the best tree depends on all of them.
``generate``, ``bench`` and ``serve`` use the saved tree when ``--tree`` is not given
(``mcsd.commands.options.tree_default``) and say so in their first log line. The tree is tuned
for one row; under an adaptive budget (``mcsd.budget``) it is the largest tree a row grows, and
the budget picks a prefix of it per step from the load and the acceptance seen.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcsd.sources import cache_dir

FILENAME = "tuned.json"


def tuned_key(target: str, draft: str, device: str, dtype: str, runtime: str) -> str:
    """``target|draft|device type|dtype|runtime``, e.g. ``a|b|cpu|bfloat16|hf``."""
    device_type = str(device).split(":")[0]
    dtype = str(dtype).removeprefix("torch.")
    return f"{target}|{draft}|{device_type}|{dtype}|{runtime}"


def tuned_key_for(
    target: str | None, draft: str | None, device: object, dtype: object, runtime: object
) -> str:
    """The key of a run given its command-line values (``None`` / ``auto`` resolved as
    ``load_pair`` resolves them)."""
    from mcsd.models.factory import parse_device, parse_dtype, runtime_kind
    from mcsd.sources import DEFAULT_DRAFT, DEFAULT_TARGET

    torch_device = parse_device(device)
    kind = runtime_kind(runtime, torch_device, target or DEFAULT_TARGET, dtype)
    # a runtime without torch dtypes (llama.cpp) reports float32, as mcsd tune records it
    torch_dtype = parse_dtype(dtype, torch_device) if kind.dtypes else "float32"
    return tuned_key(
        target or DEFAULT_TARGET, draft or DEFAULT_DRAFT, torch_device.type, torch_dtype, kind.name
    )


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


def tuned_entry(key: str, cache: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """What ``mcsd tune`` saved under ``key`` (with at least ``tree``), or None."""
    entry = load_all(cache).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("tree"), str):
        return entry
    return None
