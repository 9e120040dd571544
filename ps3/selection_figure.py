"""A figure that shows what PS3 selected: one row per selection (bottom-up or a prompt), one
panel per high-res scale with each look's patches filled and outlined in the look's colour,
and a panel with the selection probability over the image and its colour bar.

Whatever the input resolution, the figure is at most :data:`MAX_WIDTH_PX` pixels wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MAX_WIDTH_PX = 2000
DPI = 100
_PANEL_MAX_IN = 5.0  # panel width
_PANEL_MAX_H_IN = 8.0  # panel height of tall images, as long as the panel stays _PANEL_MIN_IN wide
_PANEL_MIN_IN = 3.0
_DISPLAY_MAX_PX = 800  # the image is downsampled to this before plotting (panels are <= 500 px)


@dataclass
class SelectionView:
    """One encoded selection: its title, and per high-res scale the ``(h, w)`` look index
    of each patch (-1: not selected) and the ``(h, w)`` selection probabilities."""

    title: str
    look_maps: list[torch.Tensor]
    probs: list[torch.Tensor]


def _look_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["tab20"]
    return np.array([cmap(i % cmap.N) for i in range(n)])


def _outline_segments(mask: np.ndarray, cell_w: float, cell_h: float) -> np.ndarray:
    """Line segments ``(K, 2, 2)`` (x, y in image pixels) along the border of ``mask``'s cells."""
    padded = np.pad(mask, 1)
    r, c = np.nonzero(padded[1:, 1:-1] != padded[:-1, 1:-1])  # edge above cell (r, c)
    horizontal = np.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, r * cell_h], axis=-1)
    r, c = np.nonzero(padded[1:-1, 1:] != padded[1:-1, :-1])  # edge left of cell (r, c)
    vertical = np.stack([c * cell_w, r * cell_h, c * cell_w, (r + 1) * cell_h], axis=-1)
    return np.concatenate([horizontal, vertical]).reshape(-1, 2, 2)


def _draw_looks(ax, looks: np.ndarray, colours: np.ndarray, width: int, height: int) -> None:
    from matplotlib.collections import LineCollection

    h, w = looks.shape
    fill = np.zeros((h, w, 4))
    selected = looks >= 0
    fill[selected] = colours[looks[selected]]
    fill[..., 3] = np.where(selected, 0.45, 0.0)
    ax.imshow(fill, extent=(0, width, height, 0), interpolation="nearest")
    for look in np.unique(looks[selected]):
        segments = _outline_segments(looks == look, width / w, height / h)
        ax.add_collection(LineCollection(segments, colors=[colours[look]], linewidths=1.2))


def selection_figure(image: Image.Image, views: list[SelectionView], scales: list[int], low_res_tokens: int, heading: str):
    """The figure (a ``matplotlib.figure.Figure``; save it with ``dpi=DPI``).

    ``scales`` are the model's scales (low-res first), ``low_res_tokens`` the tokens of the
    low-res pass, ``heading`` a line about the model and the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    width, height = image.size
    shown = image.convert("RGB")
    shown.thumbnail((_DISPLAY_MAX_PX, _DISPLAY_MAX_PX), Image.Resampling.BICUBIC)
    grey = np.asarray(shown.convert("L"))
    faded = 0.35 * np.asarray(shown) / 255 + 0.65 * (0.25 + 0.5 * grey[..., None] / 255)  # so look colours stand out
    num_high = len(scales) - 1
    cols = num_high + 1
    panel_w = min(_PANEL_MAX_IN, (MAX_WIDTH_PX / DPI - 1.5) / cols)
    panel_w = min(panel_w, max(_PANEL_MIN_IN, _PANEL_MAX_H_IN * width / height))
    row_h = panel_w * height / width + 1.1
    fig = plt.figure(figsize=(panel_w * cols + 1.0, row_h * len(views) + 0.4), dpi=DPI, layout="constrained")
    fig.suptitle(heading, fontsize=11)
    rows = fig.subfigures(len(views), 1, squeeze=False)[:, 0]
    max_looks = max([1] + [int(m.max()) + 1 for v in views for m in v.look_maps])
    colours = _look_colours(max_looks)

    for row, view in zip(rows, views):
        looks = [m.cpu().numpy() for m in view.look_maps]
        counts = [int((m >= 0).sum()) for m in looks]
        total = low_res_tokens + sum(counts)
        per_scale = " + ".join([f"{low_res_tokens} low-res @{scales[0]}"] + [f"{n} @{s}" for n, s in zip(counts, scales[1:])])
        row.suptitle(f"{view.title}\n{total} tokens = {per_scale}", fontsize=10)
        axes = row.subplots(1, cols)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        for s, (ax, m) in enumerate(zip(axes, looks)):
            ax.imshow(faded, extent=(0, width, height, 0))
            _draw_looks(ax, m, colours, width, height)
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_title(f"scale {scales[s + 1]}: {counts[s]} of {m.size} patches selected", fontsize=9)
        num_looks = int(max([m.max() for m in looks] + [-1])) + 1
        if num_looks:
            handles = [
                Patch(facecolor=colours[look], edgecolor=colours[look], alpha=0.6,
                      label=f"look {look + 1}: " + " + ".join(f"{int((m == look).sum())} @{s}" for m, s in zip(looks, scales[1:])))
                for look in range(num_looks)
            ]
            row.legend(handles=handles, loc="outside lower center", ncol=min(num_looks, 6), fontsize=8, frameon=False,
                       handlelength=1.2, columnspacing=1.5)
        else:
            axes[0].text(0.5, -0.04, "no look: low-res tokens only", transform=axes[0].transAxes, ha="center", va="top", fontsize=8)
        prob = view.probs[-1].float().cpu().numpy()
        lo, hi = float(prob.min()), float(prob.max())
        ax = axes[-1]
        ax.imshow(grey, cmap="gray", extent=(0, width, height, 0))
        heat = ax.imshow(prob, cmap="inferno", alpha=0.65, vmin=lo, vmax=max(hi, lo + 1e-6), extent=(0, width, height, 0),
                         interpolation="nearest")
        ax.set_title(f"selection probability ({prob.shape[0]}x{prob.shape[1]} grid of scale {scales[-1]})", fontsize=9)
        row.colorbar(heat, ax=ax, shrink=0.85, fraction=0.05, pad=0.02)
    return fig
