"""Preprocessing stored instances into model inputs, per the zoo's manifests."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from monai.transforms.croppad.array import SpatialPad
from monai.transforms.spatial.array import Resize
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

import inference.preprocess
from inference.area import area_resize, longest_side
from inference.preprocess import Unusable, _transforms, circle_crop, face_left, preprocess
from models.manifest import Preprocessing
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY
from pacs.voi import grey
from scripts.synthetic_corpus import Patient, Rng, chest_dx, encode, fundus_op, mammography

PATIENT = Patient("PRE", "Pre^Process", "ISO_IR 192", "19700101", "O")


def _stream(ds: Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


def test_chest_xray_tensor_and_monochrome1() -> None:
    frontal, _lateral = chest_dx(Rng(1), PATIENT, 0.1, "20260101", "A1")
    tensor = preprocess(_stream(frontal), CHEST_XRAY.preprocessing)
    assert tensor.shape == (1, 224, 224)
    assert tensor.dtype == np.float32
    assert -1024 <= tensor.min() < tensor.max() <= 1024
    inverted = copy.deepcopy(frontal)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    flipped = preprocess(_stream(inverted), CHEST_XRAY.preprocessing)
    assert np.allclose(flipped, -tensor, atol=1e-3)  # [-1024, 1024] is symmetric


def test_compressed_storage_gives_the_same_tensor() -> None:
    frontal, _ = chest_dx(Rng(2), PATIENT, 0.1, "20260101", "A2")
    reference = preprocess(_stream(frontal), CHEST_XRAY.preprocessing)
    for syntax in (RLELossless, JPEGLSLossless):
        compressed = encode(copy.deepcopy(frontal), syntax)
        assert np.array_equal(preprocess(_stream(compressed), CHEST_XRAY.preprocessing), reference)


def test_fundus_rgb_and_ybr_are_normalised_colour() -> None:
    right, _left = fundus_op(Rng(3), PATIENT, 0.1, "20260101", "A3")
    tensor = preprocess(_stream(right), FUNDUS.preprocessing)
    assert tensor.shape == (3, 512, 512)
    assert abs(float(tensor.mean())) < 3
    jpeg = encode(copy.deepcopy(right), JPEGBaseline8Bit)
    lossy = preprocess(_stream(jpeg), FUNDUS.preprocessing)
    assert np.abs(lossy - tensor).mean() < 0.2  # YBR decoded to RGB, lossy but close


def test_colour_and_grayscale_mismatch_is_unusable() -> None:
    right, _ = fundus_op(Rng(4), PATIENT, 0.1, "20260101", "A4")
    with pytest.raises(Unusable, match="takes grayscale"):
        preprocess(_stream(right), CHEST_XRAY.preprocessing)
    frontal, _ = chest_dx(Rng(4), PATIENT, 0.1, "20260101", "A4")
    with pytest.raises(Unusable, match="takes colour"):
        preprocess(_stream(frontal), FUNDUS.preprocessing)


def test_mammograms_face_left_with_aspect_kept() -> None:
    views = mammography(Rng(5), PATIENT, 0.05, "20260101", "A5")
    for ds in views:
        tensor = preprocess(_stream(ds), MAMMOGRAPHY.preprocessing)
        assert tensor.shape == (1, 1024, 512)
        half = tensor.shape[-1] // 2
        assert tensor[..., :half].sum() >= tensor[..., half:].sum(), ds.ImageLaterality


def test_face_left_and_circle_crop_geometry() -> None:
    image = np.zeros((1, 10, 20), np.float32)
    image[..., 15:] = 1.0
    assert face_left(image)[..., :5].sum() == 50
    disc = np.zeros((3, 40, 60), np.float32)
    yy, xx = np.mgrid[:40, :60]
    disc[:, (yy - 20) ** 2 + (xx - 30) ** 2 < 15**2] = 0.8
    cropped, _ = circle_crop(disc)
    assert cropped.shape == (3, 29, 29)
    with pytest.raises(Unusable, match="black"):
        circle_crop(np.zeros((3, 8, 8), np.float32))


@pytest.mark.parametrize(("rows", "columns"), [(125, 102), (102, 125), (124, 101), (90, 90)])
def test_cropping_before_the_window_gives_the_same_tensor(rows: int, columns: int) -> None:
    """The chest X-ray's centre crop is taken before the grayscale pipeline; the tensor
    must be the one of windowing the whole frame and then cropping with MONAI."""
    frontal, _ = chest_dx(Rng(4), PATIENT, 0.05, "20260101", "A4")
    pixels = np.random.default_rng(rows * columns).integers(0, 4096, (rows, columns))
    frontal.Rows, frontal.Columns = rows, columns
    frontal.PixelData = pixels.astype(np.uint16).tobytes()
    spec = CHEST_XRAY.preprocessing
    whole = grey(pixels.astype(np.uint16), frontal)[None]
    expected = _transforms(spec.model_dump_json())(torch.from_numpy(whole))
    assert np.array_equal(preprocess(_stream(frontal), spec), np.asarray(expected))


@pytest.mark.parametrize(("rows", "columns"), [(20, 29), (29, 20), (21, 30), (25, 25)])
def test_circle_crop_pads_as_monai_does(rows: int, columns: int) -> None:
    field = np.random.default_rng(rows).uniform(0.2, 1.0, (3, rows, columns)).astype(np.float32)
    image = np.zeros((3, rows + 6, columns + 9), np.float32)
    image[:, 2 : 2 + rows, 5 : 5 + columns] = field
    side = max(rows, columns)
    expected = SpatialPad((side, side))(torch.from_numpy(field))
    assert np.array_equal(circle_crop(image)[0], np.asarray(expected))


@pytest.mark.parametrize(
    ("shape", "canvas", "offset", "out", "bits"),
    [
        ((1885, 1885), (1885, 1885), (0, 0), (512, 512), 8),  # a full-size fundus
        ((50, 40), (50, 40), (0, 0), (17, 13), 8),  # windows that overlap
        ((33, 45), (45, 45), (6, 0), (64, 64), 8),  # padded rows, enlarged
        ((80, 100), (100, 100), (10, 0), (37, 37), 8),
        ((70, 64), (70, 70), (0, 3), (70, 70), 16),  # same size: only the padding
        ((9, 7), (9, 7), (0, 0), (20, 30), 16),
    ],
)
def test_area_resize_is_monai_resize_of_the_padded_floats(
    shape: tuple[int, int],
    canvas: tuple[int, int],
    offset: tuple[int, int],
    out: tuple[int, int],
    bits: int,
) -> None:
    top = 2**bits - 1
    frame = np.random.default_rng(shape[0]).integers(0, top + 1, (*shape, 3))
    frame = frame.astype(np.uint8 if bits == 8 else np.uint16)
    floats = np.zeros((3, *canvas), np.float32)
    rows, columns = offset[0] + shape[0], offset[1] + shape[1]
    floats[:, offset[0] : rows, offset[1] : columns] = frame.transpose(2, 0, 1) / np.float32(top)
    expected = np.asarray(Resize(spatial_size=out, mode="area")(torch.from_numpy(floats)))
    resized = area_resize(frame, canvas, offset, out, top)
    assert resized.dtype == np.float32
    assert np.allclose(resized, expected, rtol=0, atol=1e-6)


def test_area_resize_sums_stray_high_bits_without_wrapping() -> None:
    """Values above Bits Stored are scaled as the float path scales them, not wrapped."""
    frame = np.full((40, 40, 3), 65535, np.uint16)
    resized = area_resize(frame, (40, 40), (0, 0), (8, 8), 4095)
    assert np.allclose(resized, 65535 / 4095, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2048, 1536), (1536, 2048), (700, 701), (300, 2)])
def test_longest_side_is_monai_resize(shape: tuple[int, int]) -> None:
    resize = Resize(spatial_size=512, size_mode="longest", mode="area")
    expected = resize(torch.zeros((1, *shape))).shape[1:]
    assert longest_side(shape, 512) == tuple(expected)


def _fundus_frame(rows: int, columns: int, seed: int, bits: int = 8) -> np.ndarray:
    """A bright disc off the centre with dark margins of different widths, and pixels
    whose channel mean lies just either side of the crop's threshold."""
    top = 2**bits - 1
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, int(0.05 * top), (rows, columns, 3))
    yy, xx = np.mgrid[:rows, :columns]
    centre, radius = (rows * 0.45, columns * 0.55), min(rows, columns) * 0.35
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    frame[disc] = rng.integers(int(0.2 * top), top + 1, (int(disc.sum()), 3))
    below = int(0.3 * top)  # the largest channel sum not above 3 * 0.1 * top
    frame[rows - 3, 2] = _split(below + 1)  # inside the field: widens the crop
    frame[1, columns - 2] = _split(below)  # outside: would widen it the other way
    return frame.astype(np.uint8 if bits == 8 else np.uint16)


