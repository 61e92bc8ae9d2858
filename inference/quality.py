"""Whether an image can be read by its model at all: the quality gate before inference.

A model given a photograph too dark to grade, a blurred or burnt-out radiograph, or a
fundus camera's field of view narrowed by a small pupil still answers with numbers, and
those numbers read as a result. Screening programmes grade such images "ungradable" and
recall them; so does the gate: an image outside its manifest's thresholds is not
assessable, with what was measured, and never reported as negative.

Everything is measured on the model's own input (its tensor taken back to intensities
in [0, 1], at the resolution the model sees), so a blur too fine for the model to notice
is not held against the image, the cost is that of a small image, and every path of
:mod:`inference.preprocess` is judged alike. The fundus field of view is the one measure
taken on the photograph itself, since the crop to the field is part of preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from models.manifest import Preprocessing, Quality

# Intensities at or beyond these ends of [0, 1] are taken as clipped.
BLACK, WHITE = 0.02, 0.98
# The fundus field: pixels whose channel mean is above this, as the circle crop finds it.
FIELD_THRESHOLD = 0.1
_FIELD_SIDE = 512  # the field of view is found on a view of about this many pixels a side


@dataclass(frozen=True)
class Shortfall:
    """One limit an image misses: the measure, its value, the limit, and the words."""

    measure: str  # as the report names it, e.g. "mean brightness"
    value: float
    limit: float
    text: str

    def __str__(self) -> str:
        return self.text


class NotAssessable(ValueError):
    """An image outside its model's quality limits; the message says what was measured.

    ``source`` (the image's header, set by whoever read it) and ``report`` (the SOP
    Instance UID of the report that says so, once written) travel with it.
    """

    def __init__(
        self,
        measures: Measures,
        shortfalls: list[Shortfall],
        *,
        where: str = "",
        source: Dataset | None = None,
    ) -> None:
        said = "; ".join(map(str, shortfalls))
        super().__init__(f"not assessable: {where}: {said}" if where else f"not assessable: {said}")
        self.measures = measures
        self.shortfalls = shortfalls
        self.source = source
        self.report = ""


@dataclass(frozen=True)
class Measures:
    """What the gate measured, on the model's input unless said otherwise."""

    brightness: float  # mean intensity over the field
    underexposed: float  # fraction of the field at black
    overexposed: float  # fraction of the field at white
    contrast: float  # standard deviation of intensity over the field
    sharpness: float  # variance of the 4-neighbour Laplacian over the field
    field_of_view: float | None = None  # fundus: field diameter / shorter side of the photo

    def named(self) -> list[tuple[str, float]]:
        """Each measure as the report names it, with its value."""
        return [(NAMES[k], v) for k, v in vars(self).items() if v is not None]


# How a report and a reason name each measure.
NAMES = {
    "brightness": "mean brightness",
    "underexposed": "fraction at black",
    "overexposed": "fraction at white",
    "contrast": "intensity standard deviation",
    "sharpness": "variance of the Laplacian",
    "field_of_view": "field of view",
}


def intensities(tensor: np.ndarray, p: Preprocessing) -> np.ndarray:
    """The model input as (rows, columns) intensities in [0, 1]: the manifest's
    normalisation and intensity range undone, channels averaged."""
    chw = np.asarray(tensor, dtype=np.float64)
    if p.mean is not None and p.std is not None:
        chw = chw * np.asarray(p.std)[:, None, None] + np.asarray(p.mean)[:, None, None]
    low, high = p.intensity_range
    unit = (chw - low) / (high - low)
    result: np.ndarray = np.clip(unit.mean(axis=0), 0.0, 1.0)
    return result


def field_mask(shape: tuple[int, int], p: Preprocessing) -> np.ndarray:
    """Where the image is in the model input: for a fundus crop the disc inscribed in the
    square (the padding and the black corners are not the eye), else everywhere."""
    if p.crop != "circle":
        return np.ones(shape, dtype=bool)
    rows, columns = np.ogrid[0 : shape[0], 0 : shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    radius = min(shape) / 2
    inside: np.ndarray = (rows - cy) ** 2 + (columns - cx) ** 2 <= radius**2
    return inside


def field_of_view(frame: np.ndarray, top: int) -> float:
    """A colour photograph's bright field: its widest extent over the shorter side of
    the photograph (1 when the field fills the frame, as on most fundus cameras)."""
    step = max(1, max(frame.shape[:2]) // _FIELD_SIDE)
    view = frame[::step, ::step].astype(np.float32).mean(axis=2) / top
    found = extent(view > FIELD_THRESHOLD)
    if found is None:
        return 0.0
    widest = max(s.stop - s.start for s in found) * step
    return float(min(1.0, widest / min(frame.shape[:2])))


def extent(bright: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns that hold a bright pixel; None when none does."""
    rows = np.flatnonzero(bright.any(axis=1))
    columns = np.flatnonzero(bright.any(axis=0))
    if rows.size == 0 or columns.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def measure(tensor: np.ndarray, p: Preprocessing, field: float | None = None) -> Measures:
    image = intensities(tensor, p)
    mask = field_mask(image.shape, p)
    inside = image[mask]
    laplacian = np.zeros_like(image)
    laplacian[1:-1, 1:-1] = (
        image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:]
    ) - 4 * image[1:-1, 1:-1]
    interior = np.zeros_like(mask)
    interior[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
    interior[1:-1, 1:-1] &= mask[1:-1, :-2] & mask[1:-1, 2:]
    edges = laplacian[interior]
    return Measures(
        brightness=float(inside.mean()),
        underexposed=float((inside <= BLACK).mean()),
        overexposed=float((inside >= WHITE).mean()),
        contrast=float(inside.std()),
        sharpness=float(edges.var()) if edges.size else 0.0,
        field_of_view=field,
    )


def shortfalls(measures: Measures, quality: Quality) -> list[Shortfall]:
    """Each limit the image misses, with the value measured and the limit."""
    found = []

    def least(key: str, limit: float | None, words: str, shown: str) -> None:
        value = getattr(measures, key)
        if limit is not None and value is not None and value < limit:
            text = f"{words}: {NAMES[key]} {value:{shown}} (at least {limit:{shown}})"
            found.append(Shortfall(NAMES[key], value, limit, text))

    def most(key: str, limit: float | None, words: str) -> None:
        value = getattr(measures, key)
        if limit is not None and value > limit:
            end = NAMES[key].split()[-1]
            text = f"{words}: {value:.1%} of the image at {end} (at most {limit:.0%})"
            found.append(Shortfall(NAMES[key], value, limit, text))

    least("brightness", quality.min_brightness, "too dark", ".3f")
    most("underexposed", quality.max_underexposed, "underexposed")
    most("overexposed", quality.max_overexposed, "overexposed")
    least("contrast", quality.min_contrast, "too little contrast", ".3f")
    least("sharpness", quality.min_sharpness, "blurred", ".2e")
    least("field_of_view", quality.min_field_of_view, "field of view too small", ".0%")
    return found


def gate(tensor: np.ndarray, p: Preprocessing, quality: Quality, field: float | None) -> None:
    """Raise :class:`NotAssessable` naming every limit the model input misses."""
    measures = measure(tensor, p, field)
    missed = shortfalls(measures, quality)
    if missed:
        raise NotAssessable(measures, missed)
