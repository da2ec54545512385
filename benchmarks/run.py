"""Benchmark autopar against the serial loop and its peers: ``python benchmarks/run.py``.

Options: ``--repeat N`` (default 5), ``--only NAME[,NAME]``, ``--quick`` (smaller loops, 2 repeats),
``--workers N`` (default: the CPUs this process may use), ``--markdown PATH``.

For each loop, every runner runs ``--repeat`` times in round-robin order (the order rotates each
round), and each run's results are checked against the serial loop's. See benchmarks/README.md
for what the columns mean.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import suite

try:
    import psutil
except ImportError:  # optional: the memory column then says n/a
    psutil = None

SAMPLE_SECONDS = 0.02
RESCAN_EVERY = 3


class PeakMemory:
    """Peak memory of this process plus all its descendants during a block, minus that before it.

    Memory is the proportional set size (PSS): a page shared by k processes counts 1/k in each,
    so the sum over the family is the physical memory it holds. (The plain RSS sum would count
    every page a forked worker shares with its parent once more per worker: a 4-iteration cold
    start of a 400 MiB parent would "use" 800 MiB.) Where PSS cannot be read, RSS is used.

    A background thread samples every ``SAMPLE_SECONDS`` (reading PSS walks a process's page
    tables: about 0.5 ms for 400 MiB) and looks for new child processes every ``RESCAN_EVERY``
    samples (a scan of /proc, about 1 ms). That thread takes CPU from the code it watches, so
    memory is sampled in a run of its own, never in a timed one. One more sample ends the
    block. A pool that starts and stops between two samples (a run shorter than the
    interval) is missed.
    """

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = psutil.Process() if psutil is not None else None
        self._family: list[Any] = []
        self._peak = 0
        self._baseline = 0

    def _rescan(self) -> None:
        with contextlib.suppress(psutil.Error):
            self._family = [self._me, *self._me.children(recursive=True)]

    @staticmethod
    def _size(process: Any) -> int:
        try:
            return int(process.memory_full_info().pss)
        except (AttributeError, psutil.AccessDenied):
            return int(process.memory_info().rss)

    def _sample(self) -> None:
        total = 0
        for process in self._family:
            with contextlib.suppress(psutil.Error):
                total += self._size(process)
        self._peak = max(self._peak, total)

    def _watch(self) -> None:
        tick = 0
        while not self._stop.wait(SAMPLE_SECONDS):
            tick += 1
            if tick % RESCAN_EVERY == 0:
                self._rescan()
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self._me is not None:
            self._rescan()
            self._sample()
            self._baseline = self._peak
            self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._rescan()
            self._sample()
            self.peak_mib = max(0, self._peak - self._baseline) / (1024 * 1024)


@dataclass
class Outcome:
    runner: suite.Runner
    times: list[float] = field(default_factory=list)  # seconds, scaled to the full loop when capped
    peaks: list[float] = field(default_factory=list)
    error: str | None = None


def describe_mismatch(got: list[Any], want: list[Any]) -> str:
    if len(got) != len(want):
        return f"{len(got)} results instead of {len(want)}"
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if not same([a], [b]):
            return f"iteration {index}: got {a!r}, serial loop gave {b!r}"
    return "results differ"


def same(got: list[Any], want: list[Any]) -> bool:
    """Whether two loops' results are equal; NumPy arrays compared by their contents."""
    try:
        return bool(got == want)
    except ValueError:  # an array's == is elementwise
        import numpy as np

        return len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def run_once(
    loop: suite.Loop, outcome: Outcome, expected: list[Any] | None, *, memory: bool = False
) -> list[Any] | None:
    """Run a runner once: timed, or (``memory``) untimed under the memory sampler, whose
    thread would otherwise take CPU from the timed code (on 2 cores, ~60 ms of 300)."""
    runner = outcome.runner
    try:
        runner.setup()
        gc.collect()
        with PeakMemory() if memory else contextlib.nullcontext() as sampler:
            started = time.perf_counter()
            result = runner.run()
            elapsed = time.perf_counter() - started
    except Exception as exc:
        outcome.error = f"FAILED: {type(exc).__name__}: {exc}"
        print(f"\n!!! {loop.name} / {runner.name} raised:\n{traceback.format_exc()}", file=sys.stderr)
        return None
    result = list(result)
    if expected is not None:
        want = expected[: runner.cap] if runner.cap else expected
        if not same(result, want):
            outcome.error = f"WRONG RESULTS: {describe_mismatch(result, want)}"
            print(f"\n!!! {loop.name} / {runner.name}: {outcome.error}", file=sys.stderr)
            return None
    if sampler is not None:
        if sampler.peak_mib is not None:
            outcome.peaks.append(sampler.peak_mib)
    else:
        scale = loop.iterations / runner.cap if runner.cap else 1.0
        outcome.times.append(elapsed * scale)
    return result


