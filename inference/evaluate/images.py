"""The images an evaluation reads, and each one read to a model input.

Three inputs: a query on the archive with QIDO-RS's keys (``Modality=DX&StudyDate=2024``),
a folder of DICOM files that need not be archived, or a folder of pictures (PNG, JPEG)
as public datasets ship them. An item is a file and how the labels name it; reading it
(:func:`load`) gives the model input by the screening preprocessing
(:func:`inference.preprocess.prepare_frame`) and quality gate, the header values that
routing, aggregation and subgroups need, and how long decoding and preprocessing took.
Everything here is picklable, so that the same :func:`load` runs in a process pool or
on a cluster's workers.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from dicomweb.qido import parse_search
from inference.preprocess import Unusable, decode, prepare_frame
from inference.quality import NotAssessable
from inference.routing import decide, stored_values
from models.manifest import Manifest, Preprocessing
from pacs import pixels
from pacs.archive import Archive
from pacs.errors import PacsError
from pacs.pixels import read_image
from pacs.query import Level, execute
from pacs.store import FsBlobStore

PICTURES = (".png", ".jpg", ".jpeg")
# What is kept of each header: the keys labels may use, what routing, aggregation and
# the subgroups read, and the dates an age is reckoned from.
HEADER = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Modality",
    "BodyPartExamined",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
    "PresentationIntentType",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "PatientSex",
    "PatientAge",
    "PatientBirthDate",
    "StudyDate",
)


class InputError(ValueError):
    """The images cannot be read as asked; the message says why."""


@dataclass(frozen=True)
class Item:
    """One image: its file, how a labels file names it (``path``: relative to the
    folder, or the archive's own), and the sha256 of its bytes when already known."""

    file: str
    path: str
    kind: Literal["dicom", "picture"]
    digest: str = ""
    in_archive: bool = False


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Loaded:
    """An item read: the model input, or why there is none (``reason``), its header
    values, and the seconds spent decoding and preprocessing."""

    tensor: np.ndarray | None
    reason: str
    attributes: dict[str, str]
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    not_assessable: bool = False
    measures: dict[str, float] = field(default_factory=dict)


def from_folder(folder: Path) -> tuple[list[Item], list[Skipped]]:
    """Every DICOM file (Part 10, "DICM" at 128) and picture under ``folder``, in path
    order; anything else is listed as skipped."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    items: list[Item] = []
    skipped: list[Skipped] = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if file.name.startswith("."):
            continue
        if file.suffix.lower() in PICTURES:
            items.append(Item(str(file.resolve()), relative, "picture"))
        elif _is_part10(file):
            items.append(Item(str(file.resolve()), relative, "dicom"))
        else:
            skipped.append(Skipped(relative, "neither a DICOM Part 10 file nor a PNG/JPEG"))
    return items, skipped


def _is_part10(file: Path) -> bool:
    try:
        with file.open("rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def from_archive(archive: Archive, query: str, *, max_keys: int = 64) -> list[Item]:
    """The archive's instances that match a QIDO-RS query string (PS3.18 10.6.1: the
    same keys, wildcards and ranges as ``/instances?...``), in study, series and
    instance order."""
    params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    if any(name in ("limit", "offset", "includefield") for name, _ in params):
        raise InputError("the query selects images: limit, offset and includefield do not apply")
    try:
        search = parse_search(Level.IMAGE, params, max_keys=max_keys)
        with archive.index.reading() as conn:
            rows = list(execute(conn, search.query))
    except PacsError as exc:
        raise InputError(f"query {query!r}: {exc}") from exc
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(str(row["StudyInstanceUID"]), set()).add(str(row["SOPInstanceUID"]))
    if not isinstance(archive.store, FsBlobStore):
        raise InputError(
            "the archive's blobs are in object storage: evaluation reads files, so retrieve "
            "the query's studies to a folder (WADO-RS, getscu) and evaluate that folder"
        )
    items = []
    for study, sops in wanted.items():  # one index read a study, not one an instance
        for record in archive.index.records(study):
            if record.SOPInstanceUID in sops:
                file = archive.store.path(record.path)
                items.append(Item(str(file), record.path, "dicom", record.sha256, in_archive=True))
    items.sort(key=lambda i: i.path)
    return items


def digest(file: str) -> str:
    """sha256 of a file's bytes: the image's identity in the prediction cache."""
    found = hashlib.sha256()
    with open(file, "rb") as stream:
        while chunk := stream.read(1 << 20):
            found.update(chunk)
    return found.hexdigest()


def load(item: Item, manifest: Manifest, max_pixels: int = pixels.LIMITS.max_pixels) -> Loaded:
    """The model input of an item, or the reason there is none: an image the model is
    not for (its routing rules, as screening decides), one it cannot take, or one
    outside the quality gate (not assessable, as screening says). A picture has no
    header to route by: the folder is the choice."""
    pixels.LIMITS.max_pixels = max_pixels
    p = manifest.preprocessing
    started = time.perf_counter()
    attributes: dict[str, str] = {"path": item.path}
    try:
        if item.kind == "picture":
            frame, header = _picture(item, p, max_pixels)
        else:
            with open(item.file, "rb") as stream:
                image = read_image(stream)
                header = image.header
                attributes |= _values(header, manifest)
                decision = decide(stored_values(header), manifest)
                if decision is None or not decision.runs:
                    why = decision.reason if decision else "another modality"
                    return Loaded(None, f"not for {manifest.name}: {why}", attributes)
                frame = decode(stream, p, image)
        decoded = time.perf_counter()
        prepared = prepare_frame(frame, header, p, manifest.quality)
    except NotAssessable as exc:
        measures = {name: float(value) for name, value in exc.measures.named()}
        return Loaded(None, str(exc), attributes, not_assessable=True, measures=measures)
    except Unusable as exc:
        return Loaded(None, str(exc), attributes)
    except Exception as exc:  # one unreadable file (any malformation) is listed, not fatal
        return Loaded(None, f"unreadable: {type(exc).__name__}: {exc}", attributes)
    done = time.perf_counter()
    return Loaded(prepared.tensor, "", attributes, decoded - started, done - decoded)


def _values(header: Dataset, manifest: Manifest) -> dict[str, str]:
    found = {}
    for keyword in dict.fromkeys([*HEADER, *manifest.routing.match]):
        value = header.get(keyword)
        if value is not None and str(value).strip():
            found[keyword] = str(value).strip()
    return found


def _picture(
    item: Item, preprocessing: Preprocessing, max_pixels: int
) -> tuple[np.ndarray, Dataset]:
    """A picture's pixels and a header that describes them as a DICOM image would:
    stored values over their whole bit range (a display-ready picture has no window)."""
    try:
        with Image.open(item.file) as picture:
            columns, rows = picture.size
            if rows * columns > max_pixels:
                raise Unusable(f"{rows} x {columns} pixels is more than max_pixels {max_pixels}")
            frame = _pixels(picture)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise Unusable(f"not a readable picture: {exc}") from exc
    if frame.ndim == 3 and preprocessing.color == "grayscale":
        if not (
            np.array_equal(frame[..., 0], frame[..., 1])
            and np.array_equal(frame[..., 0], frame[..., 2])
        ):
            raise Unusable("a colour picture; the model takes grayscale")
        frame = np.ascontiguousarray(frame[..., 0])
    if frame.ndim == 2 and preprocessing.color == "rgb":
        raise Unusable("a grayscale picture; the model takes colour photographs")
    bits = frame.dtype.itemsize * 8
    header = Dataset()
    header.Rows, header.Columns = frame.shape[:2]
    header.BitsAllocated = header.BitsStored = bits
    header.HighBit = bits - 1
    header.PixelRepresentation = 0
    header.SamplesPerPixel = 3 if frame.ndim == 3 else 1
    header.PhotometricInterpretation = "RGB" if frame.ndim == 3 else "MONOCHROME2"
    if frame.ndim == 2:
        # Linear from 0 to 2^bits - 1 onto [0, 1] (PS3.3 C.11.2.1.2.1's linear function).
        header.WindowCenter = 2 ** (bits - 1)
        header.WindowWidth = 2**bits
    return frame, header


def _pixels(picture: Image.Image) -> np.ndarray:
    if picture.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(picture, dtype=np.uint16)
    if picture.mode == "I":
        values = np.asarray(picture)
        if values.min() < 0 or values.max() > 65535:
            raise Unusable("32-bit picture values outside 0..65535")
        return values.astype(np.uint16)
    if picture.mode in ("L", "1"):
        return np.asarray(picture.convert("L"), dtype=np.uint8)
    # Palette and alpha pictures as RGB: a grey one is told by its equal channels.
    return np.asarray(picture.convert("RGB"), dtype=np.uint8)
