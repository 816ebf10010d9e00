"""The ML Metadata connection of `relkd run`: a SQLite file per run, or a shared MySQL server.

Settings are the config's `metadata` section (pipeline/configs.py). The MySQL password is taken
from the environment variable the config names, so no config file ever holds it.
On Kubeflow Pipelines and Vertex AI the platform keeps the metadata; none of this applies there.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from ml_metadata.proto import metadata_store_pb2

from pipeline.configs import ConfigError, MetadataConfig


def connection_config(settings: MetadataConfig, default_sqlite_path: str,
                      environ: Optional[Mapping[str, str]] = None) -> metadata_store_pb2.ConnectionConfig:
    """The ConnectionConfig for `settings`; SQLite at `default_sqlite_path` unless it names a file."""
    from tfx.orchestration import metadata

    environ = os.environ if environ is None else environ
    if settings.backend == "sqlite":
        return metadata.sqlite_metadata_connection_config(settings.sqlite_path or default_sqlite_path)
    if settings.backend != "mysql":
        raise ConfigError(f"metadata.backend must be sqlite or mysql, got {settings.backend!r}")
    mysql = settings.mysql
    password = ""
    if mysql.password_env:
        if mysql.password_env not in environ:
            raise ConfigError(
                f"metadata.backend is mysql: set the environment variable {mysql.password_env} to the "
                f"password of MySQL user {mysql.user!r} (or set metadata.mysql.password_env to '' for none)")
        password = environ[mysql.password_env]
    return metadata.mysql_metadata_connection_config(
        host=mysql.host, port=mysql.port, database=mysql.database, username=mysql.user, password=password)


def describe(connection: metadata_store_pb2.ConnectionConfig) -> str:
    """Where the store is, for people: the SQLite file, or mysql://user@host:port/database."""
    kind = connection.WhichOneof("config")
    if kind == "sqlite":
        return connection.sqlite.filename_uri
    if kind == "mysql":
        m = connection.mysql
        return f"mysql://{m.user}@{m.host}:{m.port}/{m.database}"
    return kind or "(none)"


def check_reachable(connection: metadata_store_pb2.ConnectionConfig) -> None:
    """Opens a MySQL store once before the run: unreachable, the first step would fail with
    ML Metadata's bare `mysql_real_connect failed` and the run summary could not be read."""
    if connection.WhichOneof("config") != "mysql":
        return  # a SQLite file is made where `relkd run` checked it can write
    from ml_metadata.metadata_store import metadata_store

    try:
        metadata_store.MetadataStore(connection)
    except Exception as e:  # ML Metadata raises RuntimeError for connection and schema failures
        raise ConfigError(
            f"metadata.backend is mysql: cannot use {describe(connection)} ({e}); check "
            "metadata.mysql (host, port, database, user, password_env) and that the server is "
            "running") from e
