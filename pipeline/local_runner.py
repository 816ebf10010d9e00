"""Runs the relkd pipeline on one machine: LocalDagRunner, ML Metadata in SQLite, Beam DirectRunner.

Layout of an output directory:
  inputs/            canonical CSVs made from the embedded generator or a dataset adapter
  pipeline_root/     TFX artifacts, one directory per component and execution
  metadata.sqlite    ML Metadata (lineage of every artifact)
  run.log            everything TFX, Beam and TensorFlow logged
  tmp/               temporary files of the steps while the run lasts (pipeline/scratch.py)
  run_summary.json   row accounting, split sizes, gate verdict, artifact paths (also .md)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, Optional

from pipeline import metadata, run_arguments, run_lock, run_summary
from pipeline.configs import PipelineConfig
# The codes are read from the runner too (local_runner.EXIT_OK), so all of them are imported.
from pipeline.exit_codes import (EXIT_DATA_REJECTED, EXIT_FAILED, EXIT_INTERRUPTED,  # noqa: F401
                                 EXIT_NOT_BLESSED, EXIT_OK, EXIT_USAGE, UsageError)
from pipeline.pipeline import InputSpec, create_pipeline
from pipeline.progress import ProgressReporter
from pipeline.scratch import scratch_directory


@dataclasses.dataclass
class RunOutcome:
    exit_code: int
    summary: Dict[str, Any]
    summary_path: str
    message: str = ""


def input_spec(path: str, what: str) -> InputSpec:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return InputSpec(base=path, pattern="*")
    run_arguments.check_input_path(path, what)
    return InputSpec(base=os.path.dirname(path), pattern=os.path.basename(path))


def _publish(made: Dict[str, Any], target_dir: str) -> Dict[str, str]:
    """Moves freshly made input files into place unless identical files are already there.

    Keeping an unchanged file untouched keeps its ExampleGen fingerprint (which includes the
    modification time), so `--resume` can reuse the steps that read it.
    """
    import filecmp
    import shutil

    os.makedirs(target_dir, exist_ok=True)
    published = {}
    for name, path in made.items():
        if not isinstance(path, str) or not os.path.isfile(path):
            continue
        target = os.path.join(target_dir, os.path.basename(path))
        if os.path.exists(target) and filecmp.cmp(path, target, shallow=False):
            os.remove(path)
        else:
            shutil.move(path, target)
        published[name] = target
    return published


def prepare_inputs(config: PipelineConfig, output_dir: str, logs: Optional[str], judgments: Optional[str],
                   dataset: Optional[str], dataset_input: Optional[str],
                   echo: Callable[[str], None]) -> Dict[str, str]:
    """Returns paths of the logs and judgments the pipeline will read, making them if needed."""
    inputs_dir = os.path.join(output_dir, "inputs")
    run_arguments.check_input_choice(logs, judgments, dataset, dataset_input)
    if dataset:
        from pipeline import homedepot

        echo(f"Converting the Home Depot file {dataset_input} into canonical logs and judgments ...")
        made = homedepot.convert(dataset_input, os.path.join(inputs_dir, ".staging"))
        made.update(_publish(made, inputs_dir))
        # The adapter writes UTF-8 whatever the source encoding was.
        config.data.encoding = "utf-8"
        echo(f"  {made['rows']} rows -> {made['logs']}, {made['judgments']}")
        return {"logs": made["logs"], "judgments": made["judgments"]}
    if logs:
        return {"logs": logs, "judgments": judgments}
    from pipeline import default_data

    spec = default_data.ShopSpec(**dataclasses.asdict(config.default_data))
    echo(f"Generating the embedded default shop data (seed {spec.seed}, {spec.num_queries} queries, "
         f"{spec.num_items} items) ...")
    made = _publish(default_data.write(os.path.join(inputs_dir, ".staging"), spec), inputs_dir)
    return {"logs": made["logs"], "judgments": made["judgments"]}


def _configure_logging(log_path: str) -> logging.Handler:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    root = logging.getLogger()
    # Everything goes to run.log; the terminal only gets the progress lines and the summary.
    for handler in list(root.handlers):
        if isinstance(handler, absl_logging.ABSLHandler) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    # TensorFlow's Python logger has its own stderr handler; send it through the root instead.
    tf_logger = logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)
    tf_logger.propagate = True
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return file_handler


def serving_base(config: PipelineConfig, output_dir: str) -> str:
    """<base>/<model name>: where blessed BERM-O versions go (the Pusher's base_directory)."""
    base = config.serving.base_directory or os.path.join(output_dir, "serving")
    return os.path.join(base, config.serving.model_name)


def run(config: PipelineConfig, output_dir: str, logs: Optional[str] = None, judgments: Optional[str] = None,
        dataset: Optional[str] = None, dataset_input: Optional[str] = None,
        echo: Callable[[str], None] = print, resume: bool = False) -> RunOutcome:
    """Runs the pipeline into output_dir.

    With `resume`, TFX's cache (in this output's ML Metadata) reuses every step whose inputs
    and settings are unchanged, so a run that died in a late step (say, labelling) restarts
    there instead of from scratch.
    """
    import copy

    config = copy.deepcopy(config)  # Input preparation and --resume adjust it for this run only.
    if resume:
        config.enable_cache = True
    run_arguments.check_output_path(output_dir, "--output", folder=True)
    if config.serving.base_directory:
        run_arguments.check_output_path(config.serving.base_directory, "serving.base_directory",
                                        folder=True)
    if config.metadata.backend == "sqlite" and config.metadata.sqlite_path:
        run_arguments.check_output_path(config.metadata.sqlite_path, "metadata.sqlite_path",
                                        folder=False)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with run_lock.holding(output_dir):
        return _run(config, output_dir, logs, judgments, dataset, dataset_input, echo)


def _run(config: PipelineConfig, output_dir: str, logs: Optional[str], judgments: Optional[str],
         dataset: Optional[str], dataset_input: Optional[str], echo: Callable[[str], None]
         ) -> RunOutcome:
    from tfx import v1 as tfx

    connection = metadata.connection_config(config.metadata, os.path.join(output_dir, "metadata.sqlite"))
    metadata.check_reachable(connection)
    paths = prepare_inputs(config, output_dir, logs, judgments, dataset, dataset_input, echo)
    log_path = os.path.join(output_dir, "run.log")
    pipeline_root = os.path.join(output_dir, "pipeline_root")
    tfx_pipeline = create_pipeline(
        config,
        pipeline_root=pipeline_root,
        logs=input_spec(paths["logs"], "logs"),
        judgments=input_spec(paths["judgments"], "judgments"),
        metadata_connection_config=connection,
        serving_base=os.path.dirname(serving_base(config, output_dir)),
    )
    node_ids = [c.id for c in tfx_pipeline.components]
    file_handler = _configure_logging(log_path)
    reporter = ProgressReporter(node_ids, echo=echo)
    logging.getLogger().addHandler(reporter)
    echo(f"Running pipeline '{config.name}' ({len(node_ids)} steps) into {output_dir}; full log: {log_path}")
    started = time.monotonic()
    started_ms = int(time.time() * 1000)
    error, exit_code = None, EXIT_OK
    try:
        with reporter, scratch_directory(os.path.join(output_dir, "tmp")):
            tfx.orchestration.LocalDagRunner().run(tfx_pipeline)
    except KeyboardInterrupt:
        # Ctrl-C: the steps that finished are in the metadata, so --resume starts where this
        # one stopped; the person gets that sentence, not TensorFlow's stack.
        logging.getLogger(__name__).error("run interrupted:\n%s", traceback.format_exc())
        exit_code = EXIT_INTERRUPTED
        error = (f"interrupted during step {reporter.current or '?'}; the steps that finished are "
                 "kept: run the same command with --resume to reuse them")
    except Exception as e:  # Reported below with the step that failed; the traceback goes to run.log.
        from components.data_gate import DataRejectedError
        from components.ingest.readers import InputError

        logging.getLogger(__name__).error("run failed:\n%s", traceback.format_exc())
        if isinstance(e, DataRejectedError):
            exit_code, error = EXIT_DATA_REJECTED, str(e)
        elif isinstance(e, InputError):
            exit_code, error = EXIT_USAGE, f"step {reporter.current or '?'} cannot read its input: {e}"
        else:
            exit_code = EXIT_FAILED
            error = (f"step {reporter.current or '?'} failed: {type(e).__name__}: {_shortened(e)} "
                     f"(traceback in {log_path})")
    finally:
        logging.getLogger().removeHandler(reporter)
        file_handler.flush()

    try:
        summary = run_summary.collect(tfx_pipeline.metadata_connection_config, config.name, node_ids,
                                      gates=config.evaluation.gates, ndcg_k=config.evaluation.ndcg_k,
                                      since_ms=started_ms)
    except Exception as e:  # The store went away mid-run (a MySQL server): the run's own error still counts.
        logging.getLogger(__name__).error("reading the run's metadata failed:\n%s", traceback.format_exc())
        summary = {"nodes": {}, "inputs": {}}
        if exit_code == EXIT_OK:
            exit_code = EXIT_FAILED
            error = (f"the steps finished, but their ML Metadata "
                     f"({metadata.describe(tfx_pipeline.metadata_connection_config)}) could not be "
                     f"read: {type(e).__name__}: {e} (traceback in {log_path})")
    student = (summary.get("evaluation") or {}).get("student") or {}
    if exit_code == EXIT_OK and student and not student.get("blessed"):
        # The pipeline finished, but the model in serving stays what it was.
        exit_code = EXIT_NOT_BLESSED
        error = "the student did not pass its gates and was not pushed:\n  " + "\n  ".join(
            run_summary.gate_failures(summary) or ["see the gate table in run_summary.md"])
    statuses = {EXIT_OK: "succeeded", EXIT_DATA_REJECTED: "data rejected",
                EXIT_NOT_BLESSED: "succeeded, model not pushed", EXIT_INTERRUPTED: "interrupted"}
    summary.update({
        "status": statuses.get(exit_code, "failed"),
        "error": error,
        "wall_seconds": round(time.monotonic() - started, 1),
        "durations": {k: round(v, 2) for k, v in reporter.durations.items()},
        "config": config.to_dict(),
        "paths": {
            "output": output_dir, "logs input": os.path.abspath(paths["logs"]),
            "judgments input": os.path.abspath(paths["judgments"]), "pipeline root": pipeline_root,
            "metadata": metadata.describe(tfx_pipeline.metadata_connection_config), "log": log_path,
            "serving models": serving_base(config, output_dir),
            **{f"{kind} quarantine": entry["quarantine_dir"]
               for kind, entry in summary["inputs"].items() if "quarantine_dir" in entry},
        },
    })
    summary_path = os.path.join(output_dir, "run_summary.json")
    _write_summary(summary, output_dir)
    if (summary.get("evaluation") or {}).get("student"):
        from pipeline import report  # matplotlib and TFMA readers: only when there is something to show.

        try:
            written = report.build_report(output_dir)
            summary["paths"]["report"] = written["html"]
            _write_summary(summary, output_dir)
        except Exception:  # The run's outcome stands; `relkd report --run` can retry.
            logging.getLogger(__name__).error("report failed:\n%s", traceback.format_exc())
            echo(f"Writing the report failed (traceback in {log_path}); "
                 f"retry with: relkd report --run {output_dir}")
    return RunOutcome(exit_code, summary, summary_path, error or "")


def _shortened(error: BaseException, limit: int = 600) -> str:
    """A library's message cut to a screenful (Beam's TFRecord reader quotes a corrupt record's
    bytes in hex); run.log keeps it whole."""
    text = str(error)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit:,} more characters in run.log)"


