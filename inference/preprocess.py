"""A stored DICOM instance to the input tensor a model's manifest describes.

Decoding and the grayscale pipeline are the archive's own (:mod:`pacs.pixels`,
:mod:`pacs.voi`: every transfer syntax the archive accepts, Modality LUT, VOI,
MONOCHROME1); the geometric and intensity steps are MONAI transforms built from the
manifest, except that a colour photograph is cropped and resized on its stored integers
(:mod:`inference.area`: the same tensor within float32 rounding, in half the time). An
image a model cannot use raises :class:`Unusable` with the reason, to be recorded, never
forced through.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal, cast

import numpy as np
import torch
from monai.data.meta_obj import set_track_meta
from monai.transforms.compose import Compose
from monai.transforms.croppad.array import CenterSpatialCrop, ResizeWithPadOrCrop, SpatialPad
from monai.transforms.intensity.array import NormalizeIntensity, ScaleIntensityRange
from monai.transforms.spatial.array import Resize
from pydicom.dataset import Dataset

from inference.area import area_resize, longest_side
from inference.geometry import Placement
from inference.quality import FIELD_THRESHOLD, extent, field_of_view, gate
from models.manifest import Preprocessing, Quality
from pacs.pixels import StoredImage, decoded_frame, read_image
from pacs.voi import grey

set_track_meta(False)  # plain tensors: no metadata bookkeeping per image
CIRCLE_THRESHOLD = FIELD_THRESHOLD  # channel mean in [0, 1]: brighter is inside the fundus


class Unusable(ValueError):
    """An instance the model cannot take; the message is the recorded reason."""


@dataclass(frozen=True)
class Prepared:
    """The model input, and where it lies on the stored image (None where it cannot be
    told, such as a laterality flip after a circular crop)."""

    tensor: np.ndarray
    placement: Placement | None


def preprocess(
    stream: BinaryIO,
    preprocessing: Preprocessing,
    image: StoredImage | None = None,
    quality: Quality | None = None,
) -> np.ndarray:
    """(channels, rows, columns) float32, as the manifest's input without the batch axis.

    ``image`` is the header already read from ``stream``, when the caller has it. With
    ``quality`` the input is gated first (:mod:`inference.quality`): an image outside the
    thresholds raises :class:`~inference.quality.NotAssessable`.
    """
    return prepare(stream, preprocessing, image, quality).tensor


def prepare(
    stream: BinaryIO,
    preprocessing: Preprocessing,
    image: StoredImage | None = None,
    quality: Quality | None = None,
) -> Prepared:
    """:func:`preprocess`, with the placement a report needs to draw on the image."""
    image = image or read_image(stream)
    return prepare_frame(decode(stream, preprocessing, image), image.header, preprocessing, quality)


def decode(stream: BinaryIO, preprocessing: Preprocessing, image: StoredImage) -> np.ndarray:
    """The first frame as the model's colour kind needs it: (rows, columns) stored
    values, or (rows, columns, 3) RGB; :class:`Unusable` for the other kind."""
    if not image.has_pixels:
        raise Unusable("the instance has no pixel data")
    ds = image.header
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if preprocessing.color == "rgb":
        if samples != 3:
            raise Unusable(f"a {photometric} image; the model takes colour photographs")
        return decoded_frame(stream, image, 0, rgb=True)
    if samples != 1 or photometric == "PALETTE COLOR":
        raise Unusable(f"a {photometric} image; the model takes grayscale")
    return decoded_frame(stream, image, 0, rgb=False)


def prepare_frame(
    frame: np.ndarray, ds: Dataset, preprocessing: Preprocessing, quality: Quality | None = None
) -> Prepared:
    """A decoded frame (:func:`decode`, or a picture's pixels with a header that
    describes them) to the model input, gated when ``quality`` is given."""
    tensor, field, placement = _prepared(frame, ds, preprocessing, quality)
    if quality is not None:
        gate(tensor, preprocessing, quality, field)
    return Prepared(tensor, placement)


def _prepared(
    frame: np.ndarray, ds: Dataset, preprocessing: Preprocessing, quality: Quality | None
) -> tuple[np.ndarray, float | None, Placement | None]:
    """The tensor, a colour photograph's field of view when the gate asks for it, and
    the tensor's placement on the image."""
    field = None
    if preprocessing.color == "rgb":
        top = 2 ** int(ds.get("BitsStored", 8)) - 1
        if quality is not None and quality.min_field_of_view is not None:
            field = field_of_view(frame, top)
        if _by_area(preprocessing, frame):
            tensor, found = _colour_by_area(frame, top, preprocessing)
            return tensor, field, found
        chw = _scaled(frame, top)
    else:
        if _crop_first(preprocessing):
            frame = frame[_center_square(frame.shape)]
        chw = grey(frame, ds, stretch=preprocessing.voi == "minmax")[None]
    rows, columns = int(ds.Rows), int(ds.Columns)
    spec = preprocessing.model_dump_json()
    if preprocessing.laterality == "left" and preprocessing.crop == "none":
        # Area windows mirror each other, so the flip waits for the small image.
        flip = faces_right(chw)
        small = _transforms(spec, "resize")(torch.from_numpy(np.ascontiguousarray(chw)))
        small = torch.flip(small, (-1,)) if flip else small
        mirrored = Placement(rows, columns, 0, 0, rows, columns, flipped=flip)
        return np.asarray(_transforms(spec, "after")(small), dtype=np.float32), field, mirrored
    placement = Placement.of_header(rows, columns, preprocessing)
    if preprocessing.laterality == "left":
        chw = face_left(chw)
    if preprocessing.crop == "circle":
        chw, crop = circle_crop(chw)
        if preprocessing.laterality == "none":
            placement = crop
    tensor = _transforms(spec)(torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32)))
    return np.asarray(tensor, dtype=np.float32), field, placement


