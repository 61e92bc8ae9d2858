"""Small hand-built instances for edge cases the generated corpus does not cover."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs.archive import InstanceSource
from pacs.part10 import FileMeta, encode_file_meta


def ct_instance(
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    patient_id: str = "P1",
    patient_name: str = "Test^Patient",
    modality: str = "CT",
    seed: int = 0,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = "Ref^Rita"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    pixels = np.random.default_rng(seed).integers(0, 4096, (16, 16), dtype=np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def part10(ds: Dataset, *, fill_meta: bool = True) -> bytes:
    """``ds`` as a Part 10 file; the meta group is filled from the data set unless told not
    to, which is how a test makes the announced identity differ from the data set's."""
    if fill_meta or "MediaStorageSOPClassUID" not in ds.file_meta:
        ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
        if "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    syntax = ds.file_meta.TransferSyntaxUID
    body = DicomBytesIO()
    body.is_little_endian = syntax.is_little_endian
    body.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(body, ds)
    head = encode_file_meta(
        FileMeta(
            str(ds.file_meta.MediaStorageSOPClassUID),
            str(ds.file_meta.MediaStorageSOPInstanceUID),
            str(syntax),
        )
    )
    return head + body.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(part10(ds))
    return path


def source(ds: Dataset) -> InstanceSource:
    return InstanceSource.from_part10(BytesIO(part10(ds)))