def _split(total: int) -> tuple[int, int, int]:
    third = total // 3
    return third, third, total - 2 * third


def _float_path(frame: np.ndarray, spec: Preprocessing, top: int) -> np.ndarray:
    """The colour tensor made the plain way: every sample to float, crop, MONAI resize."""
    chw = np.ascontiguousarray(frame.transpose(2, 0, 1) / np.float32(top), dtype=np.float32)
    if spec.crop == "circle":
        chw, _ = circle_crop(chw)
    return np.asarray(_transforms(spec.model_dump_json())(torch.from_numpy(chw)))


def _colour_instance(frame: np.ndarray, bits: int) -> Dataset:
    right, _left = fundus_op(Rng(7), PATIENT, 0.05, "20260101", "A7")
    right.Rows, right.Columns = frame.shape[:2]
    right.BitsAllocated = right.BitsStored = bits
    right.HighBit = bits - 1
    right.PixelData = frame.tobytes()
    return right


@pytest.mark.parametrize(
    ("rows", "columns", "bits", "crop", "keep_aspect", "size"),
    [
        (1536, 2048, 8, "circle", True, (512, 512)),  # a 4:3 camera
        (301, 257, 8, "circle", True, (512, 512)),  # enlarged
        (400, 300, 16, "circle", True, (128, 128)),
        (300, 500, 8, "none", True, (160, 96)),  # padded to the size after the resize
        (300, 500, 8, "none", False, (64, 80)),
    ],
)
def test_colour_resized_on_integers_is_the_float_pipeline(
    *, rows: int, columns: int, bits: int, crop: str, keep_aspect: bool, size: tuple[int, int]
) -> None:
    """Colour frames are cropped and resized on their stored integers; the tensor must
    be the one of scaling every sample to float and running MONAI's transforms."""
    frame = _fundus_frame(rows, columns, rows + columns, bits)
    spec = FUNDUS.preprocessing.model_copy(
        update={"crop": crop, "keep_aspect": keep_aspect, "size": size}
    )
    expected = _float_path(frame, spec, 2**bits - 1)
    tensor = preprocess(_stream(_colour_instance(frame, bits)), spec)
    assert tensor.shape == expected.shape == (3, *size)
    # Within float32 rounding of the mean, after the normalisation's division by std.
    assert np.allclose(tensor, expected, rtol=0, atol=1e-5)


