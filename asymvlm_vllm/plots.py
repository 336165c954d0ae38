"""PNG figures drawn with PIL and numpy (no plotting library): the paper's Fig. 2 and Fig. 3.

``save_gap_histogram`` draws the distribution of importance gaps with the two thresholds of the
threshold budget; ``save_importance_heatmap`` draws an image, its per-patch importance and which
patches were kept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["save_gap_histogram", "save_importance_heatmap", "save_keep_mask"]

# Gap histogram layout (pixels). The plot box is where bars live; data x maps linearly onto
# [left, right] over the range spanned by the gaps and the thresholds.
HIST_SIZE = (720, 440)
HIST_PLOT_BOX = (70, 50, 700, 380)  # left, top, right, bottom
BAR_COLOR = (70, 130, 180)
GAP_LOW_COLOR = (230, 120, 20)
GAP_HIGH_COLOR = (200, 30, 30)
AXIS_COLOR = (0, 0, 0)
BACKGROUND = (255, 255, 255)

# Heatmap layout: three panels of the (fitted) image size side by side.
PANEL_MARGIN = 12
PANEL_HEADER = 26
PANEL_FOOTER = 40
HEAT_ALPHA = 0.6
DROPPED_BRIGHTNESS = 0.25

# Anchor colours of an inferno-like colormap, low to high.
_COLORMAP_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    dtype=np.float64,
)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _format_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values inside [lo, hi] (about ``count`` of them)."""
    span = hi - lo
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def gap_axis_range(gaps: Sequence[float], thresholds: tuple[float, float] | None = None) -> tuple[float, float]:
    """The x range of :func:`save_gap_histogram`: spans every gap and both thresholds."""
    values = np.asarray(gaps, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if thresholds is not None:
        lo, hi = min(lo, *thresholds), max(hi, *thresholds)
    if hi - lo < 1e-12:  # one distinct value: give the bar some width
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def gap_to_pixel(value: float, lo: float, hi: float) -> int:
    """Column of gap ``value`` in a histogram whose x range is ``[lo, hi]``."""
    left, _, right, _ = HIST_PLOT_BOX
    return int(round(left + (value - lo) / (hi - lo) * (right - left)))


def save_gap_histogram(
    gaps: Sequence[float],
    path: str | os.PathLike,
    thresholds: tuple[float, float] | None = None,
    title: str = "",
    bins: int = 30,
) -> Path:
    """Write a PNG histogram of importance gaps (the paper's Fig. 3).

    Parameters
    ----------
    gaps : sequence of float, shape (S,)
        One importance gap per image, ``S >= 1``, all finite.
    path : where to write the PNG (parent directories are created)
    thresholds : (gap_low, gap_high), optional
        The threshold budget's two gap thresholds, drawn as labelled vertical lines.
    title : str
    bins : int
        Number of equal-width bins over the x range (:func:`gap_axis_range`).

    Returns
    -------
    Path : the written file, ``HIST_SIZE`` pixels.
    """
    values = np.asarray(gaps, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"gaps must be a 1-D sequence, got shape {values.shape}")
    if values.size == 0:
        raise ValueError("gaps is empty: nothing to plot")
    if not np.isfinite(values).all():
        raise ValueError(f"gaps must be finite, got {int((~np.isfinite(values)).sum())} NaN/inf value(s)")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if thresholds is not None:
        if len(thresholds) != 2:
            raise ValueError(f"thresholds must be (gap_low, gap_high), got {thresholds!r}")
        thresholds = (float(thresholds[0]), float(thresholds[1]))
        if not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"thresholds must be finite, got {thresholds!r}")
        if thresholds[0] > thresholds[1]:
            raise ValueError(f"gap_low must be <= gap_high, got {thresholds!r}")

    lo, hi = gap_axis_range(values, thresholds)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    left, top, right, bottom = HIST_PLOT_BOX
    img = Image.new("RGB", HIST_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    small, large = _font(12), _font(15)

    y_max = max(int(counts.max()), 1)
    y_ticks = [t for t in _nice_ticks(0, y_max, 5) if float(t).is_integer()] or [0, y_max]
    y_top = max(y_max, int(y_ticks[-1]))

    def y_pixel(count: float) -> int:
        return int(round(bottom - count / y_top * (bottom - top - 10)))

    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        if count:
            x0, x1 = gap_to_pixel(a, lo, hi), gap_to_pixel(b, lo, hi)
            draw.rectangle([x0, y_pixel(count), max(x1 - 1, x0), bottom - 1], fill=BAR_COLOR, outline=(40, 80, 120))

    draw.line([left, bottom, right, bottom], fill=AXIS_COLOR, width=1)
    draw.line([left, top, left, bottom], fill=AXIS_COLOR, width=1)
    for tick in _nice_ticks(lo, hi, 6):
        x = gap_to_pixel(tick, lo, hi)
        draw.line([x, bottom, x, bottom + 5], fill=AXIS_COLOR)
        label = _format_number(tick)
        draw.text((x - _text_width(draw, label, small) / 2, bottom + 8), label, fill=AXIS_COLOR, font=small)
    for tick in y_ticks:
        y = y_pixel(tick)
        draw.line([left - 5, y, left, y], fill=AXIS_COLOR)
        label = str(int(tick))
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill=AXIS_COLOR, font=small)
    x_label = "importance gap (upper-quartile score - lower-quartile score)"
    draw.text(((left + right - _text_width(draw, x_label, small)) / 2, bottom + 28), x_label, fill=AXIS_COLOR, font=small)
    draw.text((8, top - 22), "images", fill=AXIS_COLOR, font=small)
    heading = title or f"importance gaps of {values.size} image(s)"
    draw.text(((HIST_SIZE[0] - _text_width(draw, heading, large)) / 2, 12), heading, fill=AXIS_COLOR, font=large)

    if thresholds is not None:
        for name, value, color, row in (("gap_low", thresholds[0], GAP_LOW_COLOR, 0),
                                        ("gap_high", thresholds[1], GAP_HIGH_COLOR, 1)):
            x = gap_to_pixel(value, lo, hi)
            draw.line([x, top, x, bottom - 1], fill=color, width=1)
            label = f"{name} = {_format_number(value)}"
            width = _text_width(draw, label, small)
            # Labels sit right of their line unless that runs off the plot.
            tx = x + 4 if x + 4 + width <= right else x - 4 - width
            draw.text((tx, top + 2 + 16 * row), label, fill=color, font=small)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _as_array(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (h, w) grid, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def apply_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (shape + (3,)) along the inferno-like ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_COLORMAP_ANCHORS) - 2)
    frac = (position - low)[..., None]
    rgb = _COLORMAP_ANCHORS[low] * (1 - frac) + _COLORMAP_ANCHORS[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def heatmap_panel_size(image_size: tuple[int, int], max_side: int = 320) -> tuple[int, int]:
    """(width, height) of each panel: the image scaled so its longer side is ``max_side``."""
    w, h = image_size
    scale = max_side / max(w, h)
    return max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def heatmap_figure_size(image_size: tuple[int, int], max_side: int = 320) -> tuple[int, int]:
    """(width, height) of the PNG :func:`save_importance_heatmap` writes for an image of ``image_size``."""
    pw, ph = heatmap_panel_size(image_size, max_side)
    return 3 * pw + 4 * PANEL_MARGIN, PANEL_HEADER + ph + PANEL_FOOTER


def patch_box(row: int, col: int, grid: tuple[int, int], panel: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end-exclusive, of patch (row, col) within a panel of size ``panel``."""
    (gh, gw), (pw, ph) = grid, panel
    return (col * pw // gw, row * ph // gh, (col + 1) * pw // gw, (row + 1) * ph // gh)


def save_importance_heatmap(image: Image.Image, scores, kept, path: str | os.PathLike, max_side: int = 320,
                            title: str = "") -> Path:
    """Write the paper's Fig. 2: the image, its token-importance heatmap, and the kept/dropped mask.

    Panels, left to right: the image; the image overlaid (alpha ``HEAT_ALPHA``) with the scores
    min-max normalised and colour-mapped, one block per patch (nearest-neighbour upsampling, so
    each block is exactly one vision token); the image with dropped patches darkened to
    ``DROPPED_BRIGHTNESS`` and greyed. A colour bar and the kept count sit below.

    Parameters
    ----------
    image : PIL.Image
        The picture the scores belong to (any mode; shown as RGB).
    scores : array or Tensor, shape (h, w)
        Importance of each patch on the patch grid, finite.
    kept : array or Tensor, shape (h, w), bool
        True where the vision token was kept.
    path : where to write the PNG (parent directories are created)
    max_side : int
        Longer side of each panel in pixels (the image is scaled to it).
    title : str

    Returns
    -------
    Path : the written file, :func:`heatmap_figure_size` pixels.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    score_grid = _as_array(scores, "scores").astype(np.float64)
    kept_grid = _as_array(kept, "kept")
    if score_grid.shape != kept_grid.shape:
        raise ValueError(f"scores {score_grid.shape} and kept {kept_grid.shape} must have the same (h, w) shape")
    if not np.isfinite(score_grid).all():
        raise ValueError("scores must be finite (found NaN or inf)")
    if kept_grid.dtype != np.bool_:
        if not np.isin(kept_grid, (0, 1)).all():
            raise ValueError(f"kept must be a bool mask, got dtype {kept_grid.dtype} with values other than 0/1")
        kept_grid = kept_grid.astype(bool)
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")

    panel = heatmap_panel_size(image.size, max_side)
    pw, ph = panel
    base = np.asarray(image.convert("RGB").resize(panel, Image.BILINEAR), dtype=np.float64)

    span = score_grid.max() - score_grid.min()
    normalised = (score_grid - score_grid.min()) / span if span > 0 else np.full_like(score_grid, 0.5)
    heat_small = Image.fromarray(apply_colormap(normalised))
    heat = np.asarray(heat_small.resize(panel, Image.NEAREST), dtype=np.float64)
    overlay = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * heat

    kept_pixels = np.asarray(Image.fromarray(kept_grid.astype(np.uint8) * 255).resize(panel, Image.NEAREST)) > 0
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    masked = np.where(kept_pixels[..., None], base, grey * DROPPED_BRIGHTNESS)

    width, height = heatmap_figure_size(image.size, max_side)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    small = _font(12)
    num_kept, num_tokens = int(kept_grid.sum()), int(kept_grid.size)
    headings = ["image", "token importance", f"kept {num_kept} of {num_tokens} vision tokens"]
    if title:
        headings[0] = title
    for i, (pixels, heading) in enumerate(zip((base, overlay, masked), headings)):
        x0 = PANEL_MARGIN + i * (pw + PANEL_MARGIN)
        figure.paste(Image.fromarray(np.round(pixels).clip(0, 255).astype(np.uint8)), (x0, PANEL_HEADER))
        draw.text((x0, 6), heading, fill=AXIS_COLOR, font=small)

    # Legend under the heatmap: the colour ramp from low to high importance.
    bar_x0 = PANEL_MARGIN + pw + PANEL_MARGIN
    bar_y = PANEL_HEADER + ph + 8
    bar_w = max(pw - 80, 16)
    ramp = apply_colormap(np.linspace(0, 1, bar_w))[None].repeat(10, axis=0)
    figure.paste(Image.fromarray(ramp), (bar_x0 + 30, bar_y))
    draw.text((bar_x0, bar_y - 2), "low", fill=AXIS_COLOR, font=small)
    draw.text((bar_x0 + 34 + bar_w, bar_y - 2), "high", fill=AXIS_COLOR, font=small)
    # Legend under the mask: a kept and a dropped swatch.
    mask_x0 = PANEL_MARGIN + 2 * (pw + PANEL_MARGIN)
    draw.rectangle([mask_x0, bar_y, mask_x0 + 10, bar_y + 10], fill=(255, 255, 255), outline=AXIS_COLOR)
    draw.text((mask_x0 + 14, bar_y - 2), "kept", fill=AXIS_COLOR, font=small)
    dark = int(255 * DROPPED_BRIGHTNESS)
    dropped_label = "dropped (darkened)"
    x, y = mask_x0 + 60, bar_y
    if x + 14 + _text_width(draw, dropped_label, small) > width:  # a narrow (tall) picture: on the next line
        x, y = mask_x0, bar_y + 14
    draw.rectangle([x, y, x + 10, y + 10], fill=(dark, dark, dark), outline=AXIS_COLOR)
    draw.text((x + 14, y - 2), dropped_label, fill=AXIS_COLOR, font=small)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG")
    return path


def save_keep_mask(kept, path: str | os.PathLike, image: Image.Image | None = None, cell: int = 16) -> Path:
    """Write the kept/dropped mask alone as a PNG.

    Parameters
    ----------
    kept : array or Tensor, shape (h, w), bool
        True where the vision token was kept.
    path : where to write the PNG (parent directories are created)
    image : PIL.Image, optional
        When given, the mask is drawn over it at its size (dropped patches darkened to
        ``DROPPED_BRIGHTNESS`` and greyed); otherwise kept cells are white and dropped ones
        black, ``cell`` pixels each, size ``(w * cell, h * cell)``.
    cell : int

    Returns
    -------
    Path : the written file.
    """
    kept_grid = _as_array(kept, "kept")
    if kept_grid.dtype != np.bool_:
        if not np.isin(kept_grid, (0, 1)).all():
            raise ValueError(f"kept must be a bool mask, got dtype {kept_grid.dtype} with values other than 0/1")
        kept_grid = kept_grid.astype(bool)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    if image is None:
        size = (kept_grid.shape[1] * cell, kept_grid.shape[0] * cell)
        figure = Image.fromarray(kept_grid.astype(np.uint8) * 255).resize(size, Image.NEAREST).convert("RGB")
    else:
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
        base = np.asarray(image.convert("RGB"), dtype=np.float64)
        kept_pixels = np.asarray(Image.fromarray(kept_grid.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)) > 0
        grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
        pixels = np.where(kept_pixels[..., None], base, grey * DROPPED_BRIGHTNESS)
        figure = Image.fromarray(np.round(pixels).clip(0, 255).astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG")
    return path
