"""What a report should say, computed apart from the pipeline: numpy float64 from the
standard's formulas and the manifest's geometry, then the torch module the model was
exported from.

Pixel values come from pydicom's own decoding of the file; the grayscale steps follow
PS3.3 C.11 (Modality LUT / rescale, VOI LUT or window, MONOCHROME1) written out here;
crops, resizing (area averaging, as adaptive average pooling defines it) and padding
follow the conventions MONAI documents for the transforms the manifest names.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from models.architectures import Screening, backbone, demo_weights
from models.manifest import Manifest, Preprocessing
from models.zoo import TASKS, Task


def _first(value: object) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)  # type: ignore[arg-type]


def grey64(ds: Dataset) -> np.ndarray:
    """Stored values to [0, 1], brighter = whiter, per PS3.3 C.11."""
    stored = np.asarray(ds.pixel_array, dtype=np.float64)
    values = stored * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData  # US values, or OW bytes (little endian files only here)
        table = (
            np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data)
        ).astype(np.float64)
        index = np.clip(np.floor(values) - first, 0, (entries or 65536) - 1).astype(int)
        unit = table[index] / (2.0**bits - 1)
    elif "WindowCenter" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        # C.11.2.1.2.1, function LINEAR
        unit = np.where(
            values <= c - 0.5 - (w - 1) / 2,
            0.0,
            np.where(values > c - 0.5 + (w - 1) / 2, 1.0, (values - (c - 0.5)) / (w - 1) + 0.5),
        )
    else:
        unit = (values - values.min()) / (values.max() - values.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return np.asarray(unit, dtype=np.float64)


def area_resize(chw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Each output pixel is the mean of the input cells [floor(i*n/m), ceil((i+1)*n/m))."""
    out = chw
    for axis, m in zip((1, 2), size, strict=True):
        n = out.shape[axis]
        starts = [(i * n) // m for i in range(m)]
        ends = [-((-(i + 1) * n) // m) for i in range(m)]
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(
            np.stack([moved[s:e].mean(axis=0) for s, e in zip(starts, ends, strict=True)]),
            0,
            axis,
        )
    return out


def pad_or_crop(chw: np.ndarray, size: Sequence[int], *, left: bool = False) -> np.ndarray:
    """Zero padding split evenly (the extra pixel after), then a centred crop whose start
    is centre - size // 2 (MONAI's SpatialPad / CenterSpatialCrop). With ``left`` the
    columns keep their left edge: padded or cut on the right."""
    for axis, target in zip((1, 2), size, strict=True):
        n = chw.shape[axis]
        anchored = left and axis == 2
        if n < target:
            widths = [(0, 0)] * 3
            before = 0 if anchored else (target - n) // 2
            widths[axis] = (before, target - n - before)
            chw = np.pad(chw, widths)
        elif n > target:
            start = 0 if anchored else n // 2 - target // 2
            chw = np.take(chw, range(start, start + target), axis=axis)
    return chw


def tensor64(ds: Dataset, p: Preprocessing) -> np.ndarray:
    """The model input of ``ds`` under preprocessing ``p``, in float64."""
    if p.color == "rgb":
        chw = np.moveaxis(np.asarray(ds.pixel_array, np.float64), -1, 0)
        chw /= 2.0 ** int(ds.BitsStored) - 1
    else:
        chw = grey64(ds)[None]
    if p.laterality == "left":
        half = chw.shape[-1] // 2
        if chw[..., half:].sum() > chw[..., :half].sum():
            chw = chw[..., ::-1]
    if p.crop == "circle":
        bright = chw.mean(axis=0) > 0.1
        rows, columns = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
        chw = chw[:, rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        side = max(chw.shape[1:])
        chw = pad_or_crop(chw, (side, side))
    if p.crop == "center":
        side = min(chw.shape[1:])
        chw = pad_or_crop(chw, (side, side))
    if p.keep_aspect:
        scale = max(p.size) / max(chw.shape[1:])
        chw = area_resize(chw, [round(n * scale) for n in chw.shape[1:]])
        chw = pad_or_crop(chw, p.size, left=p.laterality == "left")
    else:
        chw = area_resize(chw, p.size)
    low, high = p.intensity_range
    chw = low + chw * (high - low)
    if p.mean is not None and p.std is not None:
        chw = (chw - np.asarray(p.mean)[:, None, None]) / np.asarray(p.std)[:, None, None]
    return chw


@functools.cache
def module(task_name: str) -> Screening:
    """The torch module a demo model was exported from (the same seeded weights)."""
    task: Task = next(t for t in TASKS.values() if t.name == task_name)
    screening = Screening(task, backbone(task))
    demo_weights(screening, task, task.seed)
    return screening.eval()


def outputs(manifest: Manifest, ds: Dataset) -> list[np.ndarray]:
    """The torch module's outputs for one image, each without the batch axis."""
    x = torch.from_numpy(tensor64(ds, manifest.preprocessing)[None].astype(np.float32))
    with torch.no_grad():
        return [o[0].double().numpy() for o in module(manifest.name)(x)]


def expected(manifest: Manifest, sources: Sequence[Dataset]) -> dict[str, float]:
    """Tracking identifier -> probability, as the report of ``sources`` must carry them."""
    names = [o.name for o in manifest.outputs]
    if manifest.routing.level == "instance":
        (ds,) = sources
        return {
            label: float(value)
            for spec, values in zip(manifest.outputs, outputs(manifest, ds), strict=True)
            if spec.kind == "scores"
            for label, value in zip(spec.labels, values, strict=True)
        }
    if manifest.task in ("fundus", "glaucoma"):
        # The exam: referable if either eye is, each eye its photograph with the most
        # evidence; so the most referable photograph.
        label = manifest.outputs[1].labels[0]
        return {label: max(float(outputs(manifest, ds)[1][0]) for ds in sources)}
    rule = manifest.aggregation
    assert rule is not None
    reduce: dict[str, Callable[..., Any]] = {"max": np.max, "mean": np.mean}
    breasts: dict[str, list[float]] = defaultdict(list)
    densities = []
    for ds in sources:
        result = outputs(manifest, ds)
        breasts[str(ds.ImageLaterality)].append(float(result[names.index("malignancy")][0]))
        densities.append(result[names.index("density")])
    found = {f"malignancy {side}": float(reduce[rule.per_breast](v)) for side, v in breasts.items()}
    found["malignancy exam"] = float(
        reduce[rule.exam]([found[f"malignancy {side}"] for side in breasts])
    )
    labels = manifest.outputs[names.index("density")].labels
    combined = reduce[rule.density](np.stack(densities), axis=0)
    found.update({f"density {label}": float(v) for label, v in zip(labels, combined, strict=True)})
    return found


def expected_readings(
    manifest: Manifest, sources: Sequence[Dataset]
) -> dict[str, dict[str, float]]:
    """Per eye or breast ("right eye", "left breast"): its numbers, as the report's
    reading of that side must carry them."""
    names = [o.name for o in manifest.outputs]
    sides = {"L": "left", "R": "right"}
    if manifest.task in ("fundus", "glaucoma"):
        eyes: dict[str, list[list[np.ndarray]]] = defaultdict(list)
        for ds in sources:
            eyes[str(ds.ImageLaterality)].append(outputs(manifest, ds))
        read = {}
        for side, runs in eyes.items():
            first, referable = max(runs, key=lambda r: float(r[1][0]))
            if manifest.task == "glaucoma":
                read[f"{sides[side]} eye"] = {
                    "referable glaucoma probability": float(referable[0]),
                    "vertical cup-to-disc ratio": float(first[0]),
                }
                continue
            best = int(np.argmax(first))
            label = manifest.outputs[0].labels[best]
            read[f"{sides[side]} eye"] = {
                f"ICDR grade {label.split()[0]} probability": float(first[best]),
                "referable DR probability": float(referable[0]),
            }
        return read
    if manifest.task != "mammography":
        return {}
    rule = manifest.aggregation
    assert rule is not None
    reduce: dict[str, Callable[..., Any]] = {"max": np.max, "mean": np.mean}
    by_side: dict[str, list[list[np.ndarray]]] = defaultdict(list)
    for ds in sources:
        by_side[str(ds.ImageLaterality)].append(outputs(manifest, ds))
    labels = manifest.outputs[names.index("density")].labels
    found = {}
    for side, runs in by_side.items():
        score = float(reduce[rule.per_breast]([r[names.index("malignancy")][0] for r in runs]))
        density = np.mean([r[names.index("density")] for r in runs], axis=0)
        best = int(np.argmax(density))
        found[f"{sides[side]} breast"] = {
            "Malignancy probability": score,
            f"Density {labels[best]} probability": float(density[best]),
        }
    return found


def reported_readings(sr: Dataset) -> dict[str, dict[str, float]]:
    """The groups of a report that read one side (they name a finding site): the side
    (the tracking identifier before its colon) -> each number by name."""
    found: dict[str, dict[str, float]] = {}
    for group in _groups(sr):
        items = group.get("ContentSequence", [])
        if not any(i.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE for i in items):
            continue
        identifier = next(
            str(i.TextValue)
            for i in items
            if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
        )
        found[identifier.split(":")[0]] = {
            str(i.ConceptNameCodeSequence[0].CodeMeaning): float(
                i.MeasuredValueSequence[0].NumericValue
            )
            for i in items
            if i.ValueType == "NUM"
        }
    return found


FINDING_SITE = "363698007"


def _groups(sr: Dataset) -> list[Dataset]:
    return [group for c in sr.ContentSequence for group in c.get("ContentSequence", [])]


def reported(sr: Dataset) -> dict[str, float]:
    """Tracking identifier -> numeric value of each finding's measurement group of a
    TID 1500 SR (the groups that read a side are :func:`reported_readings`)."""
    found = {}
    for group in _groups(sr):
        items = group.get("ContentSequence", [])
        if any(i.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE for i in items):
            continue
        names = [
            str(i.TextValue)
            for i in items
            if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
        ]
        numbers = [
            float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM"
        ]
        if names and numbers:
            found[names[0]] = numbers[0]
    return found


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))
