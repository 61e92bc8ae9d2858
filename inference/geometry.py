"""Where a box of a model's input tensor lies on the stored image.

The inverse of the manifest's geometric preprocessing (crop, resize, padding) with the
conventions of the MONAI transforms that perform it, so that a location a model gives
(a class activation map's peak) can be drawn on the image a radiologist sees. Steps that
depend on the pixels (a circular field-of-view crop, a laterality flip) cannot be
undone from the header alone: there is then no location.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.manifest import Preprocessing


@dataclass(frozen=True)
class Box:
    """Rows and columns, edges in pixel units (0 = top or left edge of the image)."""

    top: float
    left: float
    bottom: float
    right: float

    def polyline(self) -> np.ndarray:
        """SCOORD POLYLINE of the closed rectangle: (column, row) pairs, PS3.3 C.18.6.1.1."""
        corners = [
            (self.left, self.top),
            (self.right, self.top),
            (self.right, self.bottom),
            (self.left, self.bottom),
            (self.left, self.top),
        ]
        return np.asarray(corners, dtype=np.float32)


def peak_box(activation: np.ndarray, size: tuple[int, int]) -> Box:
    """The cell of a (rows, columns) map with the highest value, in tensor pixels."""
    cells_r, cells_c = activation.shape
    row, column = np.unravel_index(int(np.argmax(activation)), activation.shape)
    height, width = size[0] / cells_r, size[1] / cells_c
    return Box(row * height, column * width, (row + 1) * height, (column + 1) * width)


def to_image(box: Box, rows: int, columns: int, p: Preprocessing) -> Box | None:
    """``box`` in tensor pixels to image pixels; None when the mapping depends on pixels."""
    if p.crop == "circle" or p.laterality != "none":
        return None
    top, left, height, width = 0, 0, rows, columns
    if p.crop == "center":  # CenterSpatialCrop: start = centre - size // 2
        side = min(rows, columns)
        top, left, height, width = rows // 2 - side // 2, columns // 2 - side // 2, side, side
    out_r, out_c = p.size
    if not p.keep_aspect:
        scale_r, scale_c = height / out_r, width / out_c
        return Box(
            top + box.top * scale_r,
            left + box.left * scale_c,
            top + box.bottom * scale_r,
            left + box.right * scale_c,
        )
    # Resize(size_mode="longest") then ResizeWithPadOrCrop: pad split evenly, crop centred.
    scale = max(p.size) / max(height, width)
    new_r, new_c = round(height * scale), round(width * scale)
    shift_r = _shift(new_r, out_r)
    shift_c = _shift(new_c, out_c)
    per_r, per_c = height / new_r, width / new_c

    def clamp(value: float, limit: int) -> float:
        return min(max(value, 0.0), float(limit))

    return Box(
        top + clamp((box.top - shift_r) * per_r, height),
        left + clamp((box.left - shift_c) * per_c, width),
        top + clamp((box.bottom - shift_r) * per_r, height),
        left + clamp((box.right - shift_c) * per_c, width),
    )


def _shift(resized: int, target: int) -> int:
    """Tensor index minus resized-image index along one axis."""
    if resized < target:
        return (target - resized) // 2
    return -(resized // 2 - target // 2)
