"""One factory for every runtime: a registry of runtime kinds, ``load_runtime`` to build one.

A kind names how a checkpoint is run (``RUNTIMES``):

- ``hf``         transformers' modelling code on its dynamic cache (any causal LM with
                 full-attention layers; CPU or GPU);
- ``hf-static``  the same modelling code on mcsd's static KV cache, CUDA graphs on GPUs and
                 optionally ``torch.compile``;
- ``fast``       mcsd's own compiled Llama-family model (``mcsd.models.fast``) on the same
                 static cache: the GPU default for the architectures it supports;
- ``llama.cpp``  a GGUF file on llama.cpp (llama-cpp-python), quantised weights as they are,
                 its own tokenizer and chat template; CPU only (``mcsd.models.llamacpp``).

``auto`` picks ``fast`` on a CUDA device for a checkpoint it supports; ``llama.cpp`` on a CPU
for a GGUF model (a known offline model, or a path to a ``.gguf`` file) when llama-cpp-python is
installed and no torch dtype is asked for; else ``hf``; and logs one line saying which. The
transformers kinds load from what ``mcsd.sources.resolve`` gives (a known offline model, a local
directory, a Hugging Face id), llama.cpp from ``mcsd.sources.resolve_gguf``; every kind returns
the runtime with its tokenizer and end-of-sequence ids. Bad options are refused here, before
any weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcsd.config import (
    DEFAULT_ATTENTION,
    DEFAULT_DTYPE,
    DEFAULT_RUNTIME,
    LlamaCppConfig,
    ParallelConfig,
)
from mcsd.models.base import Runtime

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class LoadRequest:
    """One model to load, every option already validated."""

    name: str  # a known model, a local directory or a Hugging Face id
    dtype: torch.dtype
    device: torch.device
    attn_implementation: str
    compile: bool
    max_length: int | None
    progress: bool
    llamacpp: LlamaCppConfig = field(default_factory=LlamaCppConfig)  # the llama.cpp runtime's
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the fast runtime's tp


Loaded = tuple[Runtime, Any, tuple[int, ...]]  # the runtime, its tokenizer, its EOS ids


@dataclass(frozen=True)
class RuntimeKind:
    name: str
    summary: str
    load: Callable[[LoadRequest], Loaded]
    compiles: bool  # accepts compile=True
    sized: bool  # accepts max_length (a static cache)
    # auto picks the first kind (in registry order) that accepts (model name, device)
    auto: Callable[[str, torch.device], bool] = lambda name, device: False
    dtypes: bool = True  # accepts a dtype other than auto (llama.cpp runs the GGUF's own types)
    why: str = ""  # the reason auto gives when it picks this kind


def _transformers(request: LoadRequest, wrap: Callable[[Any], Runtime]) -> Loaded:
    """A transformers checkpoint (``mcsd.sources.resolve``), wrapped by a runtime."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcsd.sources import resolve

    path = resolve(request.name, progress=request.progress)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=request.dtype, attn_implementation=request.attn_implementation
    ).to(request.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return wrap(model), tokenizer, _eos_ids(model, tokenizer)


def _hf(request: LoadRequest) -> Loaded:
    from mcsd.models.hf import HFModel

    return _transformers(request, HFModel)


def _hf_static(request: LoadRequest) -> Loaded:
    from mcsd.models.static import StaticHFModel

    return _transformers(
        request,
        lambda model: StaticHFModel(model, max_length=request.max_length, compile=request.compile),
    )


def _fast(request: LoadRequest) -> Loaded:
    from mcsd.models.fast import load_fast, read_architecture
    from mcsd.sources import resolve

    path = resolve(request.name, progress=request.progress)
    arch = read_architecture(path)  # refuse an unsupported checkpoint before anything is read
    if request.parallel.size > 1:
        return _fast_parallel(request, path, arch), *_fast_tokens(path)
    runtime = load_fast(
        path,
        dtype=request.dtype,
        device=request.device,
        max_length=request.max_length,
        compile=request.compile,
        label=Path(request.name).name,
    )
    return runtime, *_fast_tokens(path)


def _fast_tokens(path: Any) -> tuple[Any, tuple[int, ...]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, _eos_ids(_generation_config(path), tokenizer)


def _fast_parallel(request: LoadRequest, path: Any, arch: Any) -> Runtime:
    """This rank's shard of the checkpoint (``mcsd.models.fast.parallel``)."""
    from mcsd.models.fast.parallel import check_tp, join, load_parallel, rank_device

    check_tp(arch, request.parallel.size, request.device)
    shard = join(request.parallel, request.device)
    return load_parallel(
        path,
        shard,
        dtype=request.dtype,
        device=rank_device(request.device, shard.rank),
        max_length=request.max_length,
        compile=request.compile,
        label=Path(request.name).name,
        check_ranks=request.parallel.check_ranks,
    )


def _fast_supports(name: str, device: torch.device) -> bool:
    """auto: the fast runtime on CUDA for a checkpoint it runs (known, local or cached)."""
    if device.type != "cuda":
        return False
    from mcsd.models.fast.arch import FAMILIES, read_architecture
    from mcsd.sources import known_model, resolve

    known = known_model(name)
    if known is not None:  # decided from the registry: nothing is fetched to decide
        return known.family in FAMILIES
    try:
        read_architecture(resolve(name, progress=False))
    except (ValueError, FileNotFoundError):
        return False
    return True


def _generation_config(path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def _llamacpp(request: LoadRequest) -> Loaded:
    """A GGUF file (``mcsd.sources.resolve_gguf``) on llama.cpp, with its own tokenizer."""
    from mcsd.models.llamacpp import load_llamacpp
    from mcsd.sources import known_model, resolve_gguf

    if request.device.type != "cpu":
        raise ValueError(
            f"runtime llama.cpp runs on the CPU (this build has no GPU backend), got device "
            f"{request.device}; use device cpu, or runtime hf / hf-static on a GPU"
        )
    path = resolve_gguf(request.name, progress=request.progress)
    known = known_model(request.name)
    extra_eos = known.extra_eos_tokens if known is not None else ()
    return load_llamacpp(path, request.llamacpp, extra_eos)


def _llamacpp_auto(name: str, device: torch.device) -> bool:
    """A GGUF model on a CPU, and llama-cpp-python imports."""
    from mcsd.sources import is_gguf_name

    if device.type != "cpu" or not is_gguf_name(name):
        return False
    from mcsd.models.llamacpp import bindings_available

    return bindings_available()


RUNTIMES: dict[str, RuntimeKind] = {
    kind.name: kind
    for kind in (
        RuntimeKind(
            "fast",
            "mcsd's own compiled Llama-family model, static KV cache, CUDA graphs",
            _fast,
            compiles=True,
            sized=True,
            auto=_fast_supports,
            why="a CUDA device and an architecture mcsd's own model runs",
        ),
        RuntimeKind(
            "llama.cpp",
            "a GGUF file on llama.cpp (CPU): quantised kernels, its own tokenizer",
            _llamacpp,
            compiles=False,
            sized=False,
            auto=_llamacpp_auto,
            dtypes=False,
            why="a GGUF model on the CPU and llama-cpp-python is installed",
        ),
        RuntimeKind(
            "hf",
            "transformers' modelling code, dynamic KV cache",
            _hf,
            compiles=False,
            sized=False,
            auto=lambda name, device: True,
            why="the default for what fast and llama.cpp do not take",
        ),
        RuntimeKind(
            "hf-static",
            "transformers' modelling code on mcsd's static KV cache, CUDA graphs on GPUs",
            _hf_static,
            compiles=True,
            sized=True,
        ),
    )
}
RUNTIME_CHOICES = ("auto", *RUNTIMES)


def runtime_kind(
    runtime: object, device: torch.device, name: str | None = None, dtype: object = "auto"
) -> RuntimeKind:
    """The kind ``runtime`` names; ``auto``: the first kind that takes model ``name`` on
    ``device`` (``fast`` on CUDA, ``llama.cpp`` for GGUF models on a CPU, then ``hf``, which
    takes everything), among the kinds that take ``dtype`` (an explicit torch dtype means
    torch).
    ``ValueError`` for anything else."""
    if runtime == "auto":
        explicit = dtype not in (None, "auto")
        return next(
            k
            for k in RUNTIMES.values()
            if (k.dtypes or not explicit) and k.auto(name or "", device)
        )
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}; got {runtime!r}")
    return RUNTIMES[runtime]


def parse_device(device: object) -> torch.device:
    """``None`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, as a
    device that exists here; ``ValueError`` otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N; got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (use cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA device(s) here")
    return parsed


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs and on CPUs with native bf16 (AVX-512 BF16), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def parse_dtype(dtype: object, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    return DTYPES[dtype]


def log_auto_choice(kind: RuntimeKind, device: torch.device) -> None:
    """The one log line of an ``auto`` runtime choice."""
    others = ", ".join(name for name in RUNTIMES if name != kind.name)
    log.info(
        "runtime auto -> %s on %s: %s (--runtime %s to choose)", kind.name, device, kind.why, others
    )


def check_options(
    kind: RuntimeKind,
    *,
    compile: bool,
    max_length: int | None,
    dtype: object = DEFAULT_DTYPE,
) -> None:  # before any load
    if not kind.dtypes and dtype not in (None, "auto"):
        raise ValueError(
            f"dtype: runtime {kind.name} runs the GGUF's own (quantised) weights; leave dtype "
            f"auto, got {dtype!r}"
        )
    if compile and not kind.compiles:
        raise ValueError(
            f"compile needs a runtime that compiles (hf-static), got runtime {kind.name!r}"
        )
    if max_length is not None:
        if not kind.sized:
            raise ValueError(f"max_length sizes a static cache: runtime {kind.name!r} has none")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def load_runtime(
    name: str,
    *,
    runtime: str = DEFAULT_RUNTIME,
    dtype: object = DEFAULT_DTYPE,
    device: object = None,
    attn_implementation: str = DEFAULT_ATTENTION,
    progress: bool = True,
    compile: bool = False,
    max_length: int | None = None,
    llamacpp: LlamaCppConfig | None = None,
    parallel: ParallelConfig | None = None,
) -> Loaded:
    """Load one causal LM by known name, local directory, Hugging Face id or GGUF file on
    ``runtime`` (``RUNTIMES``; ``auto`` picks for the machine). Public as ``mcsd.load_model``.

    Returns the runtime, its tokenizer and its EOS token ids. ``max_length``: positions of a
    static cache (default min(model limit, ``mcsd.config.STATIC_MAX_LENGTH``)); ``compile``: also
    ``torch.compile`` it (the fast runtime compiles twice in its warm-up; hf-static ~30 s per
    captured shape); ``llamacpp``: the llama.cpp runtime's threads, KV cells and batch size
    (default ``LlamaCppConfig()``); ``parallel``: tensor parallelism, on the fast runtime only
    (default one process; ``mcsd.models.fast.parallel``)."""
    from mcsd.models.hf import SUPPORTED_ATTENTION

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    torch_device = parse_device(device)
    parallel = check_parallel(parallel, runtime)
    kind = runtime_kind("fast" if parallel.size > 1 else runtime, torch_device, name, dtype)
    if runtime == "auto" and parallel.size == 1:
        log_auto_choice(kind, torch_device)
    torch_dtype = parse_dtype(dtype, torch_device)
    check_options(kind, compile=compile, max_length=max_length, dtype=dtype)
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attn_implementation must be one of {', '.join(SUPPORTED_ATTENTION)}; got "
            f"{attn_implementation!r}"
        )
    if llamacpp is None:
        llamacpp = LlamaCppConfig()
    elif not isinstance(llamacpp, LlamaCppConfig):
        raise ValueError(f"llamacpp must be a LlamaCppConfig, got {type(llamacpp).__name__}")
    request = LoadRequest(
        name,
        torch_dtype,
        torch_device,
        attn_implementation,
        compile,
        max_length,
        progress,
        llamacpp,
        parallel,
    )
    return kind.load(request)


def check_parallel(parallel: object, runtime: object) -> ParallelConfig:
    """``parallel`` (default one process) as a ``ParallelConfig``; tensor parallelism runs on
    the fast runtime only (``auto`` then means ``fast``)."""
    if parallel is None:
        return ParallelConfig()
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel must be a ParallelConfig, got {type(parallel).__name__}")
    if parallel.size > 1 and runtime not in ("auto", "fast"):
        raise ValueError(f"tp={parallel.size} needs runtime fast (or auto), got {runtime!r}")
    return parallel


def _eos_ids(generation: Any, tokenizer: Any) -> tuple[int, ...]:
    """The EOS ids of a generation config (or a model carrying one) and the tokenizer."""
    ids: list[int] = []
    generation = getattr(generation, "generation_config", generation)
    configured = getattr(generation, "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return tuple(dict.fromkeys(ids))
