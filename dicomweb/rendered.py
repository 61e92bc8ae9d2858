"""Rendered images (PS3.18 8.3.5 and 9.5): one frame to an 8-bit JPEG or PNG.

The grayscale pipeline is the one PS3.3 C.11 describes: Modality LUT (rescale or LUT),
VOI (the request's ``window``, else the stored VOI LUT or window, else the frame's
range), then the Presentation LUT (MONOCHROME1 and INVERSE display inverted). Colour
frames are decoded to RGB; palette colour goes through its LUT.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicomweb.media import JPEG
from pacs.errors import MalformedRequest
from pacs.pixels import StoredImage, decoded_frame

THUMBNAIL_SIZE = 128
_LUT_LIMIT = 1 << 17
_FUNCTIONS = ("linear", "linear-exact", "sigmoid")


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class Viewport:
    """Fit into ``width`` x ``height``; optionally of the source region first (may flip)."""

    width: int
    height: int
    source: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class RenderParams:
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = 90


def parse_params(
    params: Sequence[tuple[str, str]], *, default_viewport: Viewport | None = None
) -> RenderParams:
    """``window``, ``viewport``, ``quality`` (and ``accept``, handled by negotiation)."""
    window: Window | None = None
    viewport = default_viewport
    quality = 90
    for name, value in params:
        if name == "window":
            window = _window(value)
        elif name == "viewport":
            viewport = _viewport(value)
        elif name == "quality":
            if not value.isdigit() or not 1 <= int(value) <= 100:
                raise MalformedRequest(f"quality must be 1..100, not {value!r}")
            quality = int(value)
        elif name != "accept":
            raise MalformedRequest(f"unknown parameter {name!r} for a rendered resource")
    return RenderParams(window, viewport, quality)


def _numbers(name: str, value: str, count: int) -> list[float]:
    parts = value.split(",")
    if len(parts) != count:
        raise MalformedRequest(f"{name} needs {count} comma-separated values, got {value!r}")
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise MalformedRequest(f"{name}: {value!r} is not numeric") from exc


def _window(value: str) -> Window:
    parts = value.split(",")
    if len(parts) != 3:
        raise MalformedRequest(f"window is center,width,function; got {value!r}")
    center, width = _numbers("window", ",".join(parts[:2]), 2)
    function = parts[2].strip().lower()
    if function not in _FUNCTIONS:
        raise MalformedRequest(f"window function must be one of {', '.join(_FUNCTIONS)}")
    if width <= 0 or (function == "linear" and width < 1):
        raise MalformedRequest(f"window width must be positive, not {width}")
    return Window(center, width, function)


def _viewport(value: str) -> Viewport:
    count = len(value.split(","))
    if count not in (2, 6):
        raise MalformedRequest(f"viewport is vw,vh or vw,vh,sx,sy,sw,sh; got {value!r}")
    numbers = [int(n) for n in _numbers("viewport", value, count)]
    if numbers[0] <= 0 or numbers[1] <= 0 or max(numbers[:2]) > 8192:
        raise MalformedRequest("viewport width and height must be 1..8192")
    if count == 2:
        return Viewport(numbers[0], numbers[1])
    sx, sy, sw, sh = numbers[2:]
    if sw == 0 or sh == 0 or sx < 0 or sy < 0:
        raise MalformedRequest("viewport source region must be non-empty and start at >= 0")
    return Viewport(numbers[0], numbers[1], (sx, sy, sw, sh))


def render(
    stream: BinaryIO, image: StoredImage, index: int, params: RenderParams, media_type: str
) -> bytes:
    frame = decoded_frame(stream, image, index, rgb=True)
    pixels = to_display(frame, image, params.window)
    picture = Image.fromarray(pixels)
    if params.viewport is not None:
        picture = _apply_viewport(picture, params.viewport)
    out = io.BytesIO()
    if media_type == JPEG:
        picture.save(out, format="JPEG", quality=params.quality)
    else:
        picture.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def to_display(frame: np.ndarray, image: StoredImage, window: Window | None) -> np.ndarray:
    """An 8-bit array ready to be encoded: grayscale (rows, columns) or RGB (rows, cols, 3)."""
    ds = image.header
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(frame, ds))
        return _to_uint8(rgb, int(ds.get("BitsStored", 8)))
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        return _to_uint8(frame, int(ds.get("BitsStored", 8)))
    if np.issubdtype(frame.dtype, np.integer):
        # Stored values are integers of at most 16 bits: run the pipeline once per
        # distinct value and look the frame up, instead of float maths per pixel.
        low, high = int(frame.min()), int(frame.max())
        if high - low <= _LUT_LIMIT:
            domain = np.arange(low, high + 1).astype(frame.dtype)
            lut = _grey(domain, ds, photometric, window)
            index = frame if low == 0 and frame.dtype.kind == "u" else frame.astype(np.int32) - low
            looked_up: np.ndarray = lut[index]
            return looked_up
    return _grey(frame, ds, photometric, window)


def _grey(stored: np.ndarray, ds: Dataset, photometric: str, window: Window | None) -> np.ndarray:
    values = _modality(stored, ds)
    if window is not None:
        unit = _windowed(values, window)
    elif "VOILUTSequence" in ds:
        unit = _stretch(np.asarray(apply_voi_lut(stored, ds, prefer_lut=True), np.float32))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _windowed(values, _stored_window(ds))
    else:
        unit = _stretch(values)
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if (photometric == "MONOCHROME1") != (inverse and photometric == "MONOCHROME2"):
        unit = 1.0 - unit
    return (unit * 255.0 + 0.5).astype(np.uint8)


def _modality(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = frame.astype(np.float32)
    if slope != 1 or intercept != 0:
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def _stored_window(ds: Dataset) -> Window:
    """The first of the stored windows (PS3.3 C.11.2: the first is the default)."""

    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, MultiValue) else value)

    center = first(ds.WindowCenter)
    width = max(first(ds.WindowWidth), 1.0)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower()
    function = function.replace("_", "-")
    return Window(center, width, function if function in _FUNCTIONS else "linear")


def _windowed(values: np.ndarray, window: Window) -> np.ndarray:
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


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32) - np.float32(low)
    out /= np.float32(high - low)
    return out


def _to_uint8(values: np.ndarray, bits_stored: int) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    shift = max(bits_stored - 8, 0)
    return (values.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)


def _apply_viewport(picture: Image.Image, viewport: Viewport) -> Image.Image:
    if viewport.source is not None:
        sx, sy, sw, sh = viewport.source
        box = (min(sx, sx + sw), min(sy, sy + sh), max(sx, sx + sw), max(sy, sy + sh))
        picture = picture.crop(box)
        if sw < 0:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            picture = picture.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scale = min(viewport.width / picture.width, viewport.height / picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return picture
