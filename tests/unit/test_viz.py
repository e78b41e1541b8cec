"""Image grids: tiles in rows, labels and the legend whole."""

from __future__ import annotations

import numpy as np
import torch

from tokenflow.viz import image_grid


def test_a_grid_widens_for_whole_labels_and_stacks_multiline_labels_and_a_title():
    rows = [torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)]
    plain = image_grid(rows, scale=2)
    assert plain.size == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    long = "a caption much longer than the two tiles of this row together, kept whole"
    labelled = image_grid(rows, [long, "first line\nsecond line"], scale=2, title="legend: + pass, - fail")
    assert labelled.width > plain.width  # the longest label fits
    assert labelled.height == 12 + 2 * (16 + 24 + 2) + 2  # title line, two-line labels
    pixels = np.asarray(labelled)
    tile_top = 12 + 2 + 24 + 16 + 24 + 2  # second row's first tile (title, row 1, row 2's labels)
    assert (pixels[tile_top : tile_top + 16, 2:18] == 255).all()  # the white (ones) tile
    assert (pixels[12 + 2 + 24 : 12 + 2 + 24 + 16, 2:18] == 0).all()  # the black (zeros) tile
