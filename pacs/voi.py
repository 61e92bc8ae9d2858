"""The grayscale pipeline of PS3.3 C.11: Modality LUT, VOI, Presentation LUT, to [0, 1].

Shared by rendered images (for a display) and the inference preprocessing (for a model),
so that a radiologist and a model see the same windowed image. Colour data never comes
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi

FUNCTIONS = ("linear", "linear-exact", "sigmoid")
_LUT_LIMIT = 1 << 17


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"


def grey(
    frame: np.ndarray,
    ds: Dataset,
    window: Window | None = None,
    *,
    stretch: bool = False,
    levels: int | None = None,
) -> np.ndarray:
    """A grayscale frame after the whole pipeline, brighter = whiter on the display.

    ``window`` overrides the stored VOI; ``stretch`` ignores it and uses the frame's own
    range. With ``levels`` the result is quantised to uint8 ``0..levels``, else float32
    in [0, 1]. Integer frames go through a lookup table built over their value range.
    """
    if np.issubdtype(frame.dtype, np.integer):
        low, high = int(frame.min()), int(frame.max())
        if frame.itemsize <= 2 or high - low <= _LUT_LIMIT:
            domain = np.arange(low, high + 1).astype(frame.dtype)
            table = _finish(_unit(domain, ds, window, stretch), levels)
            if frame.itemsize > 2:
                wide: np.ndarray = table[frame.astype(np.int64) - low]
                return wide
            # Indexed by the stored bits themselves (signed values wrap to the top half),
            # so the frame is read once and never converted.
            unsigned = np.dtype(f"u{frame.itemsize}")
            lut = np.zeros(1 << (8 * frame.itemsize), table.dtype)
            lut[domain.view(unsigned)] = table
            looked_up: np.ndarray = lut[frame.view(unsigned)]
            return looked_up
    return _finish(_unit(frame, ds, window, stretch), levels)


def _finish(unit: np.ndarray, levels: int | None) -> np.ndarray:
    if levels is None:
        return unit
    return (unit * np.float32(levels) + np.float32(0.5)).astype(np.uint8)


def _unit(stored: np.ndarray, ds: Dataset, window: Window | None, stretch: bool) -> np.ndarray:
    values = modality(stored, ds)
    if stretch:
        unit = stretched(values)
    elif window is not None:
        unit = windowed(values, window)
    elif "VOILUTSequence" in ds:
        unit = voi_lut(values, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = windowed(values, stored_window(ds))
    else:
        unit = stretched(values)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if (photometric == "MONOCHROME1") != (inverse and photometric == "MONOCHROME2"):
        unit = np.float32(1.0) - unit
    return unit


def modality(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to modality values (rescale slope/intercept or the Modality LUT)."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = frame.astype(np.float32)
    if slope != 1 or intercept != 0:
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1: the first VOI LUT over the modality values, its output range
    (0 .. 2^n - 1, n the third LUT Descriptor value) scaled to [0, 1]."""
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    looked_up = apply_voi(np.floor(values).astype(np.int64), ds)
    return (looked_up / np.float32(2**bits - 1)).astype(np.float32)


def stored_window(ds: Dataset) -> Window:
    """The first of the stored windows (PS3.3 C.11.2: the first is the default)."""

    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, MultiValue) else value)

    center = first(ds.WindowCenter)
    width = max(first(ds.WindowWidth), 1.0)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower()
    function = function.replace("_", "-")
    return Window(center, width, function if function in FUNCTIONS else "linear")


def windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 to [0, 1]."""
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function == "sigmoid":
        sigmoid: np.ndarray = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        return sigmoid.astype(np.float32)
    if window.function == "linear-exact":
        low, span = c - w / 2, w
    else:
        low, span = c - np.float32(0.5) - (w - 1) / 2, max(w - 1, np.float32(1))
    out = values - low
    out /= span
    np.clip(out, 0.0, 1.0, out=out)
    return out


def stretched(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32) - np.float32(low)
    out /= np.float32(high - low)
    return out
