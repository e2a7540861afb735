"""Run the adapter tests under the LOWEST transformers version pyproject.toml allows.

The newest 5.x is what pip installs into the test environment; the lowest (5.17, the GPU
machine's version) has a different cache API (``past_key_values`` keyword, ``crop`` meaning).
``.ci/prepare`` installs it once with ``pip install --target`` beside the environment
(``<sys.prefix>/mcsd-test-envs/transformers-<version>``); this test puts it first on
``PYTHONPATH`` for a subprocess running the adapter tests (``ADAPTER_TESTS``). Nothing is
installed from inside the test.
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
# the tests touching transformers
ADAPTER_TESTS = ("test_hf_adapter.py", "test_static_cache.py", "test_row_buckets.py")


def lowest_transformers() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.startswith("transformers"))
    match = re.search(r">=\s*([0-9.]+)", spec)
    assert match, f"transformers needs a lower bound in pyproject.toml, got {spec!r}"
    return match.group(1)


def prepared(version: str) -> Path:
    """The environment ``.ci/prepare`` installed for ``version`` (a clear failure if absent)."""
    target = Path(sys.prefix) / "mcsd-test-envs" / f"transformers-{version}"
    if not (target / ".complete").is_file():
        pytest.fail(
            f"transformers {version} is not prepared in {target}: run .ci/prepare in this "
            "environment first (README command 2 does)"
        )
    return target


def test_adapter_under_lowest_transformers() -> None:
    version = lowest_transformers()
    site = prepared(version)
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