def bench_loop(loop: suite.Loop, repeat: int, memory: bool) -> list[Outcome]:
    """Time every runner ``repeat`` times, in rotating order; then, with ``memory``, run each
    once more, untimed, to sample its peak memory."""
    outcomes = [Outcome(runner) for runner in loop.runners]
    for outcome in outcomes:
        try:
            outcome.runner.prepare()
        except Exception as exc:
            outcome.error = f"FAILED in prepare: {type(exc).__name__}: {exc}"
    # The serial reference runs first once, so every other run has results to be checked against.
    expected = run_once(loop, outcomes[0], None)
    if expected is None:
        raise SystemExit(f"{loop.name}: the serial loop failed; nothing to compare with")
    try:
        for round_number in range(repeat):
            shift = round_number % len(outcomes)
            for outcome in outcomes[shift:] + outcomes[:shift]:
                is_first_serial = outcome is outcomes[0] and round_number == 0
                if outcome.error is None and not is_first_serial:
                    run_once(loop, outcome, expected)
            print(f"  {loop.name}: round {round_number + 1}/{repeat} done", file=sys.stderr, flush=True)
        if memory:
            for outcome in outcomes:
                if outcome.error is None:
                    run_once(loop, outcome, expected, memory=True)
            print(f"  {loop.name}: memory round done", file=sys.stderr, flush=True)
    finally:
        for outcome in outcomes:
            try:
                outcome.runner.finish()
            except Exception as exc:
                print(f"!!! {loop.name} / {outcome.runner.name}: finish failed: {exc!r}", file=sys.stderr)
    return outcomes


# --- reporting -------------------------------------------------------------------------------

