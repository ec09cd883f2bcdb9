"""``decode-var-init``'s report: the user's movie against a simulation with the estimated param.

One PNG: a typical real frame next to a simulated one (same colour scale, photons), and histograms of what
both give the same measurement (:mod:`decode_var.data.estimate`): the spots' photons, the per-frame
background and the spots per frame. Where the histograms differ, the param does not yet describe the movie.
"""
from __future__ import annotations

import pathlib
from typing import Sequence, Union

import numpy as np

from decode_var.core.atomic import atomic_write
from decode_var.data.init_param import SampleSummary

__all__ = ["save_init_report"]


def _hist(ax, real: np.ndarray, sim: np.ndarray, title: str, unit: str, integer: bool = False) -> None:
    both = np.concatenate([real, sim]) if len(real) + len(sim) else np.zeros(1)
    lo, hi = np.percentile(both, [0.5, 99.5]) if not integer else (both.min() - 0.5, both.max() + 0.5)
    bins = np.arange(lo, hi + 1) if integer else np.linspace(lo, max(hi, lo + 1e-6), 40)
    for values, label, colour in ((real, "movie", "C0"), (sim, "simulation", "C1")):
        if len(values):
            ax.hist(values, bins=bins, density=True, histtype="step", lw=1.5, color=colour,
                    label=f"{label}: median {np.median(values):.4g}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def save_init_report(path: Union[str, pathlib.Path], real: SampleSummary, sim: SampleSummary,
                     lines: Sequence[str] = ()) -> pathlib.Path:
    """Write the report PNG (atomically) and return its path; ``lines``: text shown under the title."""
    # lazy: matplotlib costs 0.2-0.4 s, paid only when the report is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7.6), dpi=80)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, top=0.9 - 0.025 * len(lines), hspace=0.35, wspace=0.25)
    vmin, vmax = np.percentile(real.frame_HW, [1, 99.8])
    for k, (frame, name) in enumerate(((real.frame_HW, "movie"), (sim.frame_HW, "simulation with the param"))):
        ax = fig.add_subplot(grid[0, k])
        im = ax.imshow(frame, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name}: a typical frame (photons)", fontsize=9)
        ax.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.046)
    _hist(fig.add_subplot(grid[0, 2]), real.per_frame, sim.per_frame, "spots per frame", "spots", integer=True)
    _hist(fig.add_subplot(grid[1, 0]), real.phot, sim.phot, "photons per spot (Gaussian MLE)", "photons")
    _hist(fig.add_subplot(grid[1, 1]), real.bg_levels, sim.bg_levels, "background per frame", "photons / px")
    ax = fig.add_subplot(grid[1, 2])
    ax.set_axis_off()
    ax.text(0, 1, "Same measurement on both: spots detected and fitted,\nbackground from the pixels away from "
            "spots.\nWhere the curves differ, the param does not describe\nthe movie (see the comments in the "
            "param file).", fontsize=8, va="top")
    for i, line in enumerate(lines):
        fig.text(0.02, 0.975 - 0.025 * i, line, fontsize=9 if i else 11, va="top")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
