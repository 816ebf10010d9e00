"""The `relkd` command."""
from __future__ import annotations

import os
import warnings

# Before TensorFlow is imported anywhere: its C++ start-up chatter (CUDA plugin registration
# on a CPU-only machine) and the libraries' deprecation notices are for developers, not users;
# the run log still gets Python warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import List, Optional

# Only light imports up here: TFX and TensorFlow load (seconds) once a command runs, not for
# --help or a mistyped flag.
from pipeline.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError  # noqa: E402


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline locally (LocalDagRunner; ML Metadata in SQLite or MySQL)",
        description=(
            "Runs the pipeline on one machine. With no input options it generates the embedded "
            "default shop data; otherwise give --logs and --judgments (CSV, Parquet or TFRecord of "
            "tf.Example: a file, a directory or a glob), or --dataset homedepot --input PATH."
        ),
    )
    p.add_argument("--logs", help="search logs: query, item_id, item_title, impressions, clicks[, purchases]")
    p.add_argument("--judgments", help="human judgments: query, item_id, relevance[, item_title]")
    p.add_argument("--dataset", choices=["homedepot"], help="read a known public dataset through its adapter")
    p.add_argument("--input", dest="dataset_input", help="the --dataset file (Home Depot: train_dev.csv or .zip)")
    p.add_argument("--output", default="runs/latest", help="run directory (default: runs/latest)")
    p.add_argument("--config", help="YAML or JSON file of pipeline settings (see pipeline/configs.py)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the steps of an earlier run into the same --output whose inputs and settings "
                        "are unchanged (TFX caching), e.g. to restart after a failure in labelling")


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write the HTML and Markdown validation report of a run",
        description=("Writes <run>/report/report.html (one self-contained page: data statistics and "
                     "anomalies, quarantine counts, graph statistics, teacher and student metrics by "
                     "slice, the gate table, plots) and report.md with the plots as PNG files. "
                     "`relkd run` writes it at the end of every run that reached evaluation."))
    p.add_argument("--run", required=True, help="the --output directory of a `relkd run`")
    p.add_argument("--output", help="where to write the report (default: <run>/report)")


def _cmd_report(args) -> int:
    if args.output:
        from pipeline import run_arguments

        run_arguments.check_output_path(args.output, "--output", folder=True)
    import logging

    from pipeline import report

    # TFMA's readers call APIs that TensorFlow marks deprecated, and TensorFlow says so on the
    # terminal for every run read; `relkd run` sends the same lines to run.log.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        written = report.build_report(args.run, args.output)
    except report.ReportError as e:
        raise UsageError(str(e)) from e
    print(f"Report: {written['html']}")
    print(f"Markdown: {written['markdown']} ({len(written['plots'])} plots next to it)")
    return 0


def _add_score(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="score pairs: one query against items through a model server, or a file offline",
        description=("Online: --target HOST:PORT --model NAME --query Q --items FILE asks a TF Serving "
                     "gRPC server (or `relkd serve`) and prints the items ranked by score. FILE is a CSV "
                     "with item_id,item_title columns. Offline: --model-dir DIR --input pairs.csv "
                     "--output scores.csv scores id,query,item_id,item_title rows with the SavedModel "
                     "(or the newest version under a Pusher folder), streaming, and writes id,score."))
    online = p.add_argument_group("online (gRPC)")
    online.add_argument("--target", help="model server address, e.g. localhost:8500")
    online.add_argument("--model", help="model name on the server (the Pusher's serving.model_name)")
    online.add_argument("--version", type=int, help="a specific model version (default: the newest)")
    online.add_argument("--query", help="the search query")
    online.add_argument("--items", help="CSV of item_id,item_title to rank for the query")
    online.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    online.add_argument("--max-pairs-per-request", type=int, default=1000,
                        help="longer item lists go as several requests, all to the version that "
                             "answered the first (default 1000; TF Serving's batching refuses a "
                             "request over its max_batch_size)")
    offline = p.add_argument_group("offline (batch)")
    offline.add_argument("--model-dir", help="a BERM-O SavedModel, or a folder of numbered versions")
    offline.add_argument("--input", help="CSV with id,query,item_id,item_title")
    offline.add_argument("--output", help="CSV to write id,score to (missing folders are created)")
    offline.add_argument("--batch-size", type=int, default=1024, help="pairs per model call (default 1024)")
    offline.add_argument("--workers", type=int, default=1,
                         help="model calls in flight at once (default 1; output stays in input "
                              "order); with many cores try up to one per core and "
                              "--intra-op-threads 1")
    offline.add_argument("--intra-op-threads", type=int, default=0,
                         help="threads one TensorFlow op may split its work over (default 0: "
                              "TensorFlow's choice)")


