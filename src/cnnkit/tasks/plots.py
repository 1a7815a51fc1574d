"""Moved to `cnnkit.plots`; these names stay importable from here."""

from cnnkit.plots import plot_confusion, plot_grid  # noqa: F401
