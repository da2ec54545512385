"""How many CPUs this process may really use: affinity and the cgroup CPU quota."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

__all__ = ["usable_cpu_count"]


def usable_cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: the least of ``os.cpu_count()``, the affinity mask and
    the cgroup v2 or v1 CPU quota (a container limited to 1.5 CPUs gets 2). Never below 1."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    quota = _recent_cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


QUOTA_REREAD_AFTER = 5.0
"""Seconds a cgroup quota read is used again: every loop asks (reading the files cost about
60 us of a loop's fixed cost), and a container's quota rarely changes while it runs."""

_quotas: dict[Path, tuple[float, float | None]] = {}


def _recent_cgroup_cpu_quota(root: Path) -> float | None:
    now = time.monotonic()
    read_at, quota = _quotas.get(root, (-math.inf, None))
    if now - read_at >= QUOTA_REREAD_AFTER:
        quota = _cgroup_cpu_quota(root)
        _quotas[root] = (now, quota)
    return quota


def _cgroup_cpu_quota(root: Path) -> float | None:
    """The CPU quota in CPUs (``quota / period``), or ``None`` when there is none."""
    v2 = root / "cpu.max"
    v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    try:
        if v2.is_file():
            quota_text, period_text = v2.read_text().split()[:2]
            if quota_text == "max":
                return None
            quota, period = int(quota_text), int(period_text)
        elif v1_quota.is_file() and v1_period.is_file():
            quota, period = int(v1_quota.read_text()), int(v1_period.read_text())
        else:
            return None
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:  # v1 writes -1 for "no limit"
        return None
    return quota / period
