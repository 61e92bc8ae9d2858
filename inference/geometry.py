"""Where a box of a model's input tensor lies on the stored image.

The inverse of the manifest's geometric preprocessing (crop, resize, padding) with the
conventions of the MONAI transforms that perform it, so that a location a model gives
(a class activation map's peak) can be drawn on the image a radiologist sees. Steps that
depend on the pixels (a circular field-of-view crop, a laterality flip) are recorded
when the image is preprocessed (:class:`Placement`); from the header alone they cannot
be undone, and there is then no location.
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


@dataclass(frozen=True)
class Placement:
    """Where a model's input tensor came from on the stored image: the part of it the
    tensor shows (a crop), whether that part was padded to a square first (a fundus
    photograph's field of view) and whether it was mirrored (a breast turned to face
    the left edge)."""

    rows: int
    columns: int
    top: int
    left: int
    height: int
    width: int
    square: bool = False
    flipped: bool = False

    @classmethod
    def of_header(cls, rows: int, columns: int, p: Preprocessing) -> Placement | None:
        """What the header alone tells; None when a step depends on the pixels."""
        if p.crop == "circle" or p.laterality != "none":
            return None
        if p.crop == "center":  # CenterSpatialCrop: start = centre - size // 2
            side = min(rows, columns)
            return cls(rows, columns, rows // 2 - side // 2, columns // 2 - side // 2, side, side)
        return cls(rows, columns, 0, 0, rows, columns)


def to_image(box: Box, placement: Placement | None, p: Preprocessing) -> Box | None:
    """``box`` in tensor pixels to image pixels; None without a placement."""
    if placement is None:
        return None
    out_r, out_c = p.size
    top, left, height, width = placement.top, placement.left, placement.height, placement.width
    # The canvas that was resized: the crop, or the square it was padded to (centred,
    # as MONAI's SpatialPad puts it).
    canvas_r, canvas_c, pad_r, pad_c = height, width, 0, 0
    if placement.square:
        side = max(height, width)
        canvas_r = canvas_c = side
        pad_r, pad_c = (side - height) // 2, (side - width) // 2
    if not p.keep_aspect:
        new_r, new_c = out_r, out_c
        shift_r = shift_c = 0
    else:
        # Resize(size_mode="longest") then ResizeWithPadOrCrop: pad split evenly, crop
        # centred; a breast turned to face left keeps its left edge.
        scale = max(p.size) / max(canvas_r, canvas_c)
        new_r, new_c = round(canvas_r * scale), round(canvas_c * scale)
        shift_r, shift_c = _shift(new_r, out_r), _shift(new_c, out_c)
        if p.laterality == "left":
            shift_c = 0
    # In the resized image: before the padding or crop, and before the mirroring, which
    # the preprocessing applies to the resized image.
    r_top, r_bottom = box.top - shift_r, box.bottom - shift_r
    r_left, r_right = box.left - shift_c, box.right - shift_c
    if placement.flipped:
        r_left, r_right = new_c - r_right, new_c - r_left
    per_r, per_c = canvas_r / new_r, canvas_c / new_c

    def clamp(value: float, limit: int) -> float:
        return min(max(value, 0.0), float(limit))

    return Box(
        top + clamp(r_top * per_r - pad_r, height),
        left + clamp(r_left * per_c - pad_c, width),
        top + clamp(r_bottom * per_r - pad_r, height),
        left + clamp(r_right * per_c - pad_c, width),
    )


def _shift(resized: int, target: int) -> int:
    """Tensor index minus resized-image index along one axis."""
    if resized < target:
        return (target - resized) // 2
    return -(resized // 2 - target // 2)
