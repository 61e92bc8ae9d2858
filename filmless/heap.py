"""What the server builds while starting lives as long as the process.

CPython's full collections walk every tracked object. After start-up that is mostly
torch, MONAI, pydicom's dictionaries and SQLAlchemy's metadata, and each walk measured
50-230 ms, stopping every thread of the process: C-FIND answers stalled for that long
about once a second while the imports ran. Collecting once and then freezing the
start-up heap leaves the collector only what requests allocate.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Call once every long-lived part of the process exists, before serving."""
    gc.collect()
    gc.freeze()
