"""Where a BERM-O call spends its time: timed alone, and shared out over the model's parts.

Two measurements of one BERM-O SavedModel's `serve_raw` on the Home Depot test pairs (the
pipeline's own by-query split, as in `student_homedepot.py`), in calls of `--batch-size` pairs:

  1. Alone: `--rounds` passes over the pairs with nothing else between the calls (the speed
     race in `student_homedepot.py` alternates BERM-O with the teacher); median and mean
     milliseconds per call, per round.
  2. Cold: one pass per `--pauses` value with the process idle for that many seconds before
     each call, and with `--teacher-model` one pass with a teacher call before each (the race's
     order). A call that follows idle time or another model's call finds the machine cold
     (caches, idle cores); this tells how much of the race's BERM-O time is that rather than
     BERM-O's own work.
  3. Parts: `--trace-calls` calls through a TF1 session with full tracing (`RunMetadata` step
     stats). Each op's time is credited to the part of the model its name scope says it runs
     in: a layer of the nested vector scorer, the tokenisers, the token embedding, or the
     tables' lookups and gathers of `serve_raw` itself. Tracing slows every op, so the shares
     tell where the time goes, not how long a call takes.

    .venv/bin/python benchmarks/berm_profile.py \\
        --model runs/homedepot_p8/serving/relkd/1796395876 --out runs/race_p8/profile.json \\
        --teacher-model runs/homedepot_p8/pipeline_root/TeacherTrainer/model/12/Format-Serving

Everything runs on this machine's CPU with TensorFlow's default threads.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# As `relkd` does: TensorFlow's C++ start-up chatter (CUDA plugins on a CPU-only machine) and
# the libraries' deprecation notices would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import teacher_homedepot as th  # noqa: E402

Pairs = Tuple[List[str], List[str], List[str]]  # queries, item ids, titles
_CALL_WRAPPERS = ("StatefulPartitionedCall", "PartitionedCall")
_NUMBERED = re.compile(r"_\d+$")


def _batches(pairs: Pairs, batch_size: int) -> List[Pairs]:
    """Full batches only, so every call scores the same number of pairs."""
    queries, item_ids, titles = pairs
    return [(queries[i:i + batch_size], item_ids[i:i + batch_size], titles[i:i + batch_size])
            for i in range(0, len(queries) - batch_size + 1, batch_size)]


def batch_tensors(pairs: Pairs, batch_size: int) -> List[Tuple[Any, Any, Any]]:
    """(query, item_id, item_title) string tensors of each full batch of `pairs`."""
    import tensorflow as tf

    batches = [tuple(tf.constant(x) for x in b) for b in _batches(pairs, batch_size)]
    if not batches:
        raise ValueError(f"fewer than --batch-size {batch_size} pairs")
    return batches


def load_raw(model_dir: str):
    """A BERM-O SavedModel's raw-string signature."""
    import tensorflow as tf

    from trainer import student

    return tf.saved_model.load(model_dir).signatures[student.RAW_SIGNATURE]


def _time_calls(raw, batches, rounds: int,
                before: Optional[Callable[[Tuple[Any, Any, Any]], Any]] = None
                ) -> List[Dict[str, Any]]:
    """Per round: calls, median and mean ms per BERM-O call (one untimed warm-up call first);
    `before(batch)`, if given, runs untimed before each call."""
    from trainer import student

    call = lambda b: raw(query=b[0], item_id=b[1], item_title=b[2])[student.SCORE_KEY].numpy()  # noqa: E731
    call(batches[0])
    out = []
    for _ in range(rounds):
        seconds = []
        for batch in batches:
            if before is not None:
                before(batch)
            start = time.perf_counter()
            call(batch)
            seconds.append(time.perf_counter() - start)
        out.append({"calls": len(seconds), "median_ms": 1000 * statistics.median(seconds),
                    "mean_ms": 1000 * statistics.mean(seconds)})
    return out


def time_alone(model_dir: str, pairs: Pairs, batch_size: int, rounds: int) -> List[Dict[str, Any]]:
    """Per round: calls, median and mean ms per call, back to back; one warm-up call first."""
    return _time_calls(load_raw(model_dir), batch_tensors(pairs, batch_size), rounds)


