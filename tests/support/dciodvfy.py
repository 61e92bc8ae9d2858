"""dicom3tools' ``dciodvfy``, which checks an object against its IOD (PS3.3)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian


def errors(ds: Dataset, path: Path) -> list[str]:
    """The errors dciodvfy finds in ``ds``, written to ``path`` as a Part 10 file (in
    explicit VR little endian when it has no transfer syntax yet)."""
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]
