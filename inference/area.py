"""Area resampling of integer colour frames, summed exactly instead of in float32.

MONAI's ``Resize`` in "area" mode is PyTorch's adaptive average pooling: output pixel
``i`` is the mean of input pixels ``floor(i * n / m)`` to ``ceil((i + 1) * n / m)``.
For a 2048x2048 colour photograph that means converting 12.6 M samples to float32 and
pooling them, 26 ms of the 47 ms its preprocessing took. The same means follow from
summing the stored integers window by window (exactly) and dividing once at the end,
so only the sums ever become floats, and the zero border that a crop pads the image
with is never written out: it counts only in the window sizes. The result is within a
float32 rounding of MONAI's (which sums rounded floats); the tests hold the two
together.
"""

from __future__ import annotations

import numpy as np


def windows(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-end input index of each output's window, as ATen computes
    them for adaptive average pooling (exact integer floor and ceiling)."""
    index = np.arange(out, dtype=np.int64)
    return (index * size) // out, -((-(index + 1) * size) // out)


def longest_side(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """The output shape of MONAI's ``Resize(size, size_mode="longest")``."""
    scale = size / max(shape)
    rows, columns = (round(s * scale) for s in shape)
    return rows, columns


def area_resize(
    frame: np.ndarray,
    canvas: tuple[int, int],
    offset: tuple[int, int],
    out: tuple[int, int],
    top: int,
) -> np.ndarray:
    """(channels, rows, columns) float32: the area means of ``frame / top`` resized to
    ``out``, ``frame`` (rows, columns, channels, integers) lying at ``offset`` in a
    zero canvas of shape ``canvas``."""
    columns, channels = frame.shape[1:]
    row_starts, row_ends = windows(canvas[0], out[0])
    column_starts, column_ends = windows(canvas[1], out[1])
    row_counts, column_counts = row_ends - row_starts, column_ends - column_starts
    # Sized by the type's range, not by ``top``: stray high bits must not wrap around.
    tall = int(np.iinfo(frame.dtype).max) * int(row_counts.max())
    sums = _sums(frame, row_starts, row_ends, offset[0], _counter(tall))
    # Columns: the same over the flattened (column, channel) axis, each channel on its own.
    flat = sums.reshape(out[0], columns * channels)
    column_sums = _sums(
        flat.T,
        column_starts,
        column_ends,
        offset[1],
        _counter(tall * int(column_counts.max())),
        interleave=channels,
    ).T.reshape(out[0], out[1], channels)
    counts = np.outer(row_counts, column_counts).astype(np.float64) * float(top)
    means = (column_sums / counts[..., None]).astype(np.float32)
    return np.ascontiguousarray(means.transpose(2, 0, 1))


def _counter(largest: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned type that holds sums up to ``largest`` (narrow is fast)."""
    for kind in (np.uint16, np.uint32):
        if largest <= np.iinfo(kind).max:
            return kind
    return np.uint64


def _sums(
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    offset: int,
    dtype: type[np.unsignedinteger],
    *,
    interleave: int = 1,
) -> np.ndarray:
    """Sums along the first axis over canvas windows ``[start, end)``; the canvas is
    ``data`` from ``offset`` on and zero elsewhere. With ``interleave`` n, the first axis
    holds n channels per position, each summed on its own. Windows are a few pixels
    long, so they are summed a slab at a time: the j-th pixel of every window at once."""
    channel = np.arange(interleave)
    length = data.shape[0] // interleave
    sums = np.zeros((len(starts) * interleave, *data.shape[1:]), dtype)
    for j in range(int((ends - starts).max())):
        position = starts + j - offset
        inside = (starts + j < ends) & (position >= 0) & (position < length)
        rows = (position[:, None] * interleave + channel).ravel()
        if inside.all():
            sums += data[rows]
        elif inside.any():
            keep = np.flatnonzero(np.repeat(inside, interleave))
            sums[keep] += data[rows[keep]]
    return sums