COLUMNS = ["runner", "median ms", "min-max ms", "speedup", "x ideal", "peak extra MiB", "notes"]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def table_rows(loop: suite.Loop, outcomes: list[Outcome], workers: int) -> list[list[str]]:
    serial_median = statistics.median(outcomes[0].times)
    ideal = serial_median / workers
    rows = []
    for outcome in outcomes:
        runner = outcome.runner
        notes = [runner.note] if runner.note else []
        if runner.cap:
            notes.append(f"CAPPED: ran {runner.cap:,} of {loop.iterations:,} iterations, time scaled up")
        if runner.info is not None and runner.info():
            notes.append(runner.info())
        if outcome.error is not None or not outcome.times:
            rows.append([runner.name, "FAILED", "", "", "", "", "; ".join([outcome.error or "no runs", *notes])])
            continue
        median = statistics.median(outcome.times)
        mark = "~" if runner.cap else ""
        peak = f"{max(outcome.peaks):.0f}" if outcome.peaks else "n/a"
        rows.append(
            [
                runner.name,
                f"{mark}{fmt_ms(median)}",
                f"{fmt_ms(min(outcome.times))}-{fmt_ms(max(outcome.times))}",
                f"{fmt_ratio(serial_median / median)}x",
                fmt_ratio(median / ideal),
                peak,
                "; ".join(notes),
            ]
        )
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in [COLUMNS, ["-" * width for width in widths] + ["-----"], *rows]:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:], strict=True)
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join([" --- "] + [" ---: "] * 5 + [" --- "]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(workers: int) -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import autopar

    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu: {model}; os.cpu_count()={os.cpu_count()}, usable={len(os.sched_getaffinity(0))}, workers={workers}",
        f"python: {platform.python_implementation()} {platform.python_version()} on {platform.platform()}",
        f"autopar {autopar.__version__} ({git_revision()}); peers: {peer_versions()}",
        f"load average at start: {load_average()} (other work on this machine skews the timings)",
    ]


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def git_revision() -> str:
    """The checkout's commit, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git checkout"
    return f"commit {commit}" + (", src/ modified" if dirty else "")


def peer_versions() -> str:
    from importlib import metadata

    found = []
    for name in ("joblib", "mpire", "pebble", "numpy", "psutil"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per runner (default 5; 2 with --quick)")
    parser.add_argument("--only", default="", help="comma-separated loop names: " + ", ".join(suite.LOOPS))
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: smaller loops, fewer repeats")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="workers for every pool")
    parser.add_argument("--no-memory", action="store_true", help="skip the untimed memory run")
    parser.add_argument("--markdown", metavar="PATH", help="also write every table, with a machine header, to PATH")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.repeat < 1 or args.workers < 1:
        parser.error("--repeat and --workers must be 1 or more")
    names = [name.strip() for name in args.only.split(",") if name.strip()] or list(suite.LOOPS)
    unknown = [name for name in names if name not in suite.LOOPS]
    if unknown:
        parser.error(f"unknown loop {', '.join(unknown)}; choose from {', '.join(suite.LOOPS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = suite.Config(workers=args.workers, quick=args.quick)
    header = machine_description(args.workers)
    mode = "quick" if args.quick else "full"
    header.append(f"run: {mode}, --repeat {args.repeat}, loops: {', '.join(args.names)}")
    global psutil
    if args.no_memory:
        psutil = None
        header.append("--no-memory: peak memory is n/a")
    elif psutil is None:
        header.append("psutil is not installed: peak memory is n/a")
    print("\n".join(header), flush=True)
    started = time.perf_counter()
    sections = []
    failed = False
    for name in args.names:
        if name in suite.NEEDS_NUMPY and not suite.have("numpy"):
            note = f"{name}: skipped, numpy is not installed"
            print(f"\n== {note}", flush=True)
            sections.append(f"## {name}\n\nskipped: numpy is not installed\n")
            continue
        loop = suite.LOOPS[name](config)
        print(f"\n== {loop.name}: {loop.description} ({args.repeat} runs per runner)", flush=True)
        outcomes = bench_loop(loop, args.repeat, memory=psutil is not None)
        failed = failed or any(outcome.error for outcome in outcomes)
        rows = table_rows(loop, outcomes, args.workers)
        print(text_table(rows))
        for skipped in loop.skipped:
            print(f"skipped: {skipped}")
        sys.stdout.flush()
        section = f"## {loop.name}\n\n{loop.description}, {args.repeat} runs per runner.\n\n{markdown_table(rows)}\n"
        section += "".join(f"\nskipped: {skipped}\n" for skipped in loop.skipped)
        sections.append(section)
        del loop, outcomes  # free this loop's inputs before the next one forks workers
        gc.collect()
    total = time.perf_counter() - started
    print(f"\ntotal time: {total:.0f} s; load average at the end: {load_average()}", flush=True)
    if args.markdown:
        text = "# autopar benchmarks\n\n" + "".join(f"- {line}\n" for line in header)
        text += f"- total time: {total:.0f} s; load average at the end: {load_average()}\n\n" + "\n".join(sections)
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    if failed:
        print("\n!!! some runners failed or returned wrong results (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import autopar

    try:
        sys.exit(main())
    finally:
        autopar.shutdown()
