"""Where the optic disc is on a fundus photograph: the region a glaucoma reading is
drawn on.

The disc is the brightest round part of the retina, about a seventh of the field of
view across (1.5-1.9 mm in the 12-13 mm a 45-degree camera sees). It is found on the
model input as the window of that size with the highest mean brightness among those
lying wholly inside the field, a classical locator (Sinthanayothin et al. 1999 use the
highest local variance; the brightest window is the simpler choice that holds on
photographs without lesions brighter than the disc). A photograph whose field cannot be
found gives no region, never a guessed one.

Pure numpy over the tensor, tested without a model.
"""

from __future__ import annotations

import numpy as np

from inference.geometry import Box, Placement, to_image
from inference.quality import FIELD_THRESHOLD, extent, intensities
from models.manifest import Preprocessing

DISC_FRACTION = 1 / 7  # the disc's diameter over the field of view's


def disc_in_tensor(image: np.ndarray) -> Box | None:
    """The disc's box in a (rows, columns) intensity image in [0, 1]."""
    field = image > FIELD_THRESHOLD
    found = extent(field)
    if found is None:
        return None
    rows, columns = found
    diameter = max(rows.stop - rows.start, columns.stop - columns.start)
    side = max(3, round(diameter * DISC_FRACTION))
    brightness = _window_means(image, side)
    inside = _window_means(field.astype(np.float64), side) >= 0.999
    if not inside.any():
        return None
    scores = np.where(inside, brightness, -1.0)
    top, left = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return Box(float(top), float(left), float(top + side), float(left + side))


def optic_disc(tensor: np.ndarray, placement: Placement | None, p: Preprocessing) -> Box | None:
    """The disc on the stored image; None when the field or the placement is unknown."""
    box = disc_in_tensor(intensities(tensor, p))
    return None if box is None else to_image(box, placement, p)


def _window_means(image: np.ndarray, side: int) -> np.ndarray:
    """Mean of every ``side`` x ``side`` window, indexed by its top-left pixel (a
    summed-area table: one pass, whatever the window)."""
    table = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = image.cumsum(axis=0).cumsum(axis=1)
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    means: np.ndarray = sums / (side * side)
    return means
