"""The coded concepts of a report: standard codes where DICOM defines one, else private.

Every standard code here is one that DICOM PS3.16 lists (pydicom's ``codes`` carries
those tables), so that a reader can trust the pair of code and meaning; a label with no
such code keeps the private scheme :data:`SCHEME`, declared in every report (PS3.3
C.12.1.1.2). The model card lists which is which (:func:`card_rows`).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99FILMLESS"  # private coding scheme for labels that have no standard code

# Chest X-ray findings (TorchXRayVision labels) with a code in a DICOM context group:
# CID 6102 (Chest findings), 6104 (opacities), 6105 (lucencies), 12248 (cardiac findings).
_FINDINGS: dict[str, Code] = {
    "Infiltration": codes.DCM.Infiltrate,
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Edema": codes.SCT.PulmonaryEdema,
    "Fibrosis": codes.SCT.Fibrosis,
    "Effusion": codes.SCT.PleuralEffusion,
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Nodule": codes.SCT.Nodule,
    "Mass": codes.SCT.Mass,
    "Lung Opacity": codes.DCM.Opacity,
}

# BI-RADS breast composition A-D, CID 6000 (Overall Breast Composition).
DENSITY: dict[str, Code] = {
    "A": codes.SCT.AlmostEntirelyFat,
    "B": codes.SCT.ScatteredFibroglandularDensities,
    "C": codes.SCT.HeterogeneouslyDense,
    "D": codes.SCT.ExtremelyDense,
}

# Mammography assessment, CID 6026: a screening call below the operating point is
# category 1 (negative), at or above it category 0 (recall: needs additional imaging).
NEGATIVE = Code("397140005", "SCT", "Mammography assessment (Category 1) - Negative")
RECALL = Code("397138000", "SCT", "Mammography assessment (Category 0) - Need additional imaging")
# The order in which one category outranks another for the exam's overall category.
CATEGORY_RANK = {NEGATIVE.value: 0, RECALL.value: 1}

# Named concepts of the report that have standard codes.
_NAMED: dict[str, Code] = {
    "Assessment Category": codes.DCM.AssessmentCategory,
    "Breast composition": codes.SCT.BreastComposition,
    "Finding": codes.DCM.Finding,
    "Abnormal": codes.SCT.ImagingResultAbnormal,
    "Normal": codes.SCT.ImagingResultNormal,
    "Image Quality": codes.DCM.ImageQuality,
}

LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}
BREAST = {"L": codes.SCT.LeftBreast, "R": codes.SCT.RightBreast}
EYE = codes.SCT.Eye
OPTIC_DISC = codes.SCT.OpticDiscStructure


def concept(text: str) -> hd.sr.CodedConcept:
    """The coded concept for a label or name: its standard code, else a private one."""
    code = _FINDINGS.get(text) or _NAMED.get(text)
    if code is not None:
        return coded(code)
    return private(text)


def private(text: str) -> hd.sr.CodedConcept:
    value = "".join(c if c.isalnum() else "-" for c in text.upper())[:16]
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=text[:64])


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning
    )


def card_rows(task: str, labels: list[str]) -> list[tuple[str, str]]:
    """What the model card lists: each label and concept of the task's reports with
    its code, private ones marked."""
    extras: dict[str, list[tuple[str, Code]]] = {
        "chest-xray": [("exam abnormal", _NAMED["Abnormal"]), ("exam normal", _NAMED["Normal"])],
        "fundus": [
            ("eye (finding site)", EYE),
            ("left eye (laterality)", LATERALITY["L"]),
            ("right eye (laterality)", LATERALITY["R"]),
        ],
        "glaucoma": [
            ("optic disc (finding site)", OPTIC_DISC),
            ("left eye (laterality)", LATERALITY["L"]),
            ("right eye (laterality)", LATERALITY["R"]),
        ],
        "mammography": [
            ("left breast (finding site)", BREAST["L"]),
            ("right breast (finding site)", BREAST["R"]),
            ("assessment category", _NAMED["Assessment Category"]),
            ("category 1: negative", NEGATIVE),
            ("category 0: recall", RECALL),
            ("breast composition", _NAMED["Breast composition"]),
        ]
        + [(f"density {k}", v) for k, v in DENSITY.items()],
    }
    rows = []
    for label in dict.fromkeys(labels):
        if task == "mammography" and label in DENSITY:
            continue  # listed with the density codes below
        code = concept(label)
        private_mark = " (private)" if code.scheme_designator == SCHEME else ""
        rows.append((label, f"{code.scheme_designator} {code.value} {code.meaning}{private_mark}"))
    rows += [
        (name, f"{code.scheme_designator} {code.value} {code.meaning}")
        for name, code in extras.get(task, [])
    ]
    return rows
