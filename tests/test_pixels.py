"""Native grayscale frames read in one go are what pydicom's decoder gives."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs.pixels import decoded_frame, read_image
from tests.support.instances import ct_instance, part10

CASES = [
    # bits allocated, bits stored, signed, lowest, highest (as stored, unused bits too)
    (16, 12, False, 0, 4095),
    (16, 12, False, 0, 65535),  # garbage above bit 11
    (16, 12, True, -2048, 2047),
    (16, 12, True, -32768, 32767),  # garbage, sign to be taken from bit 11
    (16, 16, True, -32768, 32767),
    (16, 16, False, 0, 65535),
    (8, 8, False, 0, 255),
    (8, 6, False, 0, 255),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_grey_frames_match_pydicom(
    case: tuple[int, int, bool, int, int], syntax: str
) -> None:
    allocated, stored, signed, low, high = case
    rng = np.random.default_rng(allocated * 100 + stored)
    dtype = f"<{'i' if signed else 'u'}{allocated // 8}"
    frames = rng.integers(low, high, size=(3, 9, 7), endpoint=True).astype(dtype)
    ds = ct_instance()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.Rows, ds.Columns = 9, 7
    ds.NumberOfFrames = 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = frames.tobytes()
    data = part10(ds)
    stream = io.BytesIO(data)
    image = read_image(stream)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
    for index in range(3):
        got = decoded_frame(stream, image, index, rgb=False)
        assert got.dtype == expected.dtype
        assert np.array_equal(got, expected[index])
