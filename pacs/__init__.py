"""The archive core: durable blob store, SQL index, DICOM matching and DIMSE services.

Nothing in this package knows about HTTP or AI; the DICOMweb app and the inference
pipeline are built on top of :class:`pacs.archive.Archive`.
"""