def _read_items(path: str):
    import csv

    if not os.path.exists(path):
        raise UsageError(f"--items file not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"item_id", "item_title"} <= set(reader.fieldnames):
            raise UsageError(f"{path}: needs a header with item_id,item_title (found {reader.fieldnames})")
        items = []
        for row in reader:
            if row["item_id"] is None or row["item_title"] is None:  # a row shorter than the header
                raise UsageError(f"{path}, line {reader.line_num}: no item_id or item_title in this "
                                 "row (fewer fields than the header)")
            items.append((row["item_id"], row["item_title"]))
        return items


def _items_warning(items) -> Optional[str]:
    """What in an --items list is likely a mistake, though it is ranked all the same."""
    import collections

    problems = []
    untitled = sum(1 for _, title in items if not (title or "").strip())
    if untitled:
        problems.append(f"{untitled} item(s) with an empty item_title, scored without any words on "
                        "that side")
    repeated = [(item_id, n) for item_id, n in collections.Counter(i for i, _ in items).items() if n > 1]
    if repeated:
        shown = ", ".join(f"{item_id} ({n} times)" for item_id, n in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        problems.append(f"item_id listed more than once: {shown}{more}")
    return "Warning: " + "; ".join(problems) + ": check the items file" if problems else None


def _cmd_score(args) -> int:
    # `is not None`: an empty value (`--query "$Q"` with Q unset) was given, not missing.
    online = [a is not None for a in (args.target, args.model, args.query, args.items)]
    offline = [a is not None for a in (args.model_dir, args.input, args.output)]
    for flag in ("target", "model", "query", "items", "model_dir", "input", "output"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag.replace('_', '-')} is empty" + (
                ": give the search text to rank the items for" if flag == "query" else ""))
    if any(online) and any(offline):
        raise UsageError("give either --target/--model/--query/--items (online) or "
                         "--model-dir/--input/--output (offline), not both")
    if any(offline):
        if not all(offline):
            raise UsageError("offline scoring needs --model-dir, --input and --output")
        from pipeline import batch_scorer

        try:
            batch_scorer.score_file(args.model_dir, args.input, args.output, args.batch_size,
                                    workers=args.workers, intra_op_threads=args.intra_op_threads)
        except batch_scorer.ScoringInputError as e:
            raise UsageError(str(e)) from e
        return 0
    if not all(online):
        raise UsageError("online scoring needs --target, --model, --query and --items "
                         "(or use --model-dir/--input/--output to score a file)")
    if args.max_pairs_per_request < 1:
        raise UsageError("--max-pairs-per-request must be at least 1")
    from pipeline import scoring_client

    items = _read_items(args.items)
    if not items:
        raise UsageError(f"{args.items} lists no items")
    with scoring_client.ScoringClient(args.target, args.model, args.version, timeout=args.timeout,
                                      max_pairs_per_request=args.max_pairs_per_request) as client:
        try:
            ranked = client.rank(args.query, items)
        except scoring_client.ScoringError as e:
            print(f"relkd score: error: {e}", file=sys.stderr)
            return EXIT_FAILED
    print(f"{'rank':>4}  {'score':>7}  item_id  item_title")
    for entry in ranked:
        print(f"{entry.rank:>4}  {entry.score:7.4f}  {entry.item_id}  {entry.item_title}")
    warning = _items_warning(items)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve pushed models over TF Serving's gRPC API (for machines without TF Serving)",
        description=("Serves the numbered versions under --model-base (the Pusher's "
                     "<serving base>/<model name>) with TF Serving's PredictionService (Predict, "
                     "GetModelMetadata) and ModelService (GetModelStatus): the newest version by "
                     "default, any loaded one on request; new versions are loaded as they appear. "
                     "In production use the tensorflow/serving image (kubeflow/serving/)."))
    p.add_argument("--model-base", required=True, help="folder of numbered SavedModel versions")
    p.add_argument("--model-name", help="name clients ask for (default: the folder's name)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500, TF Serving's)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often to look for new versions")
    p.add_argument("--max-versions", type=int, default=2, help="newest versions kept loaded (default 2)")
    p.add_argument("--batching", action="store_true",
                   help="score concurrent requests for the same version and signature in one model "
                        "call (as TF Serving's --enable_batching); off by default")
    p.add_argument("--max-batch-size", type=int, default=1000,
                   help="with --batching: most rows (pairs) per merged call (default 1000); a larger "
                        "request runs alone")
    p.add_argument("--batch-timeout-ms", type=float, default=0.0,
                   help="with --batching: how long a request waits for others to join it (default 0: "
                        "it takes only those already queued, which under load is plenty)")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="threads one TensorFlow op may split its work over (TF Serving's "
                        "--tensorflow_intra_op_parallelism; default 1: BERM-O's ops are small, and "
                        "concurrent requests use the other cores; 0: TensorFlow's choice)")
    p.add_argument("--inter-op-threads", type=int, default=0,
                   help="threads that run independent ops, of one request or of concurrent ones "
                        "(TF Serving's --tensorflow_inter_op_parallelism; default 0: TensorFlow's "
                        "choice, the machine's cores)")


