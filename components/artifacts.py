"""Artifact types the project adds to TFX's standard ones.

Each TYPE_NAME is `components.<ClassName>` and the class is re-exported by `components/__init__.py`:
Kubeflow Pipelines v2 / Vertex AI accept a custom type only under a `<module>.<Class>` schema
title, and the TFX container entrypoint imports the class back from exactly that path. A new
artifact type must follow the same rule (tests/test_kubeflow.py compiles every one in the DAG).
"""
from tfx.types.artifact import Artifact


class Quarantine(Artifact):
    """Rows an ExampleGen refused, one JSON line each with its reason, plus `summary.json`."""

    TYPE_NAME = "components.Quarantine"


class DataValidationReport(Artifact):
    """The ingestion gate's verdict on anomalies and quarantine rates (`report.json`)."""

    TYPE_NAME = "components.DataValidationReport"


class NeighbourTables(Artifact):
    """Top-N metapath neighbours per (side, node, metapath) as gzipped TFRecords of tf.Example.

    What a serving model needs to look contexts up by query or item id (BERM-O).
    """

    TYPE_NAME = "components.NeighbourTables"


class GraphStatistics(Artifact):
    """`stats.json` (nodes, edges, degrees, components) and `capped_hubs.jsonl` of one graph build."""

    TYPE_NAME = "components.GraphStatistics"


class TitleVectors(Artifact):
    """Sentence vectors of the logged item titles (and the train queries) from the pretrained
    encoder, as gzipped TFRecords of tf.Example (`text`, `kind`, `vector`): the student's stored
    title vectors (trainer/sentence_vectors.py)."""

    TYPE_NAME = "components.TitleVectors"
