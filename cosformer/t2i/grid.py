"""PNG grids of generated images with their captions underneath, for the run directory and the tracker.

The grid is laid out in pixels from its content: each image is upscaled by a whole factor (np.repeat, so palette
pixels stay crisp squares) to about IMAGE_PX a side and drawn 1:1 at DPI; each caption is wrapped, by measured
width, to its image's column, and the caption band of a row is as tall as its longest caption. The figure is the
sum of these, so there is no empty margin, and the captions are CAPTION_PT at the PNG's own resolution: readable
as saved, and still readable when a report places the PNG unscaled beside another.

Drawn with matplotlib's object API on the Agg canvas (no pyplot): no global figure state, no GUI backend, safe to
call from a training process.
"""

from __future__ import annotations

import math
import os
import pathlib

import torch

DPI = 100
IMAGE_PX = 128  # about this many pixels a side per image
CAPTION_PT = 11.0  # 15 px at DPI
TITLE_PT = 13.0
GAP_PX = 12  # between cells and around the grid
CAPTION_PAD_PX = 4  # between an image and its caption
MAX_CAPTION_LINES = 5


def _wrap(text: str, width_px: float, measure) -> list[str]:
    """Greedy word wrap by measured width; a caption of more than MAX_CAPTION_LINES lines is cut with an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > MAX_CAPTION_LINES:
        lines = lines[:MAX_CAPTION_LINES]
        lines[-1] += " …"
    return lines or [""]


def grid_figure(images: torch.Tensor, captions: list[str], *, ncols: int = 4, title: str | None = None):
    """The grid as a matplotlib Figure (see the module docstring); `save_grid` writes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, H, W); got shape {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"one caption per image: got {len(captions)} captions for {images.shape[0]} images")
    if ncols < 1:
        raise ValueError(f"ncols must be positive; got {ncols}")
    n, _, height, width = images.shape
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    scale = max(1, round(IMAGE_PX / max(height, width)))
    pixels = images.permute(0, 2, 3, 1).cpu().numpy().repeat(scale, axis=1).repeat(scale, axis=2)  # (n, sH, sW, 3)
    image_h, image_w = height * scale, width * scale
    cols = min(ncols, n)
    rows = math.ceil(n / cols)

    fig = Figure(dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    font = FontProperties(size=CAPTION_PT)
    measure = lambda s: renderer.get_text_width_height_descent(s, font, ismath=False)[0]  # pixels at DPI
    # a caption may reach half a gap into each neighbour's column, so that neighbouring captions never touch
    texts = [
        fig.text(0, 0, "\n".join(_wrap(c, image_w + GAP_PX / 2, measure)), fontsize=CAPTION_PT, ha="center", va="top")
        for c in captions
    ]
    text_h = [t.get_window_extent(renderer).height for t in texts]
    band = [max(text_h[r * cols : (r + 1) * cols]) for r in range(rows)]
    title_h = math.ceil(TITLE_PT * DPI / 72 * 1.5) if title else 0
    fig_w = cols * image_w + (cols + 1) * GAP_PX
    fig_h = title_h + sum(image_h + CAPTION_PAD_PX + math.ceil(b) for b in band) + (rows + 1) * GAP_PX
    fig.set_size_inches(fig_w / DPI, fig_h / DPI)

    top = fig_h - GAP_PX - title_h  # pixels from the bottom edge
    for k in range(n):
        r, c = divmod(k, cols)
        if c == 0 and r > 0:
            top -= image_h + CAPTION_PAD_PX + math.ceil(band[r - 1]) + GAP_PX
        left = GAP_PX + c * (image_w + GAP_PX)
        ax = fig.add_axes((left / fig_w, (top - image_h) / fig_h, image_w / fig_w, image_h / fig_h))
        ax.imshow(pixels[k], interpolation="nearest")
        ax.set_axis_off()
        texts[k].set_position(((left + image_w / 2) / fig_w, (top - image_h - CAPTION_PAD_PX) / fig_h))
    if title:
        fig.text(0.5, 1 - (GAP_PX / 2) / fig_h, title, fontsize=TITLE_PT, ha="center", va="top")
    return fig


def save_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | os.PathLike,
    *,
    ncols: int = 4,
    title: str | None = None,
) -> pathlib.Path:
    """Save (n, 3, H, W) images (uint8, or float in [0, 1]) with one caption each as a PNG grid; returns the path."""
    fig = grid_figure(images, captions, ncols=ncols, title=title)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
