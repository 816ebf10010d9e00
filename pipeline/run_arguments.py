"""What `relkd run` checks about the inputs its flags name before TFX, Beam and TensorFlow load.

The runner (`local_runner`) calls the same checks, so a library caller gets the same messages;
the command calls them first, so a mistyped path is answered in a fraction of a second rather
than after the libraries' start-up (seconds). Every other command that takes --config
(`generate`, `compile`) checks that file the same way before it loads anything, and every command
that writes somewhere (`run`, `generate`, `compile`, `report`, `score`) checks that place
(`check_output_path`): otherwise a file where a folder belongs is found only when the first write
fails, after the work.
"""
from __future__ import annotations

import os
from typing import Optional

from pipeline.exit_codes import UsageError

DATASETS = {"homedepot": "Home Depot"}  # --dataset value: the name messages use
_GLOB = "*?["


def check_input_choice(logs: Optional[str], judgments: Optional[str], dataset: Optional[str],
                       dataset_input: Optional[str]) -> None:
    """Raises UsageError unless the flags name one way in: a dataset and its file, logs and
    judgments, or nothing (the embedded default data)."""
    if dataset:
        if logs or judgments:
            raise UsageError("--dataset replaces --logs/--judgments; give one or the other")
        if dataset not in DATASETS:
            raise UsageError(f"unknown --dataset {dataset!r}; known: {', '.join(DATASETS)}")
        if not dataset_input:
            raise UsageError("--dataset homedepot needs --input PATH (the train_dev.csv[.zip] file)")
    elif dataset_input:
        raise UsageError("--input goes with --dataset")
    elif bool(logs) != bool(judgments):
        raise UsageError("give both --logs and --judgments, or neither to use the embedded default data")


def check_input_path(path: str, what: str) -> None:
    """A file or folder that must exist; a glob pattern may match nothing yet."""
    if not os.path.exists(path) and not any(ch in path for ch in _GLOB):
        raise UsageError(f"{what} input not found: {os.path.abspath(path)}")


def check_config_path(config: Optional[str]) -> None:
    """The --config file, where one is named, must exist (`configs.load_config` reads local files)."""
    if config is None:
        return
    if not config.strip():
        raise UsageError("--config is empty: give a YAML or JSON file, or leave the flag out")
    if not os.path.exists(config):
        raise UsageError(f"config file not found: {config}")
    if not os.path.isfile(config):
        raise UsageError(f"--config {config} is not a file; give a YAML or JSON file")


def check_output_path(path: str, flag: str, folder: bool) -> None:
    """A place the command creates (with any missing folders above it) or overwrites: where it
    exists it must be a folder if `folder`, a file path if not; no file may stand where one of
    its folders belongs, and the nearest folder that exists must be writable. Remote paths
    (gs://) are left to TensorFlow's file system."""
    if "://" in path:
        return
    absolute = os.path.abspath(path)
    if os.path.isdir(absolute) and not folder:
        raise UsageError(f"{flag} {path} is a folder; give the path of a file to write")
    if os.path.exists(absolute) and not os.path.isdir(absolute) and folder:
        raise UsageError(f"{flag} {path} is a file; give a folder (created if missing)")
    above = absolute if folder else os.path.dirname(absolute)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UsageError(f"{flag} {path}: {above} is a file, so no folder can be made there")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {above}")


def check(logs: Optional[str], judgments: Optional[str], dataset: Optional[str],
          dataset_input: Optional[str], config: Optional[str], output: Optional[str] = None) -> None:
    """All of `relkd run`'s checks that need no library: the input flags, the paths they name,
    the config file and the run folder."""
    check_input_choice(logs, judgments, dataset, dataset_input)
    for path, what in ((logs, "logs"), (judgments, "judgments"),
                       (dataset_input, DATASETS.get(dataset or "", ""))):
        if path:
            check_input_path(path, what)
    check_config_path(config)
    if output:
        check_output_path(output, "--output", folder=True)
