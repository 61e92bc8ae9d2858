"""The grayscale pipeline against the formulas of PS3.3 C.11."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs.voi import grey


def test_voi_lut_takes_modality_values_and_scales_by_its_output_range() -> None:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    item = Dataset()
    item.LUTDescriptor = [256, 10, 12]  # 256 entries from modality value 10, 12-bit output
    item.LUTData = [min(4095, i * 16) for i in range(256)]
    ds.VOILUTSequence = [item]
    stored = np.arange(0, 300, dtype=np.uint16)
    modality = stored.astype(np.float64) * 2 - 100
    index = np.clip(modality - 10, 0, 255).astype(int)
    expected = np.minimum(4095, index * 16) / 4095.0
    assert np.allclose(grey(stored, ds), expected, atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.allclose(grey(stored, ds), 1 - expected, atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32"])
@pytest.mark.parametrize("stretch", [False, True])
@pytest.mark.parametrize("levels", [None, 255])
def test_the_lookup_table_gives_what_the_formulas_give(
    dtype: str, stretch: bool, levels: int | None
) -> None:
    """Integer frames go through a table indexed by their stored bits (signed values
    included); it must agree with the pipeline applied to each value."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    low, high = max(info.min, -3000), min(info.max, 3000)
    frame = rng.integers(low, high, size=(40, 50), endpoint=True).astype(dtype)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -20
    ds.WindowCenter, ds.WindowWidth = 40, 300
    # A float frame is not looked up: the formulas are applied to each value.
    expected = grey(frame.astype(np.float64), ds, stretch=stretch, levels=levels)
    got = grey(frame, ds, stretch=stretch, levels=levels)
    assert got.dtype == expected.dtype
    assert np.allclose(got, expected, atol=1e-6)


def test_a_wide_32_bit_range_is_computed_value_by_value() -> None:
    """No lookup table over two billion values: the formulas go straight to the pixels."""
    frame = np.array([[-(2**30), 0], [7, 2**30]], dtype=np.int32)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 0, 100
    # PS3.3 C.11.2.1.2 linear: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]
    assert np.allclose(grey(frame, ds), [[0.0, 50 / 99], [57 / 99, 1.0]], atol=1e-6)
