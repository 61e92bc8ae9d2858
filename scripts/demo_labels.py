"""Made-up labels for the synthetic chest radiographs of a folder: to try ``filmless
evaluate`` end to end before real labels are at hand.

One row per frontal (PA or AP) DX image, keyed by SOPInstanceUID, with three of the
chest model's findings drawn at random (seeded; about one in three positive, some left
unknown) and a made-up site. The images carry no disease and the demo weights no
knowledge, so the metrics of such a run mean nothing: they show the shape of a run.

    python -m scripts.demo_labels demo-data labels.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

FINDINGS = ("Effusion", "Cardiomegaly", "Atelectasis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    for path in sorted(p for p in args.folder.rglob("*.dcm") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if ds.get("Modality") != "DX" or ds.get("ViewPosition") not in ("PA", "AP"):
            continue
        values = ["" if rng.random() < 0.05 else str(int(rng.random() < 0.35)) for _ in FINDINGS]
        rows.append([ds.SOPInstanceUID, *values, rng.choice(["north", "south"])])
    with args.out.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["SOPInstanceUID", *FINDINGS, "site"])
        writer.writerows(rows)
    print(f"{len(rows)} frontal chest radiographs labelled at random in {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
