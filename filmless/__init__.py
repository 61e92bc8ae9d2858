"""filmless: the composition root that wires the archive, DICOMweb and inference together."""

__version__ = "0.1.0"
