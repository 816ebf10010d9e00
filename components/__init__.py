"""Custom TFX components and artifact types of the relkd pipeline."""
# Re-exported so that each artifact type's TYPE_NAME (`components.<Class>`) is an import path:
# the Kubeflow V2 container entrypoint loads custom artifact classes by that name.
from components.artifacts import (  # noqa: F401
    DataValidationReport,
    GraphStatistics,
    NeighbourTables,
    Quarantine,
    TitleVectors,
)
