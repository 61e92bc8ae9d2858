"""Sending files with dcmtk's storescu, one run per transfer syntax."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from pacs.part10 import read_file_meta

# storescu proposes one compressed syntax per run, chosen by these options.
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(port: int, files: Iterable[Path], *, called: str = "FILMLESS") -> None:
    """Every file to the SCP on ``port``; raises with storescu's output unless all
    were stored (storescu exits non-zero on any failure status)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        with path.open("rb") as stream:
            groups[str(read_file_meta(stream).TransferSyntaxUID)].append(path)
    for syntax, paths in groups.items():
        options = ["-R", PROPOSE[syntax], "-aec", called, "-aet", "MODALITY"]
        run = subprocess.run(
            ["storescu", *options, "127.0.0.1", str(port), *map(str, paths)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if run.returncode != 0:
            raise AssertionError(f"storescu {syntax}: {run.stdout[-1000:]}{run.stderr[-2000:]}")
