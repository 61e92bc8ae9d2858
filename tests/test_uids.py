from __future__ import annotations

import pytest

from pacs.errors import InvalidUID
from pacs.uids import is_valid_uid, require_uid


@pytest.mark.parametrize(
    "uid",
    ["1.2", "1.2.840.10008.5.1.4.1.1.2", "2.25.0", "0.1", "1." + "2" * 62],
)
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)
    assert require_uid(uid, "SOPInstanceUID") == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1..2",
        "1.2.",
        ".1.2",
        "1.02",
        "1.2a",
        "1.2 ",
        "../../etc/passwd",
        "1.2/3",
        "1." + "2" * 63,
        "1.2\x00",
    ],
)
def test_invalid(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match="SOPInstanceUID"):
        require_uid(uid, "SOPInstanceUID")


def test_missing_is_named() -> None:
    with pytest.raises(InvalidUID, match="StudyInstanceUID is missing"):
        require_uid(None, "StudyInstanceUID")
