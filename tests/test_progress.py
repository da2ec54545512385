"""The progress option: a tqdm bar when tqdm is installed, a warning and no bar otherwise."""

from __future__ import annotations

import sys

import pytest

from _helpers import square
from autopar import parallel_loop
from autopar._progress import progress_bar


def test_progress_bar_counts_every_iteration(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    res = parallel_loop(square, workers=2, progress=True).map(range(50))
    assert list(res) == [x * x for x in range(50)]
    err = capsys.readouterr().err
    assert "square" in err
    assert "50/50" in err


@pytest.mark.parametrize(
    ("blocked", "message"),
    [
        ("tqdm", r"progress=True needs tqdm \(pip install tqdm, or autopar's progress extra\)"),
        ("tqdm.auto", r"progress=True could not import tqdm \(import of tqdm.auto halted"),  # a broken install
    ],
)
def test_without_tqdm_a_warning_says_why(monkeypatch: pytest.MonkeyPatch, blocked: str, message: str) -> None:
    if blocked == "tqdm":  # not installed: nothing on the path, nothing imported yet
        monkeypatch.setattr(sys, "path", [])
        for name in [name for name in sys.modules if name.split(".")[0] == "tqdm"]:
            monkeypatch.delitem(sys.modules, name)
    else:
        monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.warns(UserWarning, match=message):
        bar = progress_bar(True, 10, "f")
    bar.update(3)
    bar.close()


def test_no_progress_means_no_output(capsys: pytest.CaptureFixture[str]) -> None:
    parallel_loop(square, workers=2).map(range(5))
    assert capsys.readouterr().err == ""


def test_an_imap_closed_before_its_first_result_closes_its_bar() -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    results = parallel_loop(square, workers=2, progress=True).imap(range(5))
    results.close()
    assert not [bar for bar in list(tqdm._instances) if bar.desc == "square"]
