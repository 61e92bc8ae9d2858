"""DIMSE services over pynetdicom: one module per service, one AE built in ``server``."""
