"""Write a synthetic DICOM corpus: chest DX, fundus OP, four-view MG and CT, several syntaxes.

Headers carry what real modalities send for these exams (view position, laterality,
presentation intent, windowing, patient demographics including non-ASCII names), pixel
data is non-zero and shaped like the anatomy closely enough to exercise codecs and
viewers. Everything derives from ``--seed``, so a corpus can be regenerated exactly.

    python -m scripts.synthetic_corpus OUT --patients 20 --scale 0.1
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from scripts.jpeg_lossless import encode_jpeg_lossless

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
OP_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")

# Grey images cycle through these; colour (fundus) ones through the colour list.
GREY_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
)
COLOUR_SYNTAXES: tuple[UID, ...] = (
    JPEGBaseline8Bit,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

_NAMES = (
    ("ISO_IR 192", "Müller^Jürgen"),
    ("ISO_IR 192", "Nguyễn^Thị Lan"),
    ("ISO_IR 100", "Garçon^Amélie"),
    ("", "Smith^John^A^^"),
    ("", "O'Brien^Siobhan"),
    ("ISO_IR 192", "山田^太郎"),
    ("", "Doe^Jane"),
    ("ISO_IR 100", "Åström^Björn"),
)


class Rng:
    """numpy's generator plus UIDs under the 2.25 root (PS3.5 B.2), reproducible by seed."""

    def __init__(self, seed: int) -> None:
        self.np = np.random.default_rng(seed)

    def uid(self) -> str:
        return f"2.25.{int.from_bytes(self.np.bytes(16), 'big')}"

    def choice(self, options: tuple[str, ...]) -> str:
        return options[int(self.np.integers(len(options)))]


@dataclass(frozen=True)
class Patient:
    PatientID: str
    PatientName: str
    SpecificCharacterSet: str
    PatientBirthDate: str
    PatientSex: str


def _patient(rng: Rng, number: int) -> Patient:
    charset, name = _NAMES[number % len(_NAMES)]
    year = 1940 + int(rng.np.integers(60))
    month, day = int(rng.np.integers(1, 13)), int(rng.np.integers(1, 29))
    return Patient(
        PatientID=f"FL{number:06d}",
        PatientName=name,
        SpecificCharacterSet=charset,
        PatientBirthDate=f"{year}{month:02d}{day:02d}",
        PatientSex=rng.choice(("F", "M", "O")) if number % 7 else "F",
    )


