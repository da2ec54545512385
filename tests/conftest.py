"""Shared fixtures: backends and start methods to run the contract on, and leak checks."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import autopar

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]

# The whole suite runs on these; the `contract` tests also run under every start method.
BACKENDS: list[Any] = [
    pytest.param({"backend": "serial"}, id="serial"),
    pytest.param({"backend": "thread", "workers": 2}, id="thread"),
    pytest.param({"backend": "process", "workers": 2}, id="process"),
]
CONTRACT_BACKENDS: list[Any] = BACKENDS + [
    pytest.param({"backend": "process", "workers": 2, "start_method": m}, id=f"process-{m}", marks=pytest.mark.contract)
    for m in START_METHODS
    if m != multiprocessing.get_start_method(allow_none=False)
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options selecting each backend in turn (process on the platform's start method)."""
    return dict(request.param)


@pytest.fixture(params=CONTRACT_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options selecting each backend, and the process backend under every start method."""
    return dict(request.param)


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOPAR_BACKEND", raising=False)
    monkeypatch.delenv("AUTOPAR_WORKERS", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_workers() -> Iterator[None]:
    """After the suite, closing autopar's pools must leave no child process behind."""
    yield
    autopar.shutdown()
    assert worker_children() == [], "worker processes were left behind"
    assert multiprocessing.active_children() == []


def worker_children() -> list[psutil.Process]:
    """This process's live children, the forkserver and the resource tracker left out."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == "zombie":
                continue
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "forkserver" not in command and "resource_tracker" not in command:
            found.append(child)
    return found


def run_script(
    source: str,
    tmp_path: Path,
    *args: str,
    timeout: float = 60,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a fresh ``__main__`` script (``env`` added to the environment); with
    ``check``, fail with its output if it fails."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    result = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check:
        assert result.returncode == 0, f"script failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