def _cmd_serve(args) -> int:
    from pipeline import model_server

    if args.max_versions < 1 or args.poll_seconds <= 0:
        raise UsageError("--max-versions must be >= 1 and --poll-seconds > 0")
    if args.max_batch_size < 1 or args.batch_timeout_ms < 0:
        raise UsageError("--max-batch-size must be >= 1 and --batch-timeout-ms >= 0")
    if args.intra_op_threads < 0 or args.inter_op_threads < 0:
        raise UsageError("--intra-op-threads and --inter-op-threads must be >= 0 (0: TensorFlow's choice)")
    try:
        return model_server.serve(args.model_base, args.model_name, args.host, args.port,
                                  args.poll_seconds, args.max_versions, batching=args.batching,
                                  max_batch_size=args.max_batch_size,
                                  batch_timeout_seconds=args.batch_timeout_ms / 1000.0,
                                  intra_op_threads=args.intra_op_threads,
                                  inter_op_threads=args.inter_op_threads)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(str(e)) from e


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="write the embedded default shop data as CSV files")
    p.add_argument("--output", required=True, help="directory for logs.csv and judgments.csv")
    p.add_argument("--config", help="YAML or JSON settings; the default_data section sets size and seed")
    p.add_argument("--truth", action="store_true", help="also write truth.csv (hidden true relevance)")


def _add_compile(subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile the pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines",
        description=(
            "Compiles the same pipeline `relkd run` executes into a pipeline spec for a cluster "
            "(KubeflowV2DagRunner). OUT.json is a PipelineJob for Vertex AI; OUT.yaml the bare "
            "PipelineSpec for kfp.Client(). Image, pipeline root, default inputs and Beam arguments "
            "come from the config's kubeflow section (see README)."
        ),
    )
    p.add_argument("--kubeflow", required=True, metavar="OUT",
                   help="where to write the compiled pipeline (.json or .yaml; a gs:// path works too)")
    p.add_argument("--config", help="YAML or JSON file of pipeline settings (see pipeline/configs.py)")
    p.add_argument("--image", help="container image of every step (default: the config's kubeflow.image)")


