"""Tensor boxes mapped back onto the image, checked against the MONAI transforms themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.geometry import Box, peak_box, to_image
from inference.preprocess import _transforms
from models.manifest import Preprocessing
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY

KEEP_ASPECT = MAMMOGRAPHY.preprocessing.model_copy(update={"laterality": "none"})


@pytest.mark.parametrize(
    ("preprocessing", "rows", "columns"),
    [
        (CHEST_XRAY.preprocessing, 500, 410),
        (CHEST_XRAY.preprocessing, 300, 640),
        (KEEP_ASPECT, 830, 640),  # wider than 1:2 once resized: cropped to 512 columns
        (KEEP_ASPECT, 400, 100),  # padded
    ],
)
def test_a_bright_block_maps_back_onto_itself(
    preprocessing: Preprocessing, rows: int, columns: int
) -> None:
    image = np.zeros((1, rows, columns), np.float32)
    top, left = rows // 2 + rows // 8, columns // 2 - columns // 10
    image[:, top : top + rows // 10, left : left + columns // 10] = 1.0
    tensor = np.asarray(_transforms(preprocessing.model_dump_json())(torch.from_numpy(image)))
    low = preprocessing.intensity_range[0]
    hot = np.argwhere(tensor[0] > low + 0.5 * (preprocessing.intensity_range[1] - low))
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    back = to_image(Box(r0, c0, r1, c1), rows, columns, preprocessing)
    assert back is not None
    # Within about one tensor pixel of the block, in image pixels.
    tolerance = max(rows, columns) / min(preprocessing.size) * 1.5 + 1
    assert back.top == pytest.approx(top, abs=tolerance)
    assert back.left == pytest.approx(left, abs=tolerance)
    assert back.bottom == pytest.approx(top + rows // 10, abs=tolerance)
    assert back.right == pytest.approx(left + columns // 10, abs=tolerance)


def test_pixel_dependent_steps_have_no_location() -> None:
    box = Box(0, 0, 10, 10)
    assert to_image(box, 100, 100, FUNDUS.preprocessing) is None  # circular crop
    assert to_image(box, 100, 100, MAMMOGRAPHY.preprocessing) is None  # laterality flip


def test_peak_box_and_polyline() -> None:
    activation = np.zeros((7, 7))
    activation[2, 5] = 1
    box = peak_box(activation, (224, 224))
    assert (box.top, box.left, box.bottom, box.right) == (64, 160, 96, 192)
    assert box.polyline().tolist() == [[160, 64], [192, 64], [192, 96], [160, 96], [160, 64]]
