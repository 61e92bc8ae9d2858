"""Routing from manifest rules: pure, over header values as the index holds them."""

from __future__ import annotations

from inference.routing import Decision, missing_views, route
from models.zoo import CHEST_XRAY
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