def _scaled(frame: np.ndarray, top: int) -> np.ndarray:
    """A colour frame as (channels, rows, columns) float32 in [0, 1], in one pass."""
    chw = np.empty((frame.shape[2], *frame.shape[:2]), np.float32)
    np.divide(frame.transpose(2, 0, 1), np.float32(top), out=chw)
    return chw


def _by_area(p: Preprocessing, frame: np.ndarray) -> bool:
    """Whether a colour frame can be cropped and resized on its stored integers
    (:mod:`inference.area`): no centre crop or laterality flip comes between."""
    return frame.dtype.kind == "u" and p.crop in ("none", "circle") and p.laterality == "none"


def _colour_by_area(frame: np.ndarray, top: int, p: Preprocessing) -> tuple[np.ndarray, Placement]:
    """The tensor of the float path below (scale to [0, 1], circle crop padded to a
    square, MONAI's area resize), with the crop found and the resize summed on the
    integers: the full-size frame is never converted to float."""
    canvas: tuple[int, int] = frame.shape[:2]
    offset = (0, 0)
    placement = Placement(*canvas, 0, 0, *canvas)
    if p.crop == "circle":
        rows, columns = _field_of_view(frame, top)
        placement = _crop_placement(frame.shape[:2], rows, columns)
        frame = frame[rows, columns]
        side = max(frame.shape[:2])
        canvas, offset = (side, side), _pad_offsets(frame.shape[:2], side)
    size = longest_side(canvas, max(p.size)) if p.keep_aspect else p.size
    chw = area_resize(frame, canvas, offset, size, top)
    tensor = _transforms(p.model_dump_json(), "after")(torch.from_numpy(chw))
    return np.asarray(tensor, dtype=np.float32), placement


def _crop_placement(shape: tuple[int, ...], rows: slice, columns: slice) -> Placement:
    """A field-of-view crop, padded to a square before it is resized."""
    height, width = rows.stop - rows.start, columns.stop - columns.start
    return Placement(shape[0], shape[1], rows.start, columns.start, height, width, square=True)


def _field_of_view(frame: np.ndarray, top: int) -> tuple[slice, slice]:
    """:func:`circle_crop`'s bounds for ``frame / top``, from integer channel sums when
    the threshold lies far enough between two sums that float32 rounding (a few 1e-7
    of the mean) cannot move a pixel across it; else from the floats as there."""
    channels = frame.shape[2]
    cutoff = float(np.float32(CIRCLE_THRESHOLD)) * channels * top
    if abs(cutoff - round(cutoff)) < 1e-6 * channels * top:
        return _bounds(_scaled(frame, top).mean(axis=0) > CIRCLE_THRESHOLD)
    kind = np.uint16 if channels * np.iinfo(frame.dtype).max < 2**16 else np.uint32
    total: np.ndarray = frame[..., 0].astype(kind)
    for channel in range(1, channels):
        total += frame[..., channel]
    return _bounds(total > math.floor(cutoff))


