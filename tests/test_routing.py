"""Routing from manifest rules: pure, over the stored header values."""

from __future__ import annotations

from pathlib import Path

import pydicom

from inference.routing import Decision, missing_views, route, stored_values
from models.manifest import Routing
from models.zoo import CHEST_XRAY
from pacs.header import read_header
from pacs.part10 import read_file_meta
from scripts.synthetic_corpus import Patient, Rng, mammography
from tests.support.zoo import ZOO, manifest_of

CXR = {
    "Modality": "DX",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
    "ViewPosition": "PA",
    "PhotometricInterpretation": "MONOCHROME2",
}


def _mammo(laterality: str, view: str, intent: str = "FOR PRESENTATION") -> dict[str, str]:
    return {
        "Modality": "MG",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2",
        "PresentationIntentType": intent,
        "ViewPosition": view,
        "ImageLaterality": laterality,
    }


def test_frontal_chest_xray_runs_only_the_chest_model() -> None:
    assert route(CXR, ZOO) == [Decision("cxr-densenet121", runs=True)]
    assert route(CXR | {"ViewPosition": "ap"}, ZOO) == [Decision("cxr-densenet121", runs=True)]


def test_lateral_view_is_skipped_with_the_reason() -> None:
    (decision,) = route(CXR | {"ViewPosition": "LL"}, ZOO)
    assert not decision.runs
    assert decision.reason == "ViewPosition LL is not one of PA, AP"
    (absent,) = route(CXR | {"ViewPosition": None}, ZOO)
    assert absent.reason == "ViewPosition absent is not one of PA, AP"


def test_other_modalities_concern_no_model() -> None:
    assert route({"Modality": "CT"}, ZOO) == []
    assert route({}, ZOO) == []


def test_for_processing_mammogram_is_skipped() -> None:
    (decision,) = route(_mammo("L", "CC", "FOR PROCESSING"), ZOO)
    assert not decision.runs
    assert "PresentationIntentType FOR PROCESSING" in decision.reason


def test_non_default_variants_are_not_routed() -> None:
    variant = manifest_of(CHEST_XRAY, default=False)
    assert route(CXR, [variant]) == []


def test_missing_mammography_views() -> None:
    manifest = ZOO[2]
    four = [_mammo(side, view) for side in "LR" for view in ("CC", "MLO")]
    assert missing_views(four, manifest) == []
    assert missing_views(four[:3], manifest) == ["R-MLO"]
    unusable = [*four[:3], _mammo("R", "MLO", "FOR PROCESSING")]
    assert missing_views(unusable, manifest) == ["R-MLO"]


def test_the_scheduler_and_the_worker_read_the_same_values(tmp_path: Path) -> None:
    """Routing reads what was stored, whichever attribute a rule names: the indexed header's
    DICOM JSON (the scheduler) and the parsed data set (the worker) give the same values,
    unindexed ones included, an empty one as empty and an absent one as absent."""
    ds = mammography(
        Rng(5), Patient("R", "Rou^Ting", "ISO_IR 192", "19700101", "F"), 0.02, "20260101", "R1"
    )[0]
    ds.StationName = "MAMMO-2"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageComments = ""
    del ds.ImageLaterality
    path = tmp_path / "view.dcm"
    ds.save_as(path, enforce_file_format=True)
    with path.open("rb") as stream:
        meta = read_file_meta(stream)
        offset = stream.tell()
    parsed = pydicom.dcmread(path, stop_before_pixels=True)
    for values in (stored_values(read_header(path, offset, meta)), stored_values(parsed)):
        assert values["BodyPartExamined"] == "BREAST"
        assert values.get("StationName") == "MAMMO-2"
        assert values["ImageType"] == "ORIGINAL\\PRIMARY"
        assert values["ImageComments"] == ""
        assert values.get("ImageLaterality") is None
        assert values.get("NotAKeyword") is None


def test_a_rule_on_an_unindexed_attribute_routes() -> None:
    manifest = ZOO[2].model_copy(
        update={
            "routing": Routing(
                level="study",
                match={"Modality": ["MG"], "BodyPartExamined": ["BREAST"]},
                required_views=ZOO[2].routing.required_views,
            )
        }
    )
    (runs,) = route(_mammo("L", "CC") | {"BodyPartExamined": "BREAST"}, [manifest])
    assert runs.runs
    (skips,) = route(_mammo("L", "CC") | {"BodyPartExamined": "CHEST"}, [manifest])
    assert skips.reason == "BodyPartExamined CHEST is not one of BREAST"
