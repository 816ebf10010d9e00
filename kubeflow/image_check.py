"""Checks that an environment can run every step of the compiled pipeline.

`python -m kubeflow.image_check [--config FILE]` compiles the pipeline and checks that every
executor class, `run_fn`, custom artifact type and schema file the spec names resolves here.
kubeflow/Dockerfile runs it as its last step, so an image that lacks a module or a schema
fails to build instead of failing on the cluster.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml


def _constants(task: Dict[str, Any], key: str) -> Iterator[str]:
    value = task.get("inputs", {}).get("parameters", {}).get(key, {}).get("runtimeValue", {}).get("constant")
    if isinstance(value, str):
        yield value


def referenced(job: Dict[str, Any]) -> Dict[str, List[Tuple[str, str]]]:
    """What the spec asks of the image: (where, name) of classes, functions and files."""
    spec = job["pipelineSpec"]
    found: Dict[str, List[Tuple[str, str]]] = {"classes": [], "functions": [], "modules": [], "files": []}
    for label, executor in sorted(spec["deploymentSpec"]["executors"].items()):
        args = executor.get("container", {}).get("args", [])
        if "--executor_class_path" in args:
            found["classes"].append((label, args[args.index("--executor_class_path") + 1]))
    for name, task in sorted(spec["root"]["dag"]["tasks"].items()):
        found["functions"] += [(name, f) for f in _constants(task, "run_fn")]
        found["files"] += [(name, f) for f in _constants(task, "schema_file")]
        found["modules"] += [(name, m) for m in _constants(task, "module_path")]  # Evaluator UDFs
    for name, component in sorted(spec["components"].items()):
        for side in ("inputDefinitions", "outputDefinitions"):
            for key, artifact in component.get(side, {}).get("artifacts", {}).items():
                schema = artifact.get("artifactType", {}).get("instanceSchema")
                title = (yaml.safe_load(schema) or {}).get("title", "") if schema else ""
                if title and not title.startswith("tfx."):
                    found["classes"].append((f"{name}.{key}", title))
    return found


def problems(job: Dict[str, Any]) -> List[str]:
    """What in the compiled pipeline does not resolve in this Python environment."""
    from tfx.utils import import_utils

    found, out = referenced(job), []
    for where, path in found["classes"]:
        try:
            import_utils.import_class_by_path(path)
        except Exception as e:  # noqa: BLE001 - reported, whatever the import raised
            out.append(f"{where}: cannot import {path}: {type(e).__name__}: {e}")
    for where, path in found["functions"]:
        try:
            import_utils.import_func_from_module(*path.rsplit(".", 1))
        except Exception as e:  # noqa: BLE001
            out.append(f"{where}: cannot import {path}: {type(e).__name__}: {e}")
    for where, path in found["modules"]:
        try:
            importlib.import_module(path)
        except Exception as e:  # noqa: BLE001
            out.append(f"{where}: cannot import module {path}: {type(e).__name__}: {e}")
    for where, path in found["files"]:
        if not os.path.isfile(path):
            out.append(f"{where}: no file {path}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeflow.image_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML or JSON pipeline settings (default: built-in defaults)")
    args = parser.parse_args(argv)

    from kubeflow import runner
    from pipeline import configs

    job = runner.compile_pipeline(configs.load_config(args.config))
    found = problems(job)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    counts = {k: len(v) for k, v in referenced(job).items()}
    print(f"image check: {counts['classes']} classes, {counts['functions']} run_fn(s), "
          f"{counts['modules']} Evaluator module(s), "
          f"{counts['files']} schema files of {len(job['pipelineSpec']['root']['dag']['tasks'])} steps resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