def test_field_of_view_near_an_integer_cutoff_falls_back_to_floats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threshold that falls on a sum of channels cannot be decided on integers
    (float32 rounding decides it); the crop is then found as circle_crop finds it."""
    monkeypatch.setattr(inference.preprocess, "CIRCLE_THRESHOLD", 0.2)  # 0.2 * 765 = 153
    frame = np.zeros((40, 50, 3), np.uint8)
    frame[10:30, 12:40] = 60
    frame[5, 45] = (51, 51, 51)  # mean exactly 0.2 in reals; float32 puts it above or not
    chw = np.ascontiguousarray(frame.transpose(2, 0, 1) / np.float32(255), dtype=np.float32)
    expected = circle_crop(chw)[0].shape
    rows, columns = inference.preprocess._field_of_view(frame, 255)
    side = max(rows.stop - rows.start, columns.stop - columns.start)
    assert expected == (3, side, side)


@pytest.mark.parametrize(("rows", "columns"), [(333, 256), (333, 255), (200, 301), (90, 64)])
def test_mammograms_flipped_after_the_resize_give_the_same_tensor(rows: int, columns: int) -> None:
    """The breast is turned to face left on the resized image (area windows mirror each
    other); the tensor must be that of flipping the full-size image first."""
    view = mammography(Rng(6), PATIENT, 0.05, "20260101", "A6")[0]
    pixels = np.random.default_rng(rows + columns).integers(0, 4096, (rows, columns))
    pixels[:, columns // 2 :] += 8000  # bright on the right: flipped
    view.Rows, view.Columns = rows, columns
    spec = MAMMOGRAPHY.preprocessing
    for stored in (pixels, pixels[:, ::-1]):
        view.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
        turned = face_left(grey(stored.astype(np.uint16), view)[None])
        expected = np.asarray(_transforms(spec.model_dump_json())(torch.from_numpy(turned)))
        assert np.allclose(preprocess(_stream(view), spec), expected, rtol=0, atol=1e-6)
