"""The optic disc locator on synthetic fundus images whose disc the test places."""

from __future__ import annotations

import numpy as np
import pytest

from inference.disc import disc_in_tensor


def _fundus(size: int, disc: tuple[int, int], radius: int, seed: int = 0) -> np.ndarray:
    """A circular field of retina (mid grey, noisy, darker towards the rim) with a
    bright disc at ``disc``."""
    rng = np.random.default_rng(seed)
    rows, columns = np.ogrid[0:size, 0:size]
    centre = (size - 1) / 2
    distance = np.hypot(rows - centre, columns - centre) / (size / 2)
    image = np.where(distance <= 1.0, 0.45 - 0.15 * distance, 0.0)
    image = image + np.where(distance <= 1.0, rng.normal(0, 0.03, (size, size)), 0.0)
    spot = np.hypot(rows - disc[0], columns - disc[1]) <= radius
    image[spot] = 0.9
    return np.clip(image, 0.0, 1.0)


@pytest.mark.parametrize("disc", [(256, 150), (200, 360), (300, 256)])
def test_the_brightest_disc_sized_window_is_found(disc: tuple[int, int]) -> None:
    image = _fundus(512, disc, radius=36)
    box = disc_in_tensor(image)
    assert box is not None
    assert box.top <= disc[0] <= box.bottom
    assert box.left <= disc[1] <= box.right
    # About a seventh of the field across, whatever the disc's own size.
    assert box.bottom - box.top == pytest.approx(512 / 7, abs=1)


def test_a_black_photograph_has_no_disc() -> None:
    assert disc_in_tensor(np.zeros((64, 64))) is None
