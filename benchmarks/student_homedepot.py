"""Benchmark of the distilled student (BERM) and its serving form BERM-O on the Home Depot data.

One run produces the README's student results table: AUC (relevant = relevance >= 2.33),
per-query AUC and NDCG@10 on the held-out `test` queries for the IDF overlap baseline, the
teacher, the student with max_order k = 0, 1, 2 (the ablation) and BERM-O, plus the scoring
throughput of BERM-O against the teacher (same machine, same batch, same run), p50/p99 latency
of a batch of 100 pairs, and the SavedModel sizes::

    .venv/bin/python benchmarks/student_homedepot.py --out student_homedepot.json

The setting is the paper's: every Home Depot pair is a logged impression (the data has no
clicks), so the query-item graph is built from all of them; human judgments exist for the
`train` and `eval` queries only (`test` judgments are withheld and used for the metrics).

1. Data: the pipeline's own adapter, row rules and by-query split (`teacher_homedepot`):
   train / eval / test = 8/1/1 hash buckets of the query, as the ExampleGen splits it.
2. Teacher: fine-tuned on the `train` judgments (or a by-query subsample) through
   `trainer.teacher.run_fn`, early-stopped on `eval` (or `--teacher-model DIR`: an exported
   teacher SavedModel to reuse, e.g. from an earlier `--work-dir`).
3. Labelling: the teacher scores every logged pair (`serve_raw`); that is `teacher_score`,
   the distillation target, as the pipeline's BulkInferrer writes it.
4. Graph: `components.graph.metapaths.ComputeNeighbourContexts` (the GraphContexts
   component's Beam transform, on DirectRunner) builds the neighbour tables from all logs
   and `JoinContexts` joins every logged pair with its contexts, as the component does.
   A second table set is built from the `train` and `eval` logs only, for the cold-start
   row: BERM-O scoring `test` queries that were never logged (its title table, too, then keeps
   only the titles of those logs: the items shown only with test queries were never logged).
   Then the TitleEncoder component's Beam pipeline (`components.title_encoder.encode_texts`)
   encodes every logged title and the `train` queries with the pretrained sentence encoder,
   for the students' title-vector path (`--no-title-vectors`: students without it).
5. Students: `trainer.student.run_fn` distils each max_order in `--orders` from the teacher
   scores of the `train` logs, early-stopping on the `eval` logs, and exports BERM-O with
   the tables inside. Student rows score the joined `test` examples through
   `serving_default` (the contexts come from the examples); the BERM-O rows score raw
   (query, item_id, item_title) strings through `serve_raw` (contexts from the tables in
   the model). One more student (`--human-order`, default k=1) learns the teacher's scores and
   the `train` judgments (`--human-loss-weight`, default 3; 0 drops the row), the same
   judgments the teacher fine-tunes on.
6. Speed: teacher and BERM-O `serve_raw` over the `test` pairs, each model in its own TF1
   session as TF Serving runs it, with the threads per op its server gives it
   (`--teacher-intra-op-threads`, 0: every core; `--berm-intra-op-threads`, 1, as `relkd serve`
   and the deployment), after one warm-up call each: throughput (pairs over the summed call
   time) in batches of `--throughput-batch-size` (1000, the same for both), then p50/p99 of
   the per-call time in batches of `--batch-size` (100), each race `--race-passes` (3) times
   over the test pairs. Every race runs twice: the models alternating call by call (each
   BERM-O call finds the machine cold after a teacher call; the README's table), then in
   streams (each model scores a whole pass back to back, as a loaded server does).
   `--race-only --work-dir DIR` repeats just this step with the models an earlier run kept in
   DIR, or with any teacher and BERM-O given by `--teacher-model` and `--berm-model` (say, the
   ones a pipeline run trained and pushed).

Everything runs on this machine's CPU; TensorFlow uses every core, so note the load (the
JSON records the load average before and after).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

# As `relkd` does: TensorFlow's C++ start-up chatter (CUDA plugins on a CPU-only machine) and
# the libraries' deprecation notices would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import relevance_metrics as rm  # noqa: E402
from benchmarks import serving_session  # noqa: E402
from benchmarks import teacher_homedepot as th  # noqa: E402

SPLITS = th.SPLITS
NDCG_K = th.NDCG_K
LABEL_BATCH = 256
TITLE_VECTORS = "title_vectors"  # the TitleEncoder's output under --work-dir
NO_JUDGMENT = -1.0  # components.graph.executor.NO_JUDGMENT: a logged pair without a judgment


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Steps ---------------------------------------------------------------------------------

def fine_tune_teacher(args, parts, work_dir: str) -> Dict[str, Any]:
    from tfx.components.trainer.fn_args_utils import FnArgs

    from trainer import teacher

    train_records = th.subsample_by_query(parts["train"], args.max_teacher_train_pairs)
    examples_dir = os.path.join(work_dir, "teacher_examples")
    th.write_tfrecords(train_records, os.path.join(examples_dir, "Split-train", "data.tfrecord.gz"))
    th.write_tfrecords(parts["eval"], os.path.join(examples_dir, "Split-eval", "data.tfrecord.gz"))
    custom_config = dict(teacher.PROFILES[args.teacher_profile], seed=args.seed,
                         epochs=args.teacher_epochs)
    model_dir = os.path.join(work_dir, "teacher_model")
    fn_args = FnArgs(train_files=[os.path.join(examples_dir, "Split-train", "*")],
                     eval_files=[os.path.join(examples_dir, "Split-eval", "*")],
                     serving_model_dir=model_dir,
                     model_run_dir=os.path.join(work_dir, "teacher_run"),
                     custom_config=custom_config)
    log(f"teacher: fine-tuning on {len(train_records)} train pairs, custom_config {custom_config}")
    start = time.perf_counter()
    teacher.run_fn(fn_args)
    seconds = time.perf_counter() - start
    log(f"teacher: fine-tuned in {seconds:.0f}s -> {model_dir}")
    return {"model_dir": model_dir, "fine_tune_seconds": seconds, "train_pairs": len(train_records),
            "train_queries": len({r["query"] for r in train_records}),
            "custom_config": custom_config}


def score_raw(signature, queries, titles, item_ids=None, batch_size: int = LABEL_BATCH):
    """Scores through a `serve_raw` signature in batches; returns float64 [N]."""
    import numpy as np
    import tensorflow as tf

    out = []
    for i in range(0, len(queries), batch_size):
        inputs = {"query": tf.constant(queries[i:i + batch_size]),
                  "item_title": tf.constant(titles[i:i + batch_size])}
        if item_ids is not None:
            inputs["item_id"] = tf.constant(item_ids[i:i + batch_size])
        out.append(signature(**inputs)["score"].numpy())
    return np.concatenate(out).astype(float) if out else np.zeros([0])


def build_graph(log_rows: Sequence[Dict[str, Any]], graph_config, tables_dir: str,
                examples_dir: Optional[str] = None, example_rows=None) -> None:
    """The GraphContexts component's Beam work on in-memory rows (DirectRunner).

    Writes the neighbour tables to `tables_dir` and, with `examples_dir`, each split of
    `example_rows` joined with its contexts to `examples_dir/Split-<split>/`.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from components import example_codec
    from components.graph import metapaths

    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    with beam.Pipeline(options=options) as pipeline:
        logs = pipeline | "Logs" >> beam.Create(list(log_rows), reshuffle=False)
        contexts = logs | "Contexts" >> metapaths.ComputeNeighbourContexts(graph_config)
        _ = (contexts.neighbour_tables
             | "TableToExample" >> beam.Map(
                 lambda r: metapaths.neighbour_record_to_tf_example(r).SerializeToString())
             | "WriteTables" >> beam.io.WriteToTFRecord(os.path.join(tables_dir, "tables"),
                                                        file_name_suffix=".gz"))
        _ = (contexts.graph_stats
             | "StatsToJson" >> beam.Map(lambda s: json.dumps(s, sort_keys=True))
             | "WriteStats" >> beam.io.WriteToText(os.path.join(tables_dir, "stats.json"),
                                                   num_shards=1, shard_name_template=""))
        for split, rows in (example_rows or {}).items():
            _ = (pipeline
                 | f"Examples[{split}]" >> beam.Create(list(rows), reshuffle=False)
                 | f"Join[{split}]" >> metapaths.JoinContexts(
                     contexts.neighbour_tables, graph_config.max_order, label=f"JoinContexts[{split}]")
                 | f"ToExample[{split}]" >> beam.Map(
                     lambda r: example_codec.to_example(r).SerializeToString())
                 | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                     os.path.join(examples_dir, f"Split-{split}", "data_tfrecord"),
                     file_name_suffix=".gz"))


