"""Rendered images (PS3.18 8.3.5 and 9.5): one frame to an 8-bit JPEG or PNG.

Grayscale goes through :func:`pacs.voi.grey` (Modality LUT, the request's ``window`` or
the stored VOI, Presentation LUT), the same pipeline the inference preprocessing uses.
Colour frames are decoded to RGB; palette colour goes through its LUT.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom.pixels.processing import apply_color_lut

from dicomweb.media import JPEG
from pacs.errors import MalformedRequest
from pacs.pixels import StoredImage, decoded_frame
from pacs.voi import FUNCTIONS, Window, grey

THUMBNAIL_SIZE = 128


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
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 100:
                raise MalformedRequest(f"quality must be 1..100, not {value!r}")
            quality = int(value)
        # Anything else (a viewer's cache buster) is ignored, as for searches (PS3.18 8.3.4).
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
    if function not in FUNCTIONS:
        raise MalformedRequest(f"window function must be one of {', '.join(FUNCTIONS)}")
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
        # The LUT's own entry size (PS3.3 C.7.6.3.1.5: 8 or 16 bits), not the pixels'.
        return _to_uint8(rgb, int(ds.RedPaletteColorLookupTableDescriptor[2]))
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        return _to_uint8(frame, int(ds.get("BitsStored", 8)))
    return grey(frame, ds, window, levels=255)


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
