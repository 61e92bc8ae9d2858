"""One parser for the data set of every stored file (pacs.stored).

Each reader (index, screening, rendering, retrieve, forwarding, transcoding) used to
call pydicom with options of its own, and the option that keeps pydicom from warning
about, or with strict warning filters refusing, a value the modality sent outside its
VR's rules (PS3.5 6.2) was set only by the indexing module: a process that rendered or
screened without having imported it read the same file differently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from pydicom.config import disable_value_validation

from tests.support.instances import ct_instance, part10

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("pacs", "inference", "dicomweb", "filmless", "models")


def _calls_dcmread(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "dcmread"
    ]


def test_only_the_stored_reader_calls_pydicom() -> None:
    calls = {
        f"{path.relative_to(ROOT)}:{line}"
        for package in PRODUCT
        for path in (ROOT / package).rglob("*.py")
        for line in _calls_dcmread(path)
    }
    assert len(calls) == 1, sorted(calls)
    assert next(iter(calls)).startswith("pacs/stored.py:"), sorted(calls)


def test_a_value_outside_its_vr_reads_the_same_from_every_entry_point(tmp_path: Path) -> None:
    ds = ct_instance()
    with disable_value_validation():
        ds.AccessionNumber = "A" * 40  # SH allows 16 characters
        ds.PatientBirthDate = "1980-01-01"  # DA is YYYYMMDD
        path = tmp_path / "lenient.dcm"
        path.write_bytes(part10(ds))
    # A fresh interpreter per entry point, warnings as errors: nothing else imported first.
    for entry in (
        "from pacs.pixels import read_image as read\n"
        "with open(path, 'rb') as f: h = read(f).header",
        "from pacs.dimse.retrieve import read_stored as read\nh = read(path)",
        "from pacs.forward import read_stored as read\nh = read(path)",
    ):
        show = "print(h.AccessionNumber, h.PatientBirthDate)"
        script = f"from pathlib import Path\npath = Path({str(path)!r})\n{entry}\n{show}"
        done = subprocess.run(
            [sys.executable, "-W", "error::UserWarning", "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["A" * 40, "1980-01-01"]
