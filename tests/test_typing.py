"""What mypy --strict infers for user code of the public API (tests/typing_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")


def test_user_code_gets_precise_types(tmp_path: Path) -> None:
    cases = Path(__file__).with_name("typing_cases.py")
    stdout, stderr, status = api.run(["--strict", "--cache-dir", str(tmp_path), str(cases)])
    assert status == 0, stdout + stderr
