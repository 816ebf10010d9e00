"""Curated TFDV schemas (text protos), imported into the pipeline with ImportSchemaGen.

They are hand-maintained contracts, not inferred: SchemaGen's output was only the starting
point. A change here is a change of what data the pipeline accepts.
"""
import os
from typing import Optional

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))


def schema_path(kind: str, schema_dir: Optional[str] = None) -> str:
    """This package's schema file for `kind`; with `schema_dir`, the path of that file there
    (where the executors will read it, e.g. inside the container image: not checked here)."""
    if schema_dir:
        return f"{schema_dir.rstrip('/')}/{kind}.pbtxt"
    path = os.path.join(SCHEMA_DIR, f"{kind}.pbtxt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no curated schema for {kind!r} at {path}")
    return path
