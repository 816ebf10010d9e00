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

from pipeline import configs  # noqa: E402
from pipeline.local_runner import EXIT_USAGE, UsageError  # noqa: E402


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline locally (LocalDagRunner, ML Metadata in SQLite)",
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
    from kubeflow import runner

    overrides = {"kubeflow": {"image": args.image}} if args.image else None
    config = configs.load_config(args.config, overrides)
    job = runner.compile_pipeline(config, args.kubeflow)
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    print(f"Compiled pipeline '{config.name}' ({len(tasks)} steps) for Kubeflow Pipelines v2 / Vertex AI: {args.kubeflow}")
    print(f"  {'image':>24}: {config.kubeflow.image}")
    print(f"  {'pipeline root':>24}: {config.kubeflow.pipeline_root}")
    print(f"  {'beam args':>24}: {' '.join(config.kubeflow.beam_pipeline_args) or '(none)'}")
    for p in runner.runtime_parameters(config):
        print(f"  {p.name:>24}: {p.default!r} ({p.ptype.__name__}, runtime parameter)")
    return 0


def _cmd_run(args) -> int:
    from pipeline import local_runner

    config = configs.load_config(args.config)
    outcome = local_runner.run(config, args.output, logs=args.logs, judgments=args.judgments,
                               dataset=args.dataset, dataset_input=args.dataset_input, resume=args.resume)
    local_runner.print_summary(outcome)
    return outcome.exit_code


def _cmd_generate(args) -> int:
    import dataclasses

    from pipeline import default_data

    config = configs.load_config(args.config)
    spec = default_data.ShopSpec(**dataclasses.asdict(config.default_data))
    made = default_data.write(args.output, spec, write_truth=args.truth)
    for name, path in made.items():
        print(f"{name}: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="relkd", description="Knowledge-distilled relevance models for product search.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    _add_generate(subparsers)
    _add_compile(subparsers)
    args = parser.parse_args(argv)
    commands = {"run": _cmd_run, "generate": _cmd_generate, "compile": _cmd_compile}
    try:
        return commands[args.command](args)
    except (UsageError, configs.ConfigError) as e:
        print(f"relkd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        # InputError and friends: the input cannot be read at all.
        from components.ingest.readers import InputError

        if isinstance(e, InputError):
            print(f"relkd {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
