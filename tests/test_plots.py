import math

import numpy as np
import pytest
import torch
from PIL import Image

from asymvlm_vllm import plots
from asymvlm_vllm.plots import save_gap_histogram, save_importance_heatmap, save_keep_mask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def open_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def columns_with_color(pixels: np.ndarray, color, rows: slice) -> list[int]:
    hits = (pixels[rows] == np.array(color)).all(axis=2).any(axis=0)
    return [int(x) for x in np.flatnonzero(hits)]


# --- gap histogram -----------------------------------------------------------------------------


def test_histogram_is_a_png_of_the_documented_size(tmp_path):
    path = save_gap_histogram([0.1, 0.2, 0.2, 0.5], tmp_path / "sub" / "gaps.png", title="gaps")
    assert path == tmp_path / "sub" / "gaps.png"
    pixels = open_png(path)
    assert pixels.shape == (plots.HIST_SIZE[1], plots.HIST_SIZE[0], 3) == (440, 720, 3)


def test_threshold_lines_are_drawn_at_their_gap(tmp_path):
    # Gaps span exactly [0, 1], so the x axis is [0, 1] and 0.25 / 0.75 sit at a quarter and
    # three quarters of the plot box, computed here independently of the module's mapping.
    gaps = np.linspace(0.0, 1.0, 50)
    pixels = open_png(save_gap_histogram(gaps, tmp_path / "g.png", thresholds=(0.25, 0.75)))
    left, top, right, bottom = plots.HIST_PLOT_BOX
    inside = slice(top + 40, bottom - 1)  # below the labels
    low_cols = columns_with_color(pixels, plots.GAP_LOW_COLOR, inside)
    high_cols = columns_with_color(pixels, plots.GAP_HIGH_COLOR, inside)
    assert low_cols == [round(left + 0.25 * (right - left))]
    assert high_cols == [round(left + 0.75 * (right - left))]
    # The line spans the plot's height.
    column = pixels[top:bottom, low_cols[0]]
    assert (column == np.array(plots.GAP_LOW_COLOR)).all(axis=1).sum() >= bottom - top - 2


def test_thresholds_outside_the_gaps_extend_the_axis(tmp_path):
    pixels = open_png(save_gap_histogram([0.4, 0.5, 0.6], tmp_path / "g.png", thresholds=(0.0, 1.0)))
    left, top, right, bottom = plots.HIST_PLOT_BOX
    inside = slice(top + 40, bottom - 1)
    assert columns_with_color(pixels, plots.GAP_LOW_COLOR, inside) == [left]
    assert columns_with_color(pixels, plots.GAP_HIGH_COLOR, inside) == [right]


def test_no_threshold_lines_without_thresholds(tmp_path):
    pixels = open_png(save_gap_histogram([0.1, 0.3], tmp_path / "g.png"))
    assert not (pixels == np.array(plots.GAP_LOW_COLOR)).all(axis=2).any()
    assert not (pixels == np.array(plots.GAP_HIGH_COLOR)).all(axis=2).any()


def test_bar_heights_follow_the_counts(tmp_path):
    gaps = [0.0] * 10 + [1.0] * 2 + [0.5] * 5
    pixels = open_png(save_gap_histogram(gaps, tmp_path / "g.png", bins=10))
    left, top, right, bottom = plots.HIST_PLOT_BOX
    bar = (pixels == np.array(plots.BAR_COLOR)).all(axis=2)

    def height_at(gap):
        x = round(left + gap * (right - left))
        x = min(max(x, left + 3), right - 3)  # inside the first/last bar
        return int(bar[top:bottom, x].sum())

    h0, h_mid, h1 = height_at(0.0), height_at(0.55), height_at(1.0)
    assert h0 > h_mid > h1 > 0
    assert h0 / h1 == pytest.approx(10 / 2, rel=0.1)
    assert height_at(0.25) == 0  # empty bin


def test_single_distinct_gap_still_draws_a_bar(tmp_path):
    pixels = open_png(save_gap_histogram([0.3, 0.3, 0.3], tmp_path / "g.png"))
    assert (pixels == np.array(plots.BAR_COLOR)).all(axis=2).sum() > 100


