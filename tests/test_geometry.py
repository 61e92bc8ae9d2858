"""Tensor boxes mapped back onto the image, checked against the MONAI transforms themselves."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.geometry import Box, Placement, on_image, peak_box, to_image
from inference.preprocess import _transforms, prepare
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
    placement = Placement.of_header(rows, columns, preprocessing)
    back = to_image(Box(r0, c0, r1, c1), placement, preprocessing)
    assert back is not None
    # Within about one tensor pixel of the block, in image pixels.
    tolerance = max(rows, columns) / min(preprocessing.size) * 1.5 + 1
    assert back.top == pytest.approx(top, abs=tolerance)
    assert back.left == pytest.approx(left, abs=tolerance)
    assert back.bottom == pytest.approx(top + rows // 10, abs=tolerance)
    assert back.right == pytest.approx(left + columns // 10, abs=tolerance)


@pytest.mark.parametrize(
    ("preprocessing", "rows", "columns"),
    [
        (CHEST_XRAY.preprocessing, 500, 410),
        (CHEST_XRAY.preprocessing, 300, 640),
        (KEEP_ASPECT, 830, 640),
        (KEEP_ASPECT, 400, 100),
    ],
)
def test_a_map_of_the_tensor_lies_back_on_the_image_where_its_pixels_came_from(
    preprocessing: Preprocessing, rows: int, columns: int
) -> None:
    """The tensor of a bright block, taken as a map of itself (one cell a tensor pixel),
    resampled onto the image: bright where the block is, dark elsewhere, and nothing
    where the tensor shows no part of the image."""
    image = np.zeros((1, rows, columns), np.float32)
    top, left = rows // 2 + rows // 8, columns // 2 - columns // 10
    image[:, top : top + rows // 10, left : left + columns // 10] = 1.0
    tensor = np.asarray(_transforms(preprocessing.model_dump_json())(torch.from_numpy(image)))
    low, high = preprocessing.intensity_range
    activation = (tensor[0] - low) / (high - low)
    placement = Placement.of_header(rows, columns, preprocessing)
    assert placement is not None
    values = on_image(activation, placement, preprocessing)
    assert values.shape == (rows, columns)
    hot = np.argwhere(values > 0.5)
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    tolerance = max(rows, columns) / min(preprocessing.size) * 1.5 + 1
    assert (r0, c0) == pytest.approx((top, left), abs=tolerance)
    assert (r1, c1) == pytest.approx((top + rows // 10, left + columns // 10), abs=tolerance)
    # Outside the part of the image the tensor shows, nothing.
    shown = np.zeros((rows, columns), bool)
    p = placement
    shown[p.top : p.top + p.height, p.left : p.left + p.width] = True
    assert not values[~shown].any()


def test_pixel_dependent_steps_have_no_location_from_the_header() -> None:
    box = Box(0, 0, 10, 10)
    assert Placement.of_header(100, 100, FUNDUS.preprocessing) is None  # circular crop
    assert Placement.of_header(100, 100, MAMMOGRAPHY.preprocessing) is None  # laterality flip
    assert to_image(box, None, CHEST_XRAY.preprocessing) is None


def _instance(pixels: np.ndarray) -> io.BytesIO:
    """A Part 10 stream of a grey (2-D) or colour (rows, columns, 3) image."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    bits = 8 if colour else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    stream = io.BytesIO()
    ds.save_as(stream, enforce_file_format=True)
    stream.seek(0)
    return stream


def test_a_fundus_field_of_view_maps_back_onto_the_photograph() -> None:
    """The circular crop is found in the pixels: the whole tensor is the disc's square."""
    image = np.zeros((300, 420, 3), np.uint8)
    yy, xx = np.mgrid[:300, :420]
    image[(yy - 160) ** 2 + (xx - 250) ** 2 < 100**2] = (200, 90, 40)
    prepared = prepare(_instance(image), FUNDUS.preprocessing)
    back = to_image(Box(0, 0, 512, 512), prepared.placement, FUNDUS.preprocessing)
    assert back is not None
    assert (back.top, back.left, back.bottom, back.right) == pytest.approx(
        (61, 151, 260, 350), abs=1.5
    )
    # A map of the whole tensor covers the disc's square on the photograph, and only it.
    assert prepared.placement is not None
    values = on_image(np.ones((8, 8)), prepared.placement, FUNDUS.preprocessing)
    hot = np.argwhere(values > 0.5)
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    assert (r0, c0, r1, c1) == pytest.approx((61, 151, 260, 350), abs=1.5)


@pytest.mark.parametrize("right", [False, True])
def test_a_block_on_a_mirrored_breast_maps_back_onto_itself(right: bool) -> None:
    """A breast facing right is mirrored before the model: a box the model gives is
    mirrored back onto the side of the image it came from."""
    image = np.zeros((800, 600), np.uint16)
    breast = (slice(0, 800), slice(300, 600) if right else slice(0, 300))
    image[breast] = 1000
    block = (slice(400, 480), slice(420, 470) if right else slice(130, 180))
    image[block] = 4000
    prepared = prepare(_instance(image), MAMMOGRAPHY.preprocessing)
    assert prepared.placement is not None
    assert prepared.placement.flipped is right
    hot = np.argwhere(prepared.tensor[0] > 0.9)
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    back = to_image(Box(r0, c0, r1, c1), prepared.placement, MAMMOGRAPHY.preprocessing)
    assert back is not None
    tolerance = 800 / 1024 * 2 + 1
    expected = (400, block[1].start, 480, block[1].stop)
    assert (back.top, back.left, back.bottom, back.right) == pytest.approx(expected, abs=tolerance)
    # The tensor as a map of itself lies back on the same side, mirrored back.
    values = on_image(prepared.tensor[0] > 0.9, prepared.placement, MAMMOGRAPHY.preprocessing)
    hot = np.argwhere(values > 0.5)
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    assert (r0, c0, r1, c1) == pytest.approx(expected, abs=tolerance)


def test_peak_box_and_polyline() -> None:
    activation = np.zeros((7, 7))
    activation[2, 5] = 1
    box = peak_box(activation, (224, 224))
    assert (box.top, box.left, box.bottom, box.right) == (64, 160, 96, 192)
    assert box.polyline().tolist() == [[160, 64], [192, 64], [192, 96], [160, 96], [160, 64]]


def test_a_breast_wider_than_the_input_keeps_its_chest_wall() -> None:
    """A mammogram wider than 1:2 once resized: the columns beyond the input are cut on
    the far side, never at the chest wall (where the breast meets the left edge once
    turned): a block against the chest wall is in the model input and maps back."""
    image = np.zeros((800, 700), np.uint16)
    image[:, :560] = 1000  # the breast, against the chest wall on the left
    image[300:360, 4:40] = 4000  # at the chest wall
    prepared = prepare(_instance(image), MAMMOGRAPHY.preprocessing)
    assert prepared.placement is not None
    assert prepared.placement.flipped is False
    hot = np.argwhere(prepared.tensor[0] > 0.9)
    assert hot.size, "the tissue at the chest wall was cut off"
    (r0, c0), (r1, c1) = hot.min(axis=0), hot.max(axis=0) + 1
    back = to_image(Box(r0, c0, r1, c1), prepared.placement, MAMMOGRAPHY.preprocessing)
    assert back is not None
    tolerance = 800 / 1024 * 2 + 1
    assert (back.top, back.left, back.bottom, back.right) == pytest.approx(
        (300, 4, 360, 40), abs=tolerance
    )
    # The input's first column is the image's first: the chest wall.
    assert prepared.tensor[0, 512, 0] > 0.1