def _cmd_compile(args) -> int:
    from pipeline import run_arguments

    run_arguments.check_output_path(args.kubeflow, "--kubeflow", folder=False)
    from kubeflow import runner
    from pipeline import configs

    overrides = {"kubeflow": {"image": args.image}} if args.image is not None else None
    config = configs.load_config(args.config, overrides)
    job = runner.compile_pipeline(config, args.kubeflow)
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    print(f"Compiled pipeline '{config.name}' ({len(tasks)} steps) for Kubeflow Pipelines v2 / Vertex AI: {args.kubeflow}")
    parameters = runner.runtime_parameters(config)
    width = max(len(p.name) for p in parameters)
    print(f"  {'image':>{width}}: {config.kubeflow.image}")
    print(f"  {'pipeline root':>{width}}: {config.kubeflow.pipeline_root}")
    print(f"  {'beam args':>{width}}: {' '.join(runner.step_beam_args(config)) or '(none)'}")
    limits = "; ".join(
        f"{step} " + ", ".join(f"cpu {v:g}" if k == "cpu" else f"memory {v:g} GB"
                               for k, v in sorted(step_limits.items()))
        for step, step_limits in sorted(config.kubeflow.resources.items()))
    print(f"  {'resources':>{width}}: {limits or 'the platform defaults'}")
    threads = []
    for label, executor in sorted(job["pipelineSpec"]["deploymentSpec"]["executors"].items()):
        env = {v["name"]: v["value"] for v in executor.get("container", {}).get("env", [])}
        if "TF_NUM_INTRAOP_THREADS" in env:
            threads.append(f"{label.removesuffix('_executor')} {env['TF_NUM_INTRAOP_THREADS']}")
    threads_text = "; ".join(threads) + " per process and pool" if threads else "TensorFlow's choice"
    print(f"  {'tf threads':>{width}}: {threads_text}")
    for p in parameters:
        print(f"  {p.name:>{width}}: {p.default!r} ({p.ptype.__name__}, runtime parameter)")
    return 0


def _cmd_run(args) -> int:
    from pipeline import run_arguments

    run_arguments.check(args.logs, args.judgments, args.dataset, args.dataset_input, args.config,
                        args.output)
    from pipeline import configs, local_runner

    config = configs.load_config(args.config)
    outcome = local_runner.run(config, args.output, logs=args.logs, judgments=args.judgments,
                               dataset=args.dataset, dataset_input=args.dataset_input, resume=args.resume)
    local_runner.print_summary(outcome)
    return outcome.exit_code


def _cmd_generate(args) -> int:
    import dataclasses

    from pipeline import run_arguments

    run_arguments.check_output_path(args.output, "--output", folder=True)
    from pipeline import configs, default_data

    config = configs.load_config(args.config)
    spec = default_data.ShopSpec(**dataclasses.asdict(config.default_data))
    made = default_data.write(args.output, spec, write_truth=args.truth)
    for name, path in made.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relkd", description="Knowledge-distilled relevance models for product search.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    _add_generate(subparsers)
    _add_compile(subparsers)
    _add_report(subparsers)
    _add_score(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": _cmd_run, "generate": _cmd_generate, "compile": _cmd_compile,
                "report": _cmd_report, "score": _cmd_score, "serve": _cmd_serve}
    try:
        if hasattr(args, "config"):
            from pipeline import run_arguments

            # Before any command loads the libraries its config module pulls in (Beam: seconds).
            run_arguments.check_config_path(args.config)
        return commands[args.command](args)
    except UsageError as e:
        print(f"relkd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C outside a run's steps (those say more: local_runner)
        print(f"relkd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:
        # A config file that cannot be used, or an input that cannot be read at all.
        from components.ingest.readers import InputError
        from pipeline.configs import ConfigError
        from pipeline.default_data import SpecError

        if isinstance(e, (ConfigError, InputError, SpecError)):
            print(f"relkd {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
