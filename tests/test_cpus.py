"""Counting usable CPUs from affinity and cgroup quotas (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autopar import _cpus
from autopar._cpus import usable_cpu_count


def affinity() -> int:
    return min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))


def test_without_cgroup_files_affinity_decides(tmp_path: Path) -> None:
    assert usable_cpu_count(tmp_path) == affinity()


@pytest.mark.parametrize(("content", "expected"), [("max 100000", None), ("50000 100000", 1), ("150000 100000", 2)])
def test_cgroup_v2_quota(tmp_path: Path, content: str, expected: int | None) -> None:
    (tmp_path / "cpu.max").write_text(content + "\n")
    assert usable_cpu_count(tmp_path) == min(affinity(), expected or affinity())


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpu_count(tmp_path) == 1


def test_cgroup_v1_unlimited_and_garbage_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpu_count(tmp_path) == affinity()
    (tmp_path / "cpu.max").write_text("garbage")
    assert usable_cpu_count(tmp_path) == affinity()


def test_never_more_than_cpu_count(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000000 100000")
    assert usable_cpu_count(tmp_path) <= (os.cpu_count() or 1)


def test_a_quota_read_is_used_again_for_a_few_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every loop asks: the files are read again only once the last read is a few seconds old."""
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpu_count(tmp_path) == 1
    monkeypatch.setattr(_cpus, "QUOTA_REREAD_AFTER", 0.0)
    assert usable_cpu_count(tmp_path) == affinity()