def read_examples(pattern: str) -> List[bytes]:
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(pattern))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def encode_title_vectors(examples_dir: str, out_dir: str) -> None:
    """The TitleEncoder component's Beam pipeline on the joined examples of every split."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from tfx.types import artifact_utils, standard_artifacts

    from components import title_encoder
    from pipeline.configs import PipelineConfig

    examples = standard_artifacts.Examples()
    examples.uri = examples_dir
    examples.split_names = artifact_utils.encode_split_names(list(SPLITS))
    shutil.rmtree(out_dir, ignore_errors=True)
    with beam.Pipeline(options=PipelineOptions(PipelineConfig().beam_pipeline_args)) as pipeline:
        title_encoder.encode_texts(pipeline, examples, out_dir, query_split="train")


def forget_unlogged_titles(scorer, title_vectors_dir: Optional[str], logged_titles) -> Dict[str, int]:
    """Keeps in the scorer's title table only the titles of `logged_titles`, and fits the path's
    fallback again on those alone (a scorer without the title-vector path is left as it is, and
    its folder not read).

    The TitleEncoder encodes the titles of every logged pair; where the test queries were never
    logged, neither were the items shown only with them, so a cold-start BERM-O must take those
    titles through the path's fallback as it would any item outside its table, and the fallback
    must not have been fitted on their vectors either. The refit takes the ridge penalty the
    student's own start took (`title_map_l2`, kept in the model).
    """
    import numpy as np

    from trainer import sentence_vectors, student

    table = student.title_vector_table(scorer)
    if table is None:
        return {"title_vectors_kept": 0, "title_vectors_dropped": 0}
    vectors = sentence_vectors.read_sentence_vectors(title_vectors_dir)
    logged = set(logged_titles)
    keep = [i for i, title in enumerate(vectors.titles) if title in logged]
    titles, kept_vectors = [vectors.titles[i] for i in keep], vectors.title_vectors[np.array(keep, int)]
    table.set_table(titles, kept_vectors)
    student.fit_title_fallback(scorer, titles, kept_vectors)
    return {"title_vectors_kept": len(keep), "title_vectors_dropped": len(vectors.titles) - len(keep)}


def train_student(args, order: int, examples_dir: str, tables_dir: str, work_dir: str,
                  overrides: Optional[Dict[str, Any]] = None, tag: str = "",
                  title_vectors_dir: Optional[str] = None) -> Dict[str, Any]:
    from tfx.components.trainer.fn_args_utils import FnArgs

    from trainer import student

    custom_config = {"max_order": order, "neighbour_tables_dir": tables_dir,
                     "epochs": args.student_epochs, "seed": args.seed,
                     "log_every_steps": 500}
    if title_vectors_dir:
        custom_config["title_vectors_dir"] = title_vectors_dir
    custom_config.update(args.student_overrides)
    custom_config.update(overrides or {})
    fn_args = FnArgs(train_files=[os.path.join(examples_dir, "Split-train", "*")],
                     eval_files=[os.path.join(examples_dir, "Split-eval", "*")],
                     serving_model_dir=os.path.join(work_dir, f"student_k{order}{tag}"),
                     model_run_dir=os.path.join(work_dir, f"student_k{order}{tag}_run"),
                     custom_config=custom_config)
    log(f"student k={order}: distilling, custom_config {custom_config}")
    start = time.perf_counter()
    history = student.run_fn(fn_args)
    seconds = time.perf_counter() - start
    epochs = {k: [float(x) for x in v] for k, v in history.history.items()}
    val_loss = epochs.get("val_loss", [])
    best = int(min(range(len(val_loss)), key=val_loss.__getitem__)) + 1 if val_loss else None
    log(f"student k={order}: {len(val_loss)} epochs in {seconds:.0f}s, best epoch {best}")
    return {"order": order, "model_dir": fn_args.serving_model_dir, "train_seconds": seconds,
            "epochs_run": len(val_loss), "best_epoch": best, "history": epochs,
            "custom_config": custom_config}


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else math.nan


def race(teacher_call, berm_call, queries, item_ids, titles, batch_size: int, passes: int,
         streams: bool = False) -> Dict[str, Any]:
    """Teacher and BERM-O, `passes` times over the pairs in full batches; per-call wall times.

    `teacher_call` and `berm_call` take (queries, item_ids, titles) as numpy arrays. Each model
    is called once untimed first. By default the models alternate call by call, so every
    BERM-O call follows a teacher call (it finds the caches full of the teacher's weights);
    with `streams` each model scores the whole pass in a row before the other takes its turn,
    as a server under load runs one model's requests back to back.
    """
    import numpy as np

    batches = [tuple(np.array(x[i:i + batch_size], dtype=object) for x in (queries, item_ids, titles))
               for i in range(0, len(queries) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"fewer than {batch_size} test pairs for a batch")
    calls = {"teacher": teacher_call, "berm_o": berm_call}
    times: Dict[str, List[float]] = {name: [] for name in calls}

    def timed(name, batch):
        start = time.perf_counter()
        calls[name](*batch)
        times[name].append(time.perf_counter() - start)

    for call in calls.values():
        call(*batches[0])
    # Repeating the pairs matters at large batches: the test split is only a few batches of
    # 1,000, and on 2 cores one pass spreads by +-5 % from run to run.
    for _ in range(passes):
        if streams:
            for name in calls:
                for batch in batches:
                    timed(name, batch)
        else:
            for batch in batches:
                for name in calls:
                    timed(name, batch)
    out: Dict[str, Any] = {}
    for name, seconds in times.items():
        total = sum(seconds)
        out[name] = {"batches": len(seconds), "pairs": len(seconds) * batch_size,
                     "seconds": total,
                     "pairs_per_second": len(seconds) * batch_size / total if total else math.nan,
                     "p50_ms": 1000 * percentile(seconds, 50), "p99_ms": 1000 * percentile(seconds, 99)}
    out["speedup"] = out["berm_o"]["pairs_per_second"] / out["teacher"]["pairs_per_second"]
    out.update(batch_size=batch_size, passes=passes, order="streams" if streams else "alternating")
    return out


def serving_calls(teacher_dir: str, berm_dir: str, teacher_threads: int, berm_threads: int):
    """The two models' serve_raw, each in its own session with the intra-op threads its server
    would give it; as (queries, item_ids, titles) -> scores callables."""
    from trainer import student, teacher

    teacher_raw = serving_session.SessionSignature(teacher_dir, teacher.RAW_SIGNATURE, teacher.SCORE_KEY,
                                   intra_op_threads=teacher_threads)
    berm_raw = serving_session.SessionSignature(berm_dir, student.RAW_SIGNATURE, student.SCORE_KEY,
                                intra_op_threads=berm_threads)
    return (lambda q, i, t: teacher_raw(**{teacher.QUERY_KEY: q, teacher.TITLE_KEY: t}),
            lambda q, i, t: berm_raw(**{student.QUERY_KEY: q, student.ITEM_ID_KEY: i,
                                        student.TITLE_KEY: t}))


def speed(teacher_dir: str, berm_dir: str, queries, item_ids, titles, args) -> Dict[str, Any]:
    """Throughput at --throughput-batch-size and per-call latency at --batch-size, both models,
    in both orders (alternating call by call, and in streams)."""
    teacher_call, berm_call = serving_calls(teacher_dir, berm_dir, args.teacher_intra_op_threads,
                                            args.berm_intra_op_threads)
    out: Dict[str, Any] = {"intra_op_threads": {"teacher": args.teacher_intra_op_threads,
                                                "berm_o": args.berm_intra_op_threads}}
    for streams, suffix in ((False, ""), (True, "_streams")):
        for key, batch_size in (("throughput", args.throughput_batch_size),
                                ("latency", args.batch_size)):
            order = "in streams" if streams else "alternating call by call"
            log(f"speed: teacher vs BERM-O serve_raw at batch {batch_size}, {order}...")
            result = race(teacher_call, berm_call, queries, item_ids, titles, batch_size,
                          args.race_passes, streams)
            log(f"speed: BERM-O {result['speedup']:.1f}x the teacher's pairs/s at batch {batch_size}, "
                f"{order} (p50 {result['teacher']['p50_ms']:.1f} / {result['berm_o']['p50_ms']:.2f} ms)")
            out[key + suffix] = result
    return out


def race_only(args) -> Dict[str, Any]:
    """The speed race alone, on the test pairs, with the models an earlier run left in --work-dir."""
    queries, item_ids, titles = th.split_pairs(args.input, os.path.join(args.work_dir, "converted"),
                                               "test", args.max_pairs)
    teacher_dir = args.teacher_model or os.path.join(args.work_dir, "teacher_model")
    berm_dir = args.berm_model or os.path.join(args.work_dir, f"student_k{args.berm_order}")
    load_before = os.getloadavg()
    result = speed(teacher_dir, berm_dir, queries, item_ids, titles, args)
    result.update({"benchmark": "student_homedepot --race-only",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "git_commit": th.git_commit(), "test_pairs": len(queries),
                   "models": {"teacher": teacher_dir, "berm_o": berm_dir},
                   "saved_model_bytes": {"teacher": directory_bytes(teacher_dir),
                                         "berm_o": directory_bytes(berm_dir)},
                   "machine": dict(th.machine_info(), load_average_before=list(load_before),
                                   load_average_after=list(os.getloadavg()))})
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("throughput", "latency"))},
                     indent=2))
    th.write_result(args.out, result)
    return result


# --- Reporting -----------------------------------------------------------------------------

def markdown_table(result: Dict[str, Any]) -> str:
    k = NDCG_K
    lines = [f"| model | AUC | per-query AUC | NDCG@{k} "
             f"| pairs/s (batch {result['speed']['throughput']['batch_size']}) "
             f"| p50 / p99 ms per {result['speed']['latency']['batch_size']} pairs | SavedModel |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        m = row["metrics"]
        lines.append(f"| {row['model']} | {th._fmt(m['auc'], 3)} | {th._fmt(m['per_query_auc'], 3)} "
                     f"| {th._fmt(m[f'ndcg@{k}'], 3)} | {row.get('pairs_per_second_label', '')} "
                     f"| {row.get('latency_label', '')} | {row.get('size_label', '')} |")
    return "\n".join(lines)


# --- Main ----------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=th.DEFAULT_INPUT,
                        help="Home Depot train_dev.csv[.zip] (default: %(default)s)")
    parser.add_argument("--teacher-model", default=None,
                        help="an exported teacher SavedModel to reuse instead of fine-tuning one")
    parser.add_argument("--teacher-profile", choices=("quick", "full"), default="full")
    parser.add_argument("--max-teacher-train-pairs", type=int, default=None,
                        help="teacher fine-tuning pairs, whole train queries by hash (default: all "
                             "47,050, about 20 min on 2 cores; the students read them all too)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="use only this many pairs of the whole data, whole queries by hash "
                             "(a quick check of the script; default: all)")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2],
                        help="student max_order values to train (default: 0 1 2)")
    parser.add_argument("--berm-order", type=int, default=1,
                        help="the student exported as the BERM-O rows (default: %(default)s, the "
                             "best student on the eval queries)")
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--no-title-vectors", dest="title_vectors", action="store_false",
                        help="students without the title-vector path (the pipeline's "
                             "student.title_vectors: false)")
    parser.add_argument("--human-loss-weight", type=float, default=3.0,
                        help="one more student row, trained with this human_loss_weight on the "
                             "train judgments besides the teacher's scores (0: no such row)")
    parser.add_argument("--human-order", type=int, default=1,
                        help="max_order of that student (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a student custom_config key (VALUE parsed as JSON); repeatable")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="latency batch: p50/p99 per call of this many pairs (default: 100)")
    parser.add_argument("--throughput-batch-size", type=int, default=1000,
                        help="throughput batch, the same for both models (default: 1000)")
    parser.add_argument("--race-passes", type=int, default=3,
                        help="passes over the test pairs in each speed race (default: 3)")
    parser.add_argument("--teacher-intra-op-threads", type=int, default=0,
                        help="the teacher's threads per op in the race (default 0: TensorFlow's "
                             "choice, every core, which its large matrix products use)")
    parser.add_argument("--berm-intra-op-threads", type=int, default=1,
                        help="BERM-O's threads per op in the race (default 1, as `relkd serve` and "
                             "the TF Serving deployment serve it)")
    parser.add_argument("--race-only", action="store_true",
                        help="only the speed race, with the teacher and BERM-O an earlier run left in "
                             "--work-dir (e.g. to repeat it on an idle machine)")
    parser.add_argument("--berm-model", default=None,
                        help="with --race-only: the BERM-O SavedModel to race instead of the work "
                             "dir's student_k<--berm-order> (e.g. a version the Pusher wrote)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", default=None,
                        help="keep models, tables and examples here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.berm_order not in args.orders:
        parser.error(f"--berm-order {args.berm_order} must be one of --orders {args.orders}")
    if not os.path.exists(args.input):
        parser.error(f"input not found: {args.input}")
    if args.race_only and not args.work_dir:
        parser.error("--race-only needs the --work-dir of an earlier run")
    if args.race_passes < 1:
        parser.error("--race-passes must be at least 1")
    if args.teacher_intra_op_threads < 0 or args.berm_intra_op_threads < 0:
        parser.error("--teacher-intra-op-threads and --berm-intra-op-threads must be >= 0 "
                     "(0: TensorFlow's choice)")
    if args.teacher_model and not os.path.isdir(args.teacher_model):
        parser.error(f"--teacher-model: no such folder {args.teacher_model}")
    if args.berm_model and not args.race_only:
        parser.error("--berm-model is for --race-only (a full run trains its own BERM-O)")
    if args.berm_model and not os.path.isdir(args.berm_model):
        parser.error(f"--berm-model: no such folder {args.berm_model}")
    args.student_overrides = th.parse_overrides(parser, args.overrides)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    # Before TensorFlow runs anything: the race gives each model its own threads per op.
    serving_session.own_thread_pools()
    if args.race_only:
        return race_only(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()

    import numpy as np
    import tensorflow as tf
    from absl import logging as absl_logging

    from pipeline.configs import PipelineConfig
    from trainer import berm_serving, student, teacher

    absl_logging.set_verbosity(absl_logging.INFO)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="student_homedepot_")
    os.makedirs(work_dir, exist_ok=True)
    timings: Dict[str, float] = {}

    # 1. Data.
    data = th.load_judgments(args.input, os.path.join(work_dir, "converted"))
    assign = th.pipeline_split_assigner()
    parts: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SPLITS}
    for record in th.subsample_by_query(data["records"], args.max_pairs):
        parts[assign(record["query"])].append(record)
    sizes = {name: th.split_sizes(parts[name]) for name in SPLITS}
    log(f"data: {data['rows_in']} rows, {len(data['records'])} accepted; "
        + ", ".join(f"{n} {s['pairs']} pairs / {s['queries']} queries" for n, s in sizes.items()))

    # 2. Teacher.
    if args.teacher_model:
        teacher_info = {"model_dir": args.teacher_model, "reused": True}
    else:
        teacher_info = fine_tune_teacher(args, parts, work_dir)
    teacher_model = tf.saved_model.load(teacher_info["model_dir"])
    teacher_raw = teacher_model.signatures[teacher.RAW_SIGNATURE]

    # 3. Label every logged pair.
    logged = [dict(r, split=split) for split in SPLITS for r in parts[split]]
    log(f"labelling {len(logged)} logged pairs with the teacher...")
    start = time.perf_counter()
    teacher_scores = score_raw(teacher_raw, [r["query"] for r in logged],
                               [r["item_title"] for r in logged])
    timings["label_seconds"] = time.perf_counter() - start
    log(f"labelled in {timings['label_seconds']:.0f}s "
        f"({len(logged) / timings['label_seconds']:.0f} pairs/s at batch {LABEL_BATCH})")

    # 4. Graph and joined examples.
    graph_config = PipelineConfig().graph
    log_rows = [{"query": r["query"], "item_id": r["item_id"], "item_title": r["item_title"],
                 "impressions": 1, "clicks": 0, "purchases": 0} for r in logged]
    example_rows: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SPLITS}
    for record, score in zip(logged, teacher_scores):
        example_rows[record["split"]].append({
            "query": record["query"], "item_id": record["item_id"], "item_title": record["item_title"],
            "teacher_score": float(score),
            # test judgments are withheld: the student never sees them.
            "relevance": NO_JUDGMENT if record["split"] == "test" else float(record["relevance"])})
    tables_all = os.path.join(work_dir, "tables_all_logs")
    tables_cold = os.path.join(work_dir, "tables_without_test")
    examples_dir = os.path.join(work_dir, "student_examples")
    for path in (tables_all, tables_cold, examples_dir):
        shutil.rmtree(path, ignore_errors=True)
    log(f"graph: {len(log_rows)} logged pairs, {graph_config}")
    start = time.perf_counter()
    build_graph(log_rows, graph_config, tables_all, examples_dir, example_rows)
    timings["graph_seconds"] = time.perf_counter() - start
    build_graph([r for r, x in zip(log_rows, logged) if x["split"] != "test"], graph_config, tables_cold)
    with open(os.path.join(tables_all, "stats.json")) as f:
        graph_stats = json.load(f)
    log(f"graph built in {timings['graph_seconds']:.0f}s: {graph_stats['nodes']} nodes, "
        f"{graph_stats['edges']} edges")
    title_vectors = None
    if args.title_vectors:
        title_vectors = os.path.join(work_dir, TITLE_VECTORS)
        log("title vectors: encoding every logged title and the train queries...")
        start = time.perf_counter()
        encode_title_vectors(examples_dir, title_vectors)
        timings["title_vectors_seconds"] = time.perf_counter() - start
        log(f"title vectors encoded in {timings['title_vectors_seconds']:.0f}s")

    # 5. Students.
    students = {order: train_student(args, order, examples_dir, tables_all, work_dir,
                                     title_vectors_dir=title_vectors)
                for order in args.orders}
    human = None
    if args.human_loss_weight:
        human = train_student(args, args.human_order, examples_dir, tables_all, work_dir,
                              overrides={"human_loss_weight": args.human_loss_weight}, tag="_human",
                              title_vectors_dir=title_vectors)

    test = parts["test"]
    queries = [r["query"] for r in test]
    titles = [r["item_title"] for r in test]
    item_ids = [r["item_id"] for r in test]
    relevance = np.array([r["relevance"] for r in test], dtype=float)
    teacher_test = score_raw(teacher_raw, queries, titles)
    test_examples = read_examples(os.path.join(examples_dir, "Split-test", "*"))
    decoded = [tf.train.Example.FromString(e) for e in test_examples]
    example_order = {(e.features.feature["query"].bytes_list.value[0].decode("utf-8"),
                      e.features.feature["item_id"].bytes_list.value[0].decode("utf-8")): i
                     for i, e in enumerate(decoded)}
    index = [example_order[(q, i)] for q, i in zip(queries, item_ids)]
    test_examples = [test_examples[i] for i in index]

    baseline = rm.IdfOverlapScorer().fit(sorted({r["item_title"] for r in parts["train"]}))
    rows = [{"model": "IDF token overlap (baseline)",
             "metrics": rm.evaluate(queries, baseline.score(queries, titles), relevance, k=NDCG_K)},
            {"model": f"teacher (BERT {args.teacher_profile} profile)",
             "metrics": rm.evaluate(queries, teacher_test, relevance, k=NDCG_K)}]
    student_scores = {}
    labelled = [(order, info, f"student k={order}" + (" (0-order only)" if order == 0 else ""))
                for order, info in students.items()]
    if human:
        labelled.append(("human", human, f"student k={args.human_order} + human judgments "
                                          f"(human_loss_weight {args.human_loss_weight:g})"))
    for key, info, label in labelled:
        loaded = tf.saved_model.load(info["model_dir"])
        serve = loaded.signatures["serving_default"]
        scores = np.concatenate([serve(examples=tf.constant(test_examples[i:i + LABEL_BATCH]))["score"].numpy()
                                 for i in range(0, len(test_examples), LABEL_BATCH)]).astype(float)
        student_scores[key] = scores
        manifest = berm_serving.read_manifest(info["model_dir"])
        info["params"] = manifest.get("params")
        rows.append({"model": label, "metrics": rm.evaluate(queries, scores, relevance, k=NDCG_K),
                     "train_seconds": info["train_seconds"]})

    berm_dir = students[args.berm_order]["model_dir"]
    berm = tf.saved_model.load(berm_dir)
    berm_raw = berm.signatures[student.RAW_SIGNATURE]
    berm_test = score_raw(berm_raw, queries, titles, item_ids)
    agreement = float(np.max(np.abs(berm_test - student_scores[args.berm_order])))
    log(f"BERM-O serve_raw vs serving_default on joined examples: max |diff| {agreement:.2e}")
    cold_dir = os.path.join(work_dir, f"berm_o_k{args.berm_order}_cold")
    shutil.rmtree(cold_dir, ignore_errors=True)
    cold_scorer = berm_serving.load_scorer(berm_dir)
    cold_titles = forget_unlogged_titles(
        cold_scorer, title_vectors, [r["item_title"] for r in logged if r["split"] != "test"])
    if title_vectors:
        log(f"cold start: {cold_titles['title_vectors_kept']} title vectors kept, "
            f"{cold_titles['title_vectors_dropped']} logged only with test queries dropped")
    berm_serving.export_serving_model(cold_scorer, cold_dir, neighbour_tables_dir=tables_cold)
    cold_test = score_raw(tf.saved_model.load(cold_dir).signatures[student.RAW_SIGNATURE],
                          queries, titles, item_ids)

    # 6. Speed, sizes.
    speeds = speed(teacher_info["model_dir"], berm_dir, queries, item_ids, titles, args)
    teacher_bytes = directory_bytes(teacher_info["model_dir"])
    berm_bytes = directory_bytes(berm_dir)
    rows.append({"model": f"BERM-O (k={args.berm_order}, serve_raw: raw strings, tables in the model)",
                 "metrics": rm.evaluate(queries, berm_test, relevance, k=NDCG_K)})
    rows.append({"model": "BERM-O, test queries never logged (cold start; neighbour tables and "
                          "title vectors from train+eval logs)",
                 "metrics": rm.evaluate(queries, cold_test, relevance, k=NDCG_K), **cold_titles})
    for row in rows:
        if row["model"].startswith("teacher"):
            name, size = "teacher", teacher_bytes
        elif row["model"].startswith("BERM-O (k="):
            name, size = "berm_o", berm_bytes
        else:
            continue
        t, l = speeds["throughput"][name], speeds["latency"][name]
        row.update({"pairs_per_second": t["pairs_per_second"], "p50_ms": l["p50_ms"],
                    "p99_ms": l["p99_ms"], "saved_model_bytes": size,
                    "pairs_per_second_label": f"{t['pairs_per_second']:,.0f}",
                    "latency_label": f"{l['p50_ms']:.1f} / {l['p99_ms']:.1f}",
                    "size_label": f"{size / 2 ** 20:.1f} MB"})

    load_after = os.getloadavg()
    result = {
        "benchmark": "student_homedepot",
        "date": started.isoformat(timespec="seconds"),
        "git_commit": th.git_commit(),
        "machine": dict(th.machine_info(), load_average_before=list(load_before),
                        load_average_after=list(load_after), tensorflow=tf.__version__),
        "settings": {k: v for k, v in vars(args).items() if k != "overrides"},
        "split_rule": "TFX ExampleGen _PartitionFn on feature 'query', hash buckets "
                      + "/".join(f"{k} {v}" for k, v in assign.buckets.items()),
        "data": {"rows_in": data["rows_in"], "accepted": len(data["records"]),
                 "quarantined_by_reason": data["quarantined_by_reason"], "sizes": sizes},
        "graph_config": graph_config.to_dict(),
        "graph_stats": graph_stats,
        "teacher": {k: v for k, v in teacher_info.items()},
        "students": {str(k): {kk: vv for kk, vv in v.items()} for k, v in students.items()},
        "student_with_human_loss": human,
        "berm_o_serve_raw_vs_serving_default_max_abs_diff": agreement,
        "timings": timings,
        "speed": speeds,
        "rows": rows,
        "wall_seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
    }
    table = markdown_table(result)
    result["markdown_table"] = table
    print()
    print(table)
    print()
    print(f"test: {sizes['test']['pairs']} pairs, {sizes['test']['queries']} queries; BERM-O "
          f"{speeds['throughput']['speedup']:.1f}x the teacher's pairs/s; machine {result['machine']['cores']} cores "
          f"{result['machine']['cpu_model']}, load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
          f"wall {result['wall_seconds']:.0f}s; work dir {work_dir}")
    th.write_result(args.out, result)
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
