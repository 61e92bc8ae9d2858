"""The one parser of the data set of a Part 10 file the archive holds or has staged.

Indexing, screening, rendering, retrieve, forwarding and transcoding all read the same
files; when each called pydicom with its own options they could disagree about what a
file holds (which values are validated, what is deferred, where reading stops). Every
data set read goes through :func:`read_stored`; only the File Meta Information has a
reader of its own (:func:`pacs.part10.read_file_meta`), which needs no data set at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.config
from pydicom.dataset import FileDataset

# The archive checks the attributes it indexes itself (UIDs strictly) and keeps every
# other value exactly as sent; pydicom's per-value warnings on reading would only be noise
# in the log of a busy archive, and they must not depend on a process's warning filters.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def read_stored(
    source: Path | BinaryIO, *, pixels: bool = False, defer_size: int | None = None
) -> FileDataset:
    """The data set of the Part 10 file ``source``, from its first byte.

    ``pixels``: read Pixel Data too (re-encoding needs it; everything else locates the
    value instead, see :func:`pacs.pixels.read_image`). ``defer_size``: values longer than
    this stay in the file until used, so a header costs the same however large its
    private blobs are. pydicom's own exceptions pass through: a file that fails here is
    refused at ingest and a storage fault when it was already stored, and only the
    caller knows which.
    """
    if not isinstance(source, Path):
        source.seek(0)
    return pydicom.dcmread(source, stop_before_pixels=not pixels, defer_size=defer_size)
