"""What `relkd run` checks about the inputs its flags name before TFX, Beam and TensorFlow load.

The runner (`local_runner`) calls the same checks, so a library caller gets the same messages;
the command calls them first, so a mistyped path is answered in a fraction of a second rather
than after the libraries' start-up (seconds). Every other command that takes --config
(`generate`, `compile`) checks that file the same way before it loads anything.
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
    if config and not os.path.exists(config):
        raise UsageError(f"config file not found: {config}")


def check(logs: Optional[str], judgments: Optional[str], dataset: Optional[str],
          dataset_input: Optional[str], config: Optional[str]) -> None:
    """All of `relkd run`'s checks that need no library: the input flags, the paths they name
    and the config file."""
    check_input_choice(logs, judgments, dataset, dataset_input)
    for path, what in ((logs, "logs"), (judgments, "judgments"),
                       (dataset_input, DATASETS.get(dataset or "", ""))):
        if path:
            check_input_path(path, what)
    check_config_path(config)