def time_cold(model_dir: str, pairs: Pairs, batch_size: int, pauses: Sequence[float],
              teacher_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    """One pass per pause (the process idle that many seconds before each call) and, with
    `teacher_dir`, one with that teacher's serve_raw on the same batch before each call."""
    import tensorflow as tf

    from trainer import teacher

    batches = batch_tensors(pairs, batch_size)
    raw = load_raw(model_dir)
    out = []
    for pause in pauses:
        result = _time_calls(raw, batches, 1, lambda _, seconds=pause: time.sleep(seconds))[0]
        out.append(dict(result, before="pause", pause_seconds=pause))
    if teacher_dir:
        teacher_raw = tf.saved_model.load(teacher_dir).signatures[teacher.RAW_SIGNATURE]
        result = _time_calls(raw, batches, 1, lambda b: teacher_raw(
            query=b[0], item_title=b[2])[teacher.SCORE_KEY].numpy())[0]
        out.append(dict(result, before="teacher", teacher_model=teacher_dir))
    return out


def part_of(node_name: str) -> str:
    """The model part a traced op belongs to, from its node name.

    "StatefulPartitionedCall/StatefulPartitionedCall/berm_vector_scorer/kernel_pooling/MatMul_2"
    -> "berm_vector_scorer/kernel_pooling"; "title_wordpiece/FastWordpieceTokenize..." ->
    "title_wordpiece"; "Gather_11" (an op of serve_raw itself) -> "serve_raw/Gather".
    """
    from trainer import student

    scopes = [s for s in node_name.split("/") if not s.startswith(_CALL_WRAPPERS)]
    if not scopes:
        return "serve_raw"
    if len(scopes) == 1:
        return "serve_raw/" + _NUMBERED.sub("", scopes[0])
    if scopes[0] == student.VECTOR_SCORER and len(scopes) > 2:
        return "/".join(scopes[:2])
    return scopes[0]


def trace_parts(model_dir: str, pairs: Pairs, batch_size: int, calls: int,
                warm_up: int = 3) -> Dict[str, Any]:
    """Summed traced op time per model part over `calls` calls (after `warm_up` untimed ones)."""
    import tensorflow as tf

    from trainer import student

    batches = _batches(pairs, batch_size)
    if not batches:
        raise ValueError(f"fewer than --batch-size {batch_size} pairs")
    graph = tf.Graph()
    ms: Dict[str, float] = collections.defaultdict(float)
    ops: Dict[str, int] = collections.Counter()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, [tf.saved_model.SERVING], model_dir)
        signature = meta_graph.signature_def[student.RAW_SIGNATURE]
        inputs = {key: spec.name for key, spec in signature.inputs.items()}
        score = signature.outputs[student.SCORE_KEY].name
        for index in range(warm_up + calls):
            queries, item_ids, titles = batches[index % len(batches)]
            feed = {inputs[student.QUERY_KEY]: queries, inputs[student.ITEM_ID_KEY]: item_ids,
                    inputs[student.TITLE_KEY]: titles}
            run_metadata = tf.compat.v1.RunMetadata()
            session.run(score, feed, run_metadata=run_metadata, options=tf.compat.v1.RunOptions(
                trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
            if index < warm_up:
                continue
            for device in run_metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    part = part_of(node.node_name)
                    ms[part] += (node.op_end_rel_micros - node.op_start_rel_micros) / 1000.0
                    ops[part] += 1
    total = sum(ms.values())
    parts = [{"part": part, "share": ms[part] / total if total else 0.0,
              "traced_ms_per_call": ms[part] / calls, "ops_per_call": ops[part] / calls}
             for part in sorted(ms, key=ms.get, reverse=True)]
    return {"calls": calls, "traced_ms_per_call": total / calls,
            "ops_per_call": sum(ops.values()) / calls, "parts": parts}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a BERM-O SavedModel (e.g. a pushed version)")
    parser.add_argument("--input", default=th.DEFAULT_INPUT,
                        help="Home Depot train_dev.csv[.zip] (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="pairs per call (default: 100)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed passes over the test pairs (default: 3)")
    parser.add_argument("--pauses", type=float, nargs="*", default=[0.05, 0.45],
                        help="seconds idle before each call, one pass per value (default: 0.05 "
                             "0.45, about a teacher call at batch 100; none skips these passes)")
    parser.add_argument("--teacher-model", default=None,
                        help="a teacher SavedModel: one more pass with its call before each BERM-O "
                             "call, as in the speed race")
    parser.add_argument("--trace-calls", type=int, default=27,
                        help="traced calls for the parts' shares (default: 27; 0 skips the trace)")
    parser.add_argument("--work-dir", default=None,
                        help="where the converted data is cached (default: a folder next to --out, "
                             "else a temporary one)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model):
        parser.error(f"--model: no such folder {args.model}")
    if not os.path.exists(args.input):
        parser.error(f"input not found: {args.input}")
    if args.teacher_model and not os.path.isdir(args.teacher_model):
        parser.error(f"--teacher-model: no such folder {args.teacher_model}")
    if any(p < 0 for p in args.pauses):
        parser.error("--pauses must be seconds >= 0")
    if args.batch_size < 1 or args.rounds < 1 or args.trace_calls < 0:
        parser.error("--batch-size and --rounds must be at least 1, --trace-calls at least 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import tempfile

    args = parse_args(argv)
    work_dir = args.work_dir or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "converted")
                                 if args.out else tempfile.mkdtemp(prefix="berm_profile_"))
    pairs = th.split_pairs(args.input, work_dir, "test")
    load_before = os.getloadavg()
    alone = time_alone(args.model, pairs, args.batch_size, args.rounds)
    for number, result in enumerate(alone, 1):
        print(f"alone, round {number}: median {result['median_ms']:.2f} ms, mean "
              f"{result['mean_ms']:.2f} ms over {result['calls']} calls of {args.batch_size} pairs")
    cold = time_cold(args.model, pairs, args.batch_size, args.pauses, args.teacher_model)
    for result in cold:
        before = (f"{result['pause_seconds']:g} s idle" if result["before"] == "pause"
                  else "a teacher call")
        print(f"after {before}: median {result['median_ms']:.2f} ms, mean {result['mean_ms']:.2f} ms "
              f"over {result['calls']} calls")
    trace = trace_parts(args.model, pairs, args.batch_size, args.trace_calls) if args.trace_calls else None
    if trace:
        print(f"traced: {trace['ops_per_call']:.0f} ops and {trace['traced_ms_per_call']:.2f} ms of op "
              f"time per call (tracing slows every op); shares:")
        for part in trace["parts"][:15]:
            print(f"  {100 * part['share']:5.1f} %  {part['ops_per_call']:5.0f} ops  {part['part']}")
    result = {"benchmark": "berm_profile", "model": args.model, "batch_size": args.batch_size,
              "test_pairs": len(pairs[0]), "alone": alone, "cold": cold, "trace": trace,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": th.git_commit(),
              "machine": dict(th.machine_info(), load_average_before=list(load_before),
                              load_average_after=list(os.getloadavg()))}
    th.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
