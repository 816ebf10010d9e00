"""The Pusher: TFX's own, except that its executor does not push again what is already served.

A `relkd run --resume` whose inputs and settings did not change takes the student from the cache.
The StudentEvaluator then compares it with the latest blessed student, which is that same model,
and blesses it again, and TFX's Pusher would copy it once more under a new timestamp version: its
own check for an earlier copy looks for a directory of the same timestamp, which a new timestamp
never matches. TF Serving would then load the same model again as a new version. Here, when the
newest version under the push destination holds the same files with the same bytes, the push is
recorded against that version (`already_served` 1) and nothing is copied. An older version that
matches does not count: pushing it again makes it the newest, which is a roll-back.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional

from absl import logging
from tfx import types
from tfx.components.pusher import component as pusher_component
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

ALREADY_SERVED_KEY = "already_served"
_CHUNK = 1 << 20


def _files(directory: str) -> Dict[str, int]:
    """Relative path -> size of every file under `directory` (local or any TFX filesystem)."""
    found = {}
    for root, _, names in fileio.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = _size(path)
    return found


def _size(path: str) -> int:
    stat = fileio.stat(path)  # tf.io.gfile's statistics, or os.stat's where TFX's local plugin answers
    return stat.length if hasattr(stat, "length") else stat.st_size


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with fileio.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def newest_version(base_directory: str) -> Optional[str]:
    """The highest numbered version directory under a TF Serving model base, or None."""
    if not fileio.isdir(base_directory):
        return None
    versions = [name.rstrip("/") for name in fileio.listdir(base_directory)
                if name.rstrip("/").isdigit() and fileio.isdir(os.path.join(base_directory, name))]
    return max(versions, key=int) if versions else None


def same_model(model_path: str, served_path: str) -> bool:
    """True if both directories hold the same relative paths with the same bytes."""
    files = _files(model_path)
    if not files or files != _files(served_path):
        return False
    # Sizes first: a different model almost always differs there, and then nothing is read.
    return all(_digest(os.path.join(model_path, f)) == _digest(os.path.join(served_path, f))
               for f in sorted(files))


class Executor(pusher_executor.Executor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") == "filesystem" and self.CheckBlessing(input_dict):
            base = destination.filesystem.base_directory
            version = newest_version(base)
            if version is not None and same_model(self.GetModelPath(input_dict), os.path.join(base, version)):
                model_push = artifact_utils.get_single_instance(
                    output_dict[standard_component_specs.PUSHED_MODEL_KEY])
                self._MarkPushed(model_push, pushed_destination=os.path.join(base, version),
                                 pushed_version=version)
                model_push.set_int_custom_property(ALREADY_SERVED_KEY, 1)
                logging.info("The model is already served as version %s of %s: not copied again.",
                             version, base)
                return
        super().Do(input_dict, output_dict, exec_properties)


class Pusher(pusher_component.Pusher):
    """TFX's Pusher component with the executor above (TFX's way to swap an executor)."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
