"""A labelled set whose truth the test controls, and a model whose output is a known
function of the image: for evaluating the evaluation.

Each image is a flat background (a random level) with, for a "Bright" positive, a white
square planted in it. The model's two scores are sigmoid(+-GAIN * (mean - 0.5)) of the
input tensor's mean, and the windowing is linear (centre 2048, width 4096 is stored
value / 4095; a picture's is value / 255), so the test computes every score from the
pixels it wrote, and the metrics from those scores, without the code under test.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from models.manifest import (
    Manifest,
    OperatingPoint,
    OutputSpec,
    Preprocessing,
    Provenance,
    Routing,
    TensorSpec,
    Weights,
    dump,
    sha256_file,
)

SIZE = 32
GAIN = 12.0
LABELS = ["Bright", "Dark"]
DIGITAL_XRAY = UID("1.2.840.10008.5.1.4.1.1.1.1")


def model(
    folder: Path, *, name: str = "planted", gain: float = GAIN, any_image: bool = False
) -> Path:
    """An ONNX model and its manifest: scores sigmoid(+-gain * (mean - 0.5)); for DX
    images, or with ``any_image`` for every grayscale image (no routing rule)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Unsqueeze", ["logit", "axis"], ["column"]),
        helper.make_node("Neg", ["column"], ["negated"]),
        helper.make_node("Concat", ["column", "negated"], ["logits"], axis=1),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    constants = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, name, [image], [out], constants)
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    onnx.save(built, folder / "model.onnx")
    manifest = Manifest(
        name=name,
        version="1",
        task="chest-xray",
        description="a planted-truth test model",
        intended_use="testing the evaluation",
        clinical_use=False,
        weights=Weights(file="model.onnx", sha256=sha256_file(folder / "model.onnx"), demo=True),
        input=TensorSpec(name="image", shape=["batch", 1, SIZE, SIZE]),
        outputs=[
            OutputSpec(
                name="probabilities", shape=["batch", 2], labels=LABELS, activation="sigmoid"
            )
        ],
        preprocessing=Preprocessing(
            color="grayscale", size=(SIZE, SIZE), keep_aspect=False, intensity_range=(0.0, 1.0)
        ),
        operating_points=[OperatingPoint(output="probabilities", label="Bright", threshold=0.5)],
        routing=Routing(level="instance", match={} if any_image else {"Modality": ["DX"]}),
        provenance=Provenance(
            source="test",
            architecture="mean",
            created=datetime.now(UTC).isoformat(),
            exporter="onnx.helper",
            opset=17,
        ),
    )
    dump(manifest, folder / "manifest.toml")
    return folder


@dataclass
class Case:
    sop: str
    study: str
    patient: str
    bright: int
    score: float  # the model's "Bright" score, computed here
    sex: str
    site: str
    path: str


def _pixels(rng: np.random.Generator, bright: int, top: int) -> np.ndarray:
    level = int(rng.integers(int(0.25 * top), int(0.6 * top)))
    frame = np.full((SIZE, SIZE), level, dtype=np.uint16 if top > 255 else np.uint8)
    if bright:
        side = int(rng.integers(6, 12))
        at = int(rng.integers(0, SIZE - side))
        frame[at : at + side, at : at + side] = top
    return frame


def expected(frame: np.ndarray, top: int, gain: float = GAIN) -> float:
    mean = float(np.float32(frame.astype(np.float64).mean() / top))
    return float(1 / (1 + np.exp(-gain * (mean - 0.5))))


def dicom_set(
    folder: Path, *, patients: int = 30, per_patient: int = 2, seed: int = 3
) -> list[Case]:
    """DX images, ``per_patient`` studies of one image per patient; about half Bright."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for p in range(patients):
        patient = f"P{p:03d}"
        sex = "F" if p % 2 else "M"
        for s in range(per_patient):
            bright = int(rng.random() < 0.5)
            frame = _pixels(rng, bright, 4095)
            ds = _dx(frame, patient, sex, manufacturer="Vendor A" if p % 3 else "Vendor B")
            path = folder / f"{patient}-{s}.dcm"
            ds.save_as(path, enforce_file_format=True)
            cases.append(
                Case(
                    str(ds.SOPInstanceUID),
                    str(ds.StudyInstanceUID),
                    patient,
                    bright,
                    expected(frame, 4095),
                    sex,
                    "north" if p % 4 else "south",
                    path.name,
                )
            )
    return cases


def picture_set(folder: Path, *, patients: int = 30, seed: int = 4) -> list[Case]:
    """8-bit grayscale PNGs, two per patient, named by path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for p in range(patients):
        for s in range(2):
            bright = int(rng.random() < 0.5)
            frame = _pixels(rng, bright, 255)
            name = f"p{p:03d}_{s}.png"
            Image.fromarray(frame, mode="L").save(folder / name)
            cases.append(Case("", "", f"P{p:03d}", bright, expected(frame, 255), "", "", name))
    return cases


def _dx(frame: np.ndarray, patient: str, sex: str, *, manufacturer: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    ds.SOPClassUID = DIGITAL_XRAY
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = f"Planted^{patient}"
    ds.PatientSex = sex
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20240301"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "DX"
    ds.Manufacturer = manufacturer
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = frame.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = frame.astype(np.uint16).tobytes()
    return ds


def labels_csv(path: Path, cases: list[Case], *, by_path: bool = False) -> Path:
    """Keyed by SOPInstanceUID, or by path with a PatientID column (as a picture set's)."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        if by_path:
            writer.writerow(["path", "Bright", "PatientID"])
            writer.writerows([c.path, c.bright, c.patient] for c in cases)
        else:
            writer.writerow(["SOPInstanceUID", "Bright", "site"])
            writer.writerows([c.sop, c.bright, c.site] for c in cases)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
