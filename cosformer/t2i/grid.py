"""PNG grids of generated images with their captions underneath, for the run directory and the tracker.

Drawn with matplotlib's object API on the Agg canvas (no pyplot): no global figure state, no GUI backend, safe to
call from a training process. Pixels are shown with nearest interpolation so that palette images stay crisp.
"""

from __future__ import annotations

import math
import os
import pathlib
import textwrap

import torch


def save_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | os.PathLike,
    *,
    ncols: int = 8,
    cell_inches: float = 1.6,
    title: str | None = None,
) -> pathlib.Path:
    """Save (n, 3, H, W) images (uint8, or float in [0, 1]) with one caption each as a PNG grid; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, H, W); got shape {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"one caption per image: got {len(captions)} captions for {images.shape[0]} images")
    if ncols < 1:
        raise ValueError(f"ncols must be positive; got {ncols}")
    n = images.shape[0]
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    caption_lines = 4
    fig = Figure(figsize=(cols * cell_inches, rows * cell_inches * 1.55 + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    width_chars = max(12, int(cell_inches * 12))
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(pixels[k], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        lines = textwrap.wrap(captions[k], width=width_chars)[:caption_lines]
        ax.set_xlabel("\n".join(lines), fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
