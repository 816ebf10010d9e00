"""Curated TFDV schemas (text protos), imported into the pipeline with ImportSchemaGen.

They are hand-maintained contracts, not inferred: SchemaGen's output was only the starting
point. A change here is a change of what data the pipeline accepts.
"""
import os

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))


def schema_path(kind: str) -> str:
    path = os.path.join(SCHEMA_DIR, f"{kind}.pbtxt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no curated schema for {kind!r} at {path}")
    return path
