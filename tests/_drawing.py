"""A loop that draws with pyplot, importable by the workers; imported only where matplotlib is."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after choosing the backend


def draw_panel(i: int) -> None:
    plt.subplot(1, 5, i + 1)
    plt.plot([0, 1], [0, i])
