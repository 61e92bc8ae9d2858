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


@dataclass(frozen=True)
class _Resized:
    """How the canvas (the crop, or the square it was padded to) became the tensor: its
    padding inside the canvas, its size once resized, the shift from resized-image to
    tensor indices, and image pixels per resized pixel."""

    pad_r: int
    pad_c: int
    new_r: int
    new_c: int
    shift_r: int
    shift_c: int
    per_r: float
    per_c: float


def _resized(placement: Placement, p: Preprocessing) -> _Resized:
    out_r, out_c = p.size
    height, width = placement.height, placement.width
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
    return _Resized(
        pad_r, pad_c, new_r, new_c, shift_r, shift_c, canvas_r / new_r, canvas_c / new_c
    )


def to_image(box: Box, placement: Placement | None, p: Preprocessing) -> Box | None:
    """``box`` in tensor pixels to image pixels; None without a placement."""
    if placement is None:
        return None
    z = _resized(placement, p)
    top, left, height, width = placement.top, placement.left, placement.height, placement.width
    # In the resized image: before the padding or crop, and before the mirroring, which
    # the preprocessing applies to the resized image.
    r_top, r_bottom = box.top - z.shift_r, box.bottom - z.shift_r
    r_left, r_right = box.left - z.shift_c, box.right - z.shift_c
    if placement.flipped:
        r_left, r_right = z.new_c - r_right, z.new_c - r_left

    def clamp(value: float, limit: int) -> float:
        return min(max(value, 0.0), float(limit))

    return Box(
        top + clamp(r_top * z.per_r - z.pad_r, height),
        left + clamp(r_left * z.per_c - z.pad_c, width),
        top + clamp(r_bottom * z.per_r - z.pad_r, height),
        left + clamp(r_right * z.per_c - z.pad_c, width),
    )


def on_image(activation: np.ndarray, placement: Placement, p: Preprocessing) -> np.ndarray:
    """A (rows, columns) map over the input tensor, resampled onto every pixel of the
    stored image (float32, rows x columns of the image): bilinear between cell centres,
    0 where the tensor did not come from (outside the crop, the padding). The inverse
    of :func:`to_image` for points, applied to each pixel centre."""
    z = _resized(placement, p)
    cells_r, cells_c = activation.shape
    out_r, out_c = p.size
    rows = np.arange(placement.rows, dtype=np.float64) + 0.5
    columns = np.arange(placement.columns, dtype=np.float64) + 0.5
    # Image pixel centre -> resized image -> tensor.
    t_r = (rows - placement.top + z.pad_r) / z.per_r + z.shift_r
    resized_c = (columns - placement.left + z.pad_c) / z.per_c
    if placement.flipped:
        resized_c = z.new_c - resized_c
    t_c = resized_c + z.shift_c
    inside_r = (rows >= placement.top) & (rows < placement.top + placement.height)
    inside_c = (columns >= placement.left) & (columns < placement.left + placement.width)
    inside_r &= (t_r >= 0) & (t_r < out_r)
    inside_c &= (t_c >= 0) & (t_c < out_c)
    weights_r = _linear(t_r * cells_r / out_r - 0.5, cells_r) * inside_r[:, None]
    weights_c = _linear(t_c * cells_c / out_c - 0.5, cells_c) * inside_c[:, None]
    grid: np.ndarray = weights_r @ np.asarray(activation, dtype=np.float64) @ weights_c.T
    return grid.astype(np.float32)


def _linear(position: np.ndarray, cells: int) -> np.ndarray:
    """Linear interpolation weights (points x cells) at fractional cell indices,
    clamped to the first and last cell."""
    position = np.clip(position, 0.0, cells - 1.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    fraction = position - low
    weights = np.zeros((position.size, cells))
    index = np.arange(position.size)
    np.add.at(weights, (index, low), 1.0 - fraction)
    np.add.at(weights, (index, high), fraction)
    return weights


def _shift(resized: int, target: int) -> int:
    """Tensor index minus resized-image index along one axis."""
    if resized < target:
        return (target - resized) // 2
    return -(resized // 2 - target // 2)
