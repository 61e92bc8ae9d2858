"""The labels of an evaluation: read from a CSV as public datasets ship them, matched to
the images, and every mismatch listed (STARD: the flow of participants)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.evaluate.labels import LabelsError, match, read
from models.zoo import CXR_LABELS

MODEL = list(CXR_LABELS)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_unknowns_and_subgroups_are_read_by_their_columns(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "PatientID,SOPInstanceUID,effusion, Cardiomegaly ,site,sex_binary\n"
        "P1,1.2.3,1,0,north,1\n"
        "P2,1.2.4,,1,south,0\n"
        "P3,1.2.5,yes,no,north,\n",
    )
    labels = read(path, MODEL)
    assert labels.key == "SOPInstanceUID"  # the most specific key the file has
    assert labels.names == ("Effusion", "Cardiomegaly")  # the model's spelling
    assert labels.values["1.2.3"] == {"Effusion": 1, "Cardiomegaly": 0}
    assert labels.values["1.2.4"] == {"Effusion": None, "Cardiomegaly": 1}  # unknown
    assert labels.values["1.2.5"] == {"Effusion": 1, "Cardiomegaly": 0}
    assert labels.subgroups == ("PatientID", "site", "sex_binary")
    assert labels.groups["1.2.4"]["site"] == "south"
    assert labels.label_like == ("sex_binary",)


def test_every_mismatch_is_listed(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "SOPInstanceUID,Effusion,Pneumothorx\n1.1,1,0\n1.2,0,1\n1.2,1,1\n1.9,0,0\n",
    )
    labels = read(path, MODEL)
    assert labels.repeated == ("1.2",)
    assert labels.values["1.2"] == {"Effusion": 0}  # the first row of a repeated key
    found = match(labels, ["1.1", "1.2", "1.3", "1.1"], MODEL)
    assert found.matched == ["1.1", "1.2"]
    assert found.unlabelled == ["1.3"]  # an image no row names
    assert found.missing == ["1.9"]  # a row no image has
    assert found.unknown_columns == ["Pneumothorx"]  # a misspelt label
    assert "Pneumothorax" in found.absent_labels


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("Effusion,Atelectasis\n1,0\n", "no key column"),
        ("SOPInstanceUID,Effusion\n1.1,maybe\n", "labels.csv:2: Effusion is 'maybe'"),
        ("SOPInstanceUID,Effusion\n,1\n", "labels.csv:2: no SOPInstanceUID"),
    ],
)
def test_a_file_that_cannot_be_used_says_where(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(LabelsError, match=said):
        read(_csv(tmp_path, text), MODEL)


def test_an_unreadable_file_is_a_labels_error(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"SOPInstanceUID,Effusion\n\xff\xfe,1\n")
    with pytest.raises(LabelsError):
        read(path, MODEL)
    with pytest.raises(LabelsError):
        read(tmp_path / "absent.csv", MODEL)


def test_eyes_and_breasts_are_keyed_by_the_study_and_their_side(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "StudyInstanceUID,Laterality,referable DR\n1.2.3,R,1\n1.2.3,left,0\n1.2.4,L,\n",
    )
    labels = read(path, ["referable DR"], sided=True)
    assert labels.values == {
        "1.2.3/R": {"referable DR": 1},
        "1.2.3/L": {"referable DR": 0},
        "1.2.4/L": {"referable DR": None},
    }
    assert labels.subgroups == ()
    with pytest.raises(LabelsError, match="Laterality column"):
        read(
            _csv(tmp_path, "StudyInstanceUID,referable DR\n1.2.3,1\n"), ["referable DR"], sided=True
        )
    with pytest.raises(LabelsError, match=r"labels.csv:2: Laterality is 'both'"):
        read(
            _csv(tmp_path, "StudyInstanceUID,Laterality,referable DR\n1.2.3,both,1\n"),
            ["referable DR"],
            sided=True,
        )


def test_a_key_column_can_be_chosen(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,PatientID,Effusion\na.png,P1,1\nb.png,P1,0\n")
    labels = read(path, MODEL, key="path")
    assert (labels.key, labels.subgroups) == ("path", ("PatientID",))
    assert set(labels.values) == {"a.png", "b.png"}
    with pytest.raises(LabelsError, match="no column 'SeriesInstanceUID'"):
        read(path, MODEL, key="SeriesInstanceUID")