def _base(
    rng: Rng,
    patient: Patient,
    *,
    sop_class: UID,
    modality: str,
    study_uid: str,
    series_uid: str,
    study_date: str,
    accession: str,
    series_number: int,
    instance_number: int,
    study_description: str,
    series_description: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if patient.SpecificCharacterSet:
        ds.SpecificCharacterSet = patient.SpecificCharacterSet
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = rng.uid()
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = f"{8 + int(rng.np.integers(10)):02d}{int(rng.np.integers(60)):02d}00"
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "filmless synthetic"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient.PatientName
    ds.PatientID = patient.PatientID
    ds.IssuerOfPatientID = "SGH"
    ds.PatientBirthDate = patient.PatientBirthDate
    ds.PatientSex = patient.PatientSex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[-6:]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.TimezoneOffsetFromUTC = "+0100"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds(value: float) -> str:
    """A decimal string that fits DS's 16 characters."""
    return f"{value:.6g}"


def _grey_pixels(ds: Dataset, image: NDArray[np.uint16], bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = image.astype("<u2").tobytes()


def _chest(rng: Rng, rows: int, columns: int) -> NDArray[np.uint16]:
    """Two dark lung fields in a bright mediastinum and ribs, 12 bits."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    cy, cx = rows * 0.5, columns * 0.5
    body = 2600 - 900 * ((x - cx) / (columns * 0.55)) ** 2
    for side in (-1, 1):
        lung = ((x - cx - side * columns * 0.2) / (columns * 0.16)) ** 2 + (
            (y - cy) / (rows * 0.32)
        ) ** 2
        body -= 1400 * np.sqrt(np.clip(1 - lung, 0, None))
    ribs = 180 * (np.sin(y / max(rows, 1) * 40) > 0.6)
    noise = rng.np.normal(0, 25, size=(rows, columns))
    image: NDArray[np.uint16] = np.clip(body + ribs + noise, 1, 4095).astype(np.uint16)
    return image


def _breast(rng: Rng, rows: int, columns: int, right: bool) -> NDArray[np.uint16]:
    """A half-ellipse of tissue against the chest wall on the image's left or right edge."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    wall = columns - 1 - x if right else x
    shape = (wall / (columns * 0.75)) ** 2 + ((y - rows / 2) / (rows * 0.45)) ** 2
    tissue = np.where(shape < 1, 1800 + 1200 * (1 - shape), 80)
    noise = rng.np.normal(0, 40, size=(rows, columns))
    return np.clip(tissue + noise, 1, 16383).astype(np.uint16)


def _fundus(rng: Rng, size: int, right: bool) -> NDArray[np.uint8]:
    """An orange disc with a bright optic disc and a darker macula on a black field."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    r = np.hypot(x - c, y - c) / (size * 0.46)
    disc_x = c + (0.25 if right else -0.25) * size
    optic = np.hypot(x - disc_x, y - c) < size * 0.07
    macula = np.hypot(x - (2 * c - disc_x), y - c) < size * 0.08
    image = np.zeros((size, size, 3), dtype=np.float32)
    inside = r < 1
    image[inside] = (200, 90, 40)
    image[optic] = (250, 220, 160)
    image[macula & inside] = (140, 50, 20)
    image *= (1.0 - 0.35 * np.clip(r, 0, 1) ** 2)[..., None]
    image += rng.np.normal(0, 4, size=image.shape)
    image[~inside] = 0
    return np.clip(image, 0, 255).astype(np.uint8)


def _ct_slice(rng: Rng, index: int) -> NDArray[np.int16]:
    """A 512x512 abdomen-like slice in Hounsfield units, stored with intercept -1024."""
    y, x = np.mgrid[0:512, 0:512].astype(np.float32)
    r = np.hypot((x - 256) / 200, (y - 256) / (150 + index % 7))
    hu = np.where(r < 1, 40, -1000).astype(np.float32)
    hu = np.where(np.hypot(x - 256, y - 330) < 22, 700, hu)  # spine
    hu += rng.np.normal(0, 12, size=hu.shape)
    return np.clip(hu + 1024, 0, 4095).astype(np.int16)


def chest_dx(rng: Rng, patient: Patient, scale: float, date: str, accession: str) -> list[Dataset]:
    study, series = rng.uid(), rng.uid()
    rows, columns = max(64, int(2500 * scale)), max(52, int(2048 * scale))
    out = []
    for number, view in enumerate(("PA", "LL"), start=1):
        ds = _base(
            rng,
            patient,
            sop_class=DX_FOR_PRESENTATION,
            modality="DX",
            study_uid=study,
            series_uid=series,
            study_date=date,
            accession=accession,
            series_number=1,
            instance_number=number,
            study_description="XR CHEST 2 VIEWS",
            series_description=f"CHEST {view}",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA" if view == "PA" else "LL"
        ds.PatientOrientation = ["P", "F"] if view == "PA" else ["A", "F"]
        ds.ImageLaterality = "U"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [_ds(0.143 / scale)] * 2
        ds.PixelSpacing = ds.ImagerPixelSpacing
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "NONE"
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = [_code("T-D3000", "SRT", "Chest")]
        ds.ViewCodeSequence = [
            _code("R-10214", "SRT", "postero-anterior")
            if view == "PA"
            else _code("R-10236", "SRT", "left lateral")
        ]
        _grey_pixels(ds, _chest(rng, rows, columns), 12)
        out.append(ds)
    return out


def fundus_op(rng: Rng, patient: Patient, scale: float, date: str, accession: str) -> list[Dataset]:
    study, series = rng.uid(), rng.uid()
    size = max(64, int(2048 * scale))
    out = []
    for number, eye in enumerate(("R", "L"), start=1):
        ds = _base(
            rng,
            patient,
            sop_class=OP_8BIT,
            modality="OP",
            study_uid=study,
            series_uid=series,
            study_date=date,
            accession=accession,
            series_number=1,
            instance_number=number,
            study_description="DIABETIC RETINOPATHY SCREENING",
            series_description="COLOR FUNDUS 45",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = eye
        ds.BodyPartExamined = "EYE"
        ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"
        ds.SynchronizationTrigger = "NO TRIGGER"
        ds.AcquisitionTimeSynchronized = "N"
        ds.AcquisitionDateTime = f"{date}{ds.StudyTime}"
        ds.AnatomicRegionSequence = [_code("T-AA000", "SRT", "Eye")]
        ds.AcquisitionDeviceTypeCodeSequence = [_code("R-1021A", "SRT", "Fundus Camera")]
        ds.DetectorType = "CCD"
        ds.HorizontalFieldOfView = 45
        ds.EmmetropicMagnification = None
        ds.IntraOcularPressure = None
        ds.IlluminationTypeCodeSequence = []
        ds.ImagePathFilterTypeStackCodeSequence = []
        ds.LensesCodeSequence = []
        ds.PatientEyeMovementCommanded = "NO"
        ds.LightPathFilterTypeStackCodeSequence = []
        ds.PupilDilated = "NO"
        ds.RefractiveStateSequence = []
        ds.PatientOrientation = ["L", "F"]
        ds.NumberOfFrames = 1
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 0
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PixelData = _fundus(rng, size, eye == "R").tobytes()
        out.append(ds)
    return out


def mammography(
    rng: Rng, patient: Patient, scale: float, date: str, accession: str
) -> list[Dataset]:
    study = rng.uid()
    rows, columns = max(64, int(3328 * scale)), max(32, int(2560 * scale))
    out = []
    for number, (side, view) in enumerate(
        (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")), start=1
    ):
        ds = _base(
            rng,
            patient,
            sop_class=MG_FOR_PRESENTATION,
            modality="MG",
            study_uid=study,
            series_uid=rng.uid(),
            study_date=date,
            accession=accession,
            series_number=number,
            instance_number=1,
            study_description="MAMMOGRAPHY SCREENING BILATERAL",
            series_description=f"{side} {view}",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "BREAST"
        ds.ImageLaterality = side
        ds.OrganExposed = "BREAST"
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.DetectorType = "DIRECT"
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = [_code("T-04000", "SRT", "Breast")]
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleType = "US"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.ViewPosition = view
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PatientOrientation = ["P", "L"] if side == "R" else ["A", "R"]
        ds.ViewCodeSequence = [
            _code("R-10242", "SRT", "cranio-caudal")
            if view == "CC"
            else _code("R-10226", "SRT", "medio-lateral oblique")
        ]
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
        ds.ImagerPixelSpacing = [_ds(0.07 / scale)] * 2
        ds.WindowCenter = 2500
        ds.WindowWidth = 4000
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.BurnedInAnnotation = "NO"
        _grey_pixels(ds, _breast(rng, rows, columns, side == "R"), 14)
        out.append(ds)
    return out


def ct_series(rng: Rng, patient: Patient, slices: int, date: str, accession: str) -> list[Dataset]:
    study, series = rng.uid(), rng.uid()
    frame_of_reference = rng.uid()
    out = []
    for index in range(slices):
        ds = _base(
            rng,
            patient,
            sop_class=CT_IMAGE,
            modality="CT",
            study_uid=study,
            series_uid=series,
            study_date=date,
            accession=accession,
            series_number=2,
            instance_number=index + 1,
            study_description="CT ABDOMEN WITH CONTRAST",
            series_description="AXIAL 5mm",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.KVP = 120
        ds.PatientPosition = "FFS"
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        ds.SliceThickness = 5
        ds.PixelSpacing = [0.78, 0.78]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-200, -200, -5.0 * index]
        ds.SliceLocation = -5.0 * index
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        image = _ct_slice(rng, index)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = image.astype("<u2").tobytes()
        out.append(ds)
    return out


def encode(ds: Dataset, syntax: UID) -> Dataset:
    """Put ``ds`` into ``syntax``, compressing pixel data where the syntax asks for it."""
    if syntax == JPEGBaseline8Bit:
        _jpeg_baseline(ds)
    elif syntax == JPEGLosslessSV1:
        frame = ds.pixel_array
        encoded = encode_jpeg_lossless(frame, int(ds.BitsStored))
        ds.PixelData = encapsulate([encoded])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _jpeg_baseline(ds: Dataset) -> None:
    """8-bit colour as baseline JPEG with 4:2:2 chroma, the way fundus cameras send it."""
    pixels = ds.pixel_array
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, subsampling=1)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = round(pixels.nbytes / len(buffer.getvalue()), 2)
    ds.LossyImageCompressionMethod = "ISO_10918_1"


Exam = Callable[[Rng, Patient, float, str, str], list[Dataset]]


def generate(
    patients: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    ct_slices: int = 8,
    uncompressed: bool = False,
) -> Iterator[Dataset]:
    """Data sets for ``patients`` patients, each with a CXR, fundus, MG and CT study."""
    rng = Rng(seed)
    grey = colour = 0
    for number in range(patients):
        patient = _patient(rng, number)
        date = f"2026{1 + number % 12:02d}{1 + number % 28:02d}"

        def ct(r: Rng, p: Patient, _s: float, d: str, a: str) -> list[Dataset]:
            return ct_series(r, p, ct_slices, d, a)

        exams: tuple[Exam, ...] = (chest_dx, fundus_op, mammography, ct)
        for exam_number, exam in enumerate(exams):
            accession = f"A{number:05d}{exam_number}"
            for ds in exam(rng, patient, scale, date, accession):
                if uncompressed:
                    syntax = ExplicitVRLittleEndian
                elif ds.SamplesPerPixel == 3:
                    syntax = COLOUR_SYNTAXES[colour % len(COLOUR_SYNTAXES)]
                    colour += 1
                else:
                    syntax = GREY_SYNTAXES[grey % len(GREY_SYNTAXES)]
                    grey += 1
                yield encode(ds, syntax)


def write_corpus(
    out: Path,
    patients: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    ct_slices: int = 8,
    uncompressed: bool = False,
) -> list[Path]:
    """Write the corpus as Part 10 files under ``out/<PatientID>/``; returns the paths."""
    paths = []
    corpus = generate(
        patients, seed=seed, scale=scale, ct_slices=ct_slices, uncompressed=uncompressed
    )
    for ds in corpus:
        folder = out / str(ds.PatientID)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="image size relative to real")
    parser.add_argument("--ct-slices", type=int, default=8)
    parser.add_argument(
        "--uncompressed", action="store_true", help="everything in Explicit VR Little Endian"
    )
    args = parser.parse_args()
    paths = write_corpus(
        args.out,
        args.patients,
        seed=args.seed,
        scale=args.scale,
        ct_slices=args.ct_slices,
        uncompressed=args.uncompressed,
    )
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} instances, {size / 1e6:.1f} MB, under {args.out}")


if __name__ == "__main__":
    main()
