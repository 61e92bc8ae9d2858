"""Preprocessing stored instances into model inputs, per the zoo's manifests."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from monai.transforms.croppad.array import SpatialPad
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from inference.preprocess import Unusable, _transforms, circle_crop, face_left, preprocess
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
    cropped = circle_crop(disc)
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
    assert np.array_equal(circle_crop(image), np.asarray(expected))
