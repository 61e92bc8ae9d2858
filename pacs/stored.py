"""The one parser of the data set of a Part 10 file the archive holds or has staged.

Indexing, screening, rendering, retrieve, forwarding and transcoding all read the same
files; when each called pydicom with its own options they could disagree about what a
file holds (which values are validated, what is deferred, where reading stops). Every
data set read goes through :func:`read_stored`; only the File Meta Information has a
reader of its own (:func:`pacs.part10.read_file_meta`), which needs no data set at all;
where the caller has read it already (ingest), :func:`read_staged` starts at the data
set instead of having pydicom parse the meta group a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from pacs.structure import PIXEL_TAGS

# The archive checks the attributes it indexes itself (UIDs strictly) and keeps every
# other value exactly as sent; pydicom's per-value warnings on reading would only be noise
# in the log of a busy archive, and they must not depend on a process's warning filters.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def read_stored(source: Path | BinaryIO, *, pixels: bool = False) -> FileDataset:
    """The data set of the Part 10 file ``source``, from its first byte.

    ``pixels``: read Pixel Data too (re-encoding needs it; everything else locates the
    value instead, see :func:`pacs.pixels.read_image`). pydicom's own exceptions pass
    through: a file that fails here is refused at ingest and a storage fault when it was
    already stored, and only the caller knows which.
    """
    if not isinstance(source, Path):
        source.seek(0)
    return pydicom.dcmread(source, stop_before_pixels=not pixels)


def read_staged(
    path: Path,
    data_set_offset: int,
    syntax: UID,
    *,
    defer_size: int | None = None,
    elements: Mapping[BaseTag, RawDataElement] | None = None,
) -> FileDataset:
    """:func:`read_stored` without Pixel Data, of a file whose meta group the caller has
    read: the data set from ``data_set_offset``, encoded in ``syntax`` (not deflated).

    What pydicom's ``dcmread`` does after the meta group, done here directly, saves
    ingest a second parse of the meta group and the look for a command set that a
    stored file cannot have. ``elements``: the data set's elements, already read as
    pydicom reads them (:func:`pacs.structure.collect_header`). The File Meta
    Information is left empty.
    """
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    if elements is not None:
        found = FileDataset(
            str(path), Dataset(dict(elements)), None, FileMetaDataset(), implicit, little
        )
        found.set_original_encoding(implicit, little, found._character_set)
        return found
    with open(path, "rb") as stream:
        stream.seek(data_set_offset)
        data_set = read_dataset(
            stream, implicit, little, stop_when=_at_pixel_data, defer_size=defer_size
        )
        # Named after the file, so that deferred values are read from it when used.
        found = FileDataset(stream, data_set, None, FileMetaDataset(), implicit, little)
    found.set_original_encoding(implicit, little, data_set._character_set)
    return found


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag in PIXEL_TAGS
