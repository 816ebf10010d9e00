"""Artifact types the project adds to TFX's standard ones."""
from tfx.types.artifact import Artifact


class Quarantine(Artifact):
    """Rows an ExampleGen refused, one JSON line each with its reason, plus `summary.json`."""

    TYPE_NAME = "RelkdQuarantine"


class DataValidationReport(Artifact):
    """The ingestion gate's verdict on anomalies and quarantine rates (`report.json`)."""

    TYPE_NAME = "RelkdDataValidationReport"