@pytest.mark.parametrize(
    "gaps, kwargs, match",
    [
        ([], {}, "empty"),
        ([0.1, math.nan], {}, "finite"),
        ([0.1, math.inf], {}, "finite"),
        ([[0.1, 0.2]], {}, "1-D"),
        ([0.1], {"thresholds": (0.5, 0.2)}, "gap_low must be <= gap_high"),
        ([0.1], {"thresholds": (0.1, math.nan)}, "finite"),
        ([0.1], {"thresholds": (0.1,)}, "gap_low, gap_high"),
        ([0.1], {"bins": 0}, "bins"),
    ],
)
def test_histogram_rejects_bad_input(tmp_path, gaps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_gap_histogram(gaps, tmp_path / "g.png", **kwargs)
    assert not (tmp_path / "g.png").exists()


# --- importance heatmap ------------------------------------------------------------------------

GRID = (4, 6)


def grey_image(width=240, height=160, value=128):
    return Image.new("RGB", (width, height), (value, value, value))


def panel_patch_mean(pixels, panel_index, row, col, image_size=(240, 160)):
    pw, ph = plots.heatmap_panel_size(image_size)
    x0 = plots.PANEL_MARGIN + panel_index * (pw + plots.PANEL_MARGIN)
    bx0, by0, bx1, by1 = plots.patch_box(row, col, GRID, (pw, ph))
    # The inner part of the patch, away from resampling seams.
    block = pixels[plots.PANEL_HEADER + by0 + 3 : plots.PANEL_HEADER + by1 - 3, x0 + bx0 + 3 : x0 + bx1 - 3]
    return block.reshape(-1, 3).mean(axis=0)


def test_heatmap_is_a_png_of_the_documented_size(tmp_path):
    scores = np.arange(24, dtype=float).reshape(GRID)
    pixels = open_png(save_importance_heatmap(grey_image(), scores, scores > 10, tmp_path / "h.png"))
    # 240x160 fits into 320x213 panels; three panels, four margins, header and footer.
    assert plots.heatmap_panel_size((240, 160)) == (320, 213)
    assert pixels.shape == (26 + 213 + 40, 3 * 320 + 4 * 12, 3)


def test_heatmap_colours_follow_the_scores(tmp_path):
    scores = np.zeros(GRID)
    scores[1, 2] = 5.0  # hottest
    scores[3, 5] = -5.0  # coldest
    pixels = open_png(save_importance_heatmap(grey_image(), scores, np.ones(GRID, bool), tmp_path / "h.png"))
    hot, cold, middle = (panel_patch_mean(pixels, 1, r, c) for r, c in ((1, 2), (3, 5), (0, 0)))
    # Inferno-like ramp: hot is bright yellow-white, cold is near black, the middle in between.
    assert hot.sum() > middle.sum() > cold.sum()
    assert np.abs(hot - cold).max() > 100
    # Same scores, same colour.
    assert np.allclose(middle, panel_patch_mean(pixels, 1, 2, 2))
    # The first panel is the plain image: identical everywhere.
    assert np.allclose(panel_patch_mean(pixels, 0, 1, 2), 128) and np.allclose(panel_patch_mean(pixels, 0, 3, 5), 128)


def test_mask_panel_darkens_dropped_patches(tmp_path):
    kept = np.zeros(GRID, bool)
    kept[0, :3] = True
    kept[2, 4] = True
    scores = np.random.RandomState(0).rand(*GRID)
    image = Image.fromarray(np.full((160, 240, 3), (200, 180, 60), np.uint8))
    pixels = open_png(save_importance_heatmap(image, scores, kept, tmp_path / "h.png"))
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            mean = panel_patch_mean(pixels, 2, r, c)
            if kept[r, c]:
                assert np.allclose(mean, (200, 180, 60), atol=1)
            else:
                assert mean.sum() < 0.3 * (200 + 180 + 60)
                assert np.ptp(mean) < 2  # greyed, not just darker


def test_heatmap_accepts_tensors_and_constant_scores(tmp_path):
    scores = torch.full(GRID, 0.3)
    kept = torch.ones(GRID, dtype=torch.bool)
    pixels = open_png(save_importance_heatmap(grey_image(), scores, kept, tmp_path / "h.png"))
    assert np.allclose(panel_patch_mean(pixels, 1, 0, 0), panel_patch_mean(pixels, 1, 3, 5))


@pytest.mark.parametrize(
    "scores, kept, match",
    [
        (np.zeros(GRID), np.ones((4, 5), bool), "same"),
        (np.zeros(24), np.ones(24, bool), "2-D"),
        (np.full(GRID, np.nan), np.ones(GRID, bool), "finite"),
        (np.zeros((0, 3)), np.ones((0, 3), bool), "empty"),
        (np.zeros(GRID), np.full(GRID, 2), "bool"),
    ],
)
def test_heatmap_rejects_bad_input(tmp_path, scores, kept, match):
    with pytest.raises(ValueError, match=match):
        save_importance_heatmap(grey_image(), scores, kept, tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()


def test_heatmap_needs_a_pil_image(tmp_path):
    with pytest.raises(ValueError, match="PIL"):
        save_importance_heatmap(np.zeros((8, 8, 3)), np.zeros(GRID), np.ones(GRID, bool), tmp_path / "h.png")


# --- keep mask ---------------------------------------------------------------------------------


def test_keep_mask_without_image_is_a_cell_grid(tmp_path):
    kept = np.array([[True, False], [False, True], [True, True]])
    pixels = open_png(save_keep_mask(kept, tmp_path / "m.png", cell=5))
    assert pixels.shape == (15, 10, 3)
    assert (pixels[0:5, 0:5] == 255).all() and (pixels[0:5, 5:10] == 0).all() and (pixels[5:10, 0:5] == 0).all()


def test_keep_mask_over_an_image_darkens_dropped_patches(tmp_path):
    kept = np.array([[True, False]])
    image = Image.new("RGB", (40, 20), (100, 150, 200))
    pixels = open_png(save_keep_mask(kept, tmp_path / "m.png", image=image))
    assert pixels.shape == (20, 40, 3)
    assert (pixels[:, :20] == (100, 150, 200)).all()
    assert (pixels[:, 20:].sum(axis=2) < 0.3 * 450).all()