def _bounds(bright: np.ndarray) -> tuple[slice, slice]:
    found = extent(bright)
    if found is None:
        raise Unusable("no field of view found: the photograph is black")
    return found


def _pad_offsets(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """Where MONAI's SpatialPad (zeros, centred) puts a (rows, columns) image in the
    ``side`` square."""
    widths = cast("Sequence[tuple[int, int]]", SpatialPad((side, side)).compute_pad_width(shape))
    return widths[1][0], widths[2][0]  # after the channel axis


def _crop_first(p: Preprocessing) -> bool:
    """The centre crop commutes with the grayscale pipeline (value by value) unless the
    window comes from the frame's own range or the laterality from its brightness; then
    the pipeline runs over the cropped pixels only."""
    return p.crop == "center" and p.voi == "window" and p.laterality == "none"


def _center_square(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The slices of :class:`_CenterSquare` (MONAI's centre crop), for a 2-D frame."""
    side = min(shape)
    return tuple(CenterSpatialCrop((side, side)).compute_slices(shape))


def faces_right(chw: np.ndarray) -> bool:
    """Whether the breast (the brighter half, chest wall side) is on the right."""
    half = chw.shape[-1] // 2
    return bool(chw[..., half:].sum() > chw[..., :half].sum())


def face_left(chw: np.ndarray) -> np.ndarray:
    """Mirror so the breast is on the left."""
    return np.ascontiguousarray(chw[..., ::-1]) if faces_right(chw) else chw


def circle_crop(chw: np.ndarray) -> tuple[np.ndarray, Placement]:
    """The bounding square of a fundus photograph's circular field of view (pixels
    whose channel mean is above :data:`CIRCLE_THRESHOLD`), and where it lies."""
    rows, columns = _bounds(chw.mean(axis=0) > CIRCLE_THRESHOLD)
    cropped = chw[:, rows, columns]
    side = max(cropped.shape[1:])
    # MONAI's SpatialPad (zeros, centred), written straight into the square: one copy.
    before_rows, before_columns = _pad_offsets(cropped.shape[1:], side)
    padded = np.zeros((chw.shape[0], side, side), chw.dtype)
    padded[
        :,
        before_rows : before_rows + cropped.shape[1],
        before_columns : before_columns + cropped.shape[2],
    ] = cropped
    return padded, _crop_placement(chw.shape[1:], rows, columns)


@functools.cache
def _transforms(spec: str, part: Literal["all", "resize", "after"] = "all") -> Compose:
    """One pipeline per distinct preprocessing (keyed by its JSON: the model is unhashable):
    all of it, or the steps up to the resize, or those after it."""
    p = Preprocessing.model_validate_json(spec)
    steps: list[Callable[..., object]] = []
    if part != "after":
        if p.crop == "center":
            steps.append(_CenterSquare())
        longest = Resize(spatial_size=max(p.size), size_mode="longest", mode="area")
        steps.append(longest if p.keep_aspect else Resize(spatial_size=p.size, mode="area"))
    if part == "resize":
        return Compose(steps)
    if p.keep_aspect:
        steps.append(
            _ChestWallLeft(p.size) if p.laterality == "left" else ResizeWithPadOrCrop(p.size)
        )
    low, high = p.intensity_range
    steps.append(ScaleIntensityRange(0.0, 1.0, low, high))
    if p.mean is not None and p.std is not None:
        steps.append(NormalizeIntensity(subtrahend=p.mean, divisor=p.std, channel_wise=True))
    return Compose(steps)


class _ChestWallLeft:
    """MONAI's ResizeWithPadOrCrop along rows; along columns the left edge stays (the
    chest wall, once the breast faces left): padded or cut on the right, so that a
    breast wider than the input loses its far side (air, the nipple's tip) rather than
    the tissue at the chest wall, and every breast starts at the input's left edge."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor = ResizeWithPadOrCrop((self.size[0], chw.shape[2]))(chw)
        target = self.size[1]
        if rows.shape[2] >= target:
            return rows[:, :, :target]
        return torch.nn.functional.pad(rows, (0, target - rows.shape[2]))


class _CenterSquare:
    """MONAI's centre crop to the largest square the image holds."""

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        side = min(chw.shape[1:])
        cropped: torch.Tensor = CenterSpatialCrop((side, side))(chw)
        return cropped
