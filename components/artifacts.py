"""Artifact types the project adds to TFX's standard ones."""
from tfx.types.artifact import Artifact


class Quarantine(Artifact):
    """Rows an ExampleGen refused, one JSON line each with its reason, plus `summary.json`."""

    TYPE_NAME = "RelkdQuarantine"


class DataValidationReport(Artifact):
    """The ingestion gate's verdict on anomalies and quarantine rates (`report.json`)."""

    TYPE_NAME = "RelkdDataValidationReport"


class NeighbourTables(Artifact):
    """Top-N metapath neighbours per (side, node, metapath) as gzipped TFRecords of tf.Example.

    What a serving model needs to look contexts up by query or item id (BERM-O).
    """

    TYPE_NAME = "RelkdNeighbourTables"


class GraphStatistics(Artifact):
    """`stats.json` (nodes, edges, degrees, components) and `capped_hubs.jsonl` of one graph build."""

    TYPE_NAME = "RelkdGraphStatistics"
