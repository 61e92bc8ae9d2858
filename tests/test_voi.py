"""The grayscale pipeline against the formulas of PS3.3 C.11."""

from __future__ import annotations

import numpy as np
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
