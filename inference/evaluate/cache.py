"""Predictions kept per (model weights sha256, image sha256), in one SQLite file.

Re-running an evaluation with other operating points, subgroups or units reads the
model's outputs from here instead of running it again, and a run that was interrupted
resumes: each batch is committed as soon as it has run. The values are kept as JSON
numbers (float32 outputs are exact in a double), so a cached prediction is the
prediction, bit for bit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    model TEXT NOT NULL,
    digest TEXT NOT NULL,
    outputs TEXT,
    reason TEXT NOT NULL,
    not_assessable INTEGER NOT NULL,
    attributes TEXT NOT NULL,
    decode_seconds REAL NOT NULL,
    preprocess_seconds REAL NOT NULL,
    infer_seconds REAL NOT NULL,
    PRIMARY KEY (model, digest)
)
"""


@dataclass
class Prediction:
    """A model's outputs for one image (by output name, the batch axis removed), or
    the reason it has none; the image's header values; the seconds it took."""

    digest: str
    outputs: dict[str, list[float]] | None
    reason: str
    attributes: dict[str, str]
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    infer_seconds: float = 0.0
    not_assessable: bool = False
    cached: bool = field(default=False, compare=False)


class PredictionCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get(self, model: str, digests: Iterable[str]) -> dict[str, Prediction]:
        wanted = list(dict.fromkeys(digests))
        found: dict[str, Prediction] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                "SELECT digest, outputs, reason, not_assessable, attributes, decode_seconds,"
                " preprocess_seconds, infer_seconds FROM predictions"
                f" WHERE model = ? AND digest IN ({marks})",
                [model, *part],
            )
            for digest, outputs, reason, unusable, attributes, d, p, i in rows:
                found[digest] = Prediction(
                    digest,
                    None if outputs is None else json.loads(outputs),
                    reason,
                    json.loads(attributes),
                    d,
                    p,
                    i,
                    bool(unusable),
                    cached=True,
                )
        return found

    def put(self, model: str, predictions: Iterable[Prediction]) -> None:
        """Keep a batch, in one transaction."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        model,
                        p.digest,
                        None if p.outputs is None else json.dumps(p.outputs),
                        p.reason,
                        int(p.not_assessable),
                        json.dumps(p.attributes, sort_keys=True),
                        p.decode_seconds,
                        p.preprocess_seconds,
                        p.infer_seconds,
                    )
                    for p in predictions
                ],
            )

    def close(self) -> None:
        self._db.close()
