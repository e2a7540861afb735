"""Run the adapter tests under the LOWEST transformers version pyproject.toml allows.

The newest 5.x is what pip installs into the test environment; the lowest (5.17, the GPU
machine's version) has a different cache API (``past_key_values`` keyword, ``crop`` meaning).
It is installed once with ``pip install --target`` into the mcsd cache directory and put first
on ``PYTHONPATH`` for a subprocess running the adapter tests (``ADAPTER_TESTS``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_TESTS = ("test_hf_adapter.py", "test_static_cache.py")  # tests touching transformers


def lowest_transformers() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.startswith("transformers"))
    match = re.search(r">=\s*([0-9.]+)", spec)
    assert match, f"transformers needs a lower bound in pyproject.toml, got {spec!r}"
    return match.group(1)


def install(version: str) -> Path:
    cache = Path(os.environ.get("MCSD_CACHE", Path.home() / ".cache" / "mcsd"))
    target = cache / "test-envs" / f"transformers-{version}"
    marker = target / ".complete"
    if not marker.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--upgrade",
                "--target",
                str(target),
                f"transformers=={version}.*"
                if version.count(".") == 1
                else f"transformers=={version}",
                "huggingface-hub>=1.5,<2",  # transformers 5.17 predates huggingface-hub 2
            ],
            check=True,
        )
        marker.write_text(version)
    return target


def test_adapter_under_lowest_transformers() -> None:
    version = lowest_transformers()
    site = install(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "src")]))
    check = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip().startswith(version), check.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(str(ROOT / "tests" / name) for name in ADAPTER_TESTS),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        pytest.fail(f"adapter tests failed under transformers {version}:\n{result.stdout[-4000:]}")
    assert " passed" in result.stdout
