"""DICOMweb (PS3.18) over the archive: QIDO-RS today."""