def _write_summary(summary: Dict[str, Any], output_dir: str) -> None:
    with open(os.path.join(output_dir, "run_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(output_dir, "run_summary.md"), "w", encoding="utf-8") as f:
        f.write(run_summary.to_markdown(summary))


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def print_summary(outcome: RunOutcome, echo: Callable[[str], None] = print,
                  warn: Callable[[str], None] = _to_stderr) -> None:
    """The run's outcome for people: figures and paths through `echo`, and the reason a run
    did not succeed through `warn` (stderr), where scripts that keep only errors look."""
    summary = outcome.summary
    echo("")
    for kind, entry in summary.get("inputs", {}).items():
        if "rows_in" not in entry:
            continue
        reasons = ", ".join(f"{r} {n}" for r, n in entry["quarantined_by_reason"].items())
        splits = entry.get("examples_per_split", {})
        echo(f"{kind:>10}: {entry['rows_in']} rows in = {entry['accepted']} accepted + "
             f"{entry['quarantined']} quarantined" + (f" ({reasons})" if reasons else ""))
        if splits:
            echo(" " * 12 + "examples per split: " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    graph = summary.get("graph")
    if graph:
        echo(f"{'graph':>10}: {graph['nodes']['query']} queries, {graph['nodes']['item']} items, "
             f"{graph['edges']['after_hub_cap']} edges, {graph['capped_hubs']['total']} hubs capped")
        without_tables = run_summary.nodes_without_tables(graph)
        if without_tables:
            echo(" " * 12 + f"without tables in BERM-O (< {graph['table_min_impressions']} "
                 f"impressions): {without_tables}")
        untitled = run_summary.judgments_without_title(graph)
        if untitled:
            warn(f"Warning: {untitled}")
    for name in ("teacher", "student"):
        metrics = summary.get(name)
        if metrics:
            shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if k.startswith("val_"))
            echo(f"{name:>10}: {metrics['epochs']} epochs; last epoch on eval: {shown or '-'}")
    evaluation = summary.get("evaluation") or {}
    for name in ("teacher", "student"):
        values = (evaluation.get(name) or {}).get("candidate")
        if values:
            shown = ", ".join(f"{k} {v}" for k, v in values.items()
                              if k in ("auc", f"ndcg@{summary['config']['evaluation']['ndcg_k']}",
                                       "teacher_agreement", "judgment_mse", "example_count"))
            echo(f"{'eval ' + name:>10}: {shown}")
    push = evaluation.get("push")
    if push and push.get("pushed"):
        again = " (already served there: not copied again)" if push.get("already_served") else ""
        echo(f"{'pushed':>10}: BERM-O version {push.get('version')} -> {push.get('destination')}{again}")
    if outcome.message:
        echo("")
        (echo if outcome.exit_code == EXIT_OK else warn)(outcome.message)
    echo("")
    echo(f"Run {summary['status']} in {summary['wall_seconds']:.0f}s. Outputs:")
    for name, path in summary["paths"].items():
        echo(f"  {name:>20}: {path}")
    echo(f"  {'summary':>20}: {outcome.summary_path} (and run_summary.md)")
