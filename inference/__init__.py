"""The screening pipeline over the archive: routing, preprocessing, runtime, reports."""
