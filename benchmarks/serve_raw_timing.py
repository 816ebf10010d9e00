"""Time per `serve_raw` call of two or more BERM-O SavedModels, called in turn on the same pairs.

Each model's raw-string signature scores a split's joined pairs (a `student_homedepot.py`
work dir's `student_examples`; the eval split by default, the one tuning may read) in calls of
`--batch-size` pairs, the models alternating call by call so that both meet the machine in the
same state, with one thread per op as `relkd serve` and the speed race run BERM-O. The first
`--warm-up-passes` passes are not counted. It compares variants of one model: a student tuning's
`unlogged_titles_model` (only the train logs' titles stored, so most eval titles go through the
title path's fallback) against another setting's, or a model against itself (the noise). Each
model's largest score difference from the first model's, over the timed calls, says whether two
variants score alike (0.0 for the same numbers computed the same way)::

    .venv/bin/python benchmarks/serve_raw_timing.py --work-dir runs/homedepot_s10/benchmark \\
        --model trigrams=runs/homedepot_s10/benchmark/tuning/ttri4096_s42/unlogged_titles_model \\
        --model sif=runs/homedepot_s10/benchmark/tuning/k1_seed42_title_map_sif=0.001/unlogged_titles_model

The models' neighbour tables are whatever their export held (the tuning models have none).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any, Dict, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import berm_profile  # noqa: E402
from benchmarks import student_homedepot as sh  # noqa: E402
from benchmarks import teacher_homedepot as th  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True,
                        help="a benchmarks/student_homedepot.py --work-dir (student_examples/)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a BERM-O SavedModel and the name it is reported under (repeat: two "
                             "or more)")
    parser.add_argument("--split", default="eval", choices=["train", "eval", "test"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--passes", type=int, default=1, help="timed passes over the split")
    parser.add_argument("--warm-up-passes", type=int, default=1, help="passes not timed")
    parser.add_argument("--intra-op-threads", type=int, default=1,
                        help="threads per op (1, as BERM-O is served; 0: TensorFlow's choice)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        args.models = dict(m.split("=", 1) for m in args.model)
    except ValueError:
        parser.error("--model takes NAME=DIR")
    if len(args.models) < 2:
        parser.error("give two or more --model NAME=DIR, with different names")
    for name, path in args.models.items():
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            parser.error(f"--model {name}={path}: no SavedModel there")
    if args.batch_size < 1 or args.passes < 1 or args.warm_up_passes < 0:
        parser.error("--batch-size and --passes must be >= 1, --warm-up-passes >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # main() called in a process whose TensorFlow has already started
        sh.log(f"warning: TensorFlow had already started in this process: --intra-op-threads "
               f"{args.intra_op_threads} not applied")
    import tensorflow_text  # noqa: F401  (the student's tokeniser ops)

    from trainer import student

    examples = [tf.train.Example.FromString(e).features.feature for e in
                sh.read_examples(os.path.join(args.work_dir, "student_examples",
                                              f"Split-{args.split}", "*"))]
    pairs = tuple([f[c].bytes_list.value[0] for f in examples]
                  for c in ("query", "item_id", "item_title"))
    try:
        calls = berm_profile.batch_tensors(pairs, args.batch_size)
    except ValueError as e:
        raise SystemExit(f"{e} in the {args.split} split") from e
    models = {name: berm_profile.load_raw(path) for name, path in args.models.items()}
    milliseconds = {name: [] for name in models}
    differences = dict.fromkeys(models, 0.0)
    first = next(iter(models))
    for done in range(args.warm_up_passes + args.passes):
        sh.log(f"pass {done + 1} of {args.warm_up_passes + args.passes} "
               f"({'warm-up' if done < args.warm_up_passes else 'timed'}), {len(calls)} calls each")
        for call in calls:
            scores = {}
            for name, serve in models.items():
                start = time.perf_counter()
                scores[name] = serve(query=call[0], item_id=call[1],
                                     item_title=call[2])[student.SCORE_KEY].numpy()
                if done >= args.warm_up_passes:
                    milliseconds[name].append((time.perf_counter() - start) * 1000)
            if done >= args.warm_up_passes:
                for name, got in scores.items():
                    differences[name] = max(differences[name],
                                            float(np.abs(got - scores[first]).max()))
    result = {"benchmark": "serve_raw_timing", "git_commit": th.git_commit(),
              "machine": th.machine_info(), "split": args.split, "batch_size": args.batch_size,
              "calls_per_model": len(calls) * args.passes, "intra_op_threads": args.intra_op_threads,
              "models": {}}
    for name, times in milliseconds.items():
        stats = {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                 "mean_ms": float(np.mean(times)), "model_dir": args.models[name],
                 "max_score_difference": differences[name]}
        result["models"][name] = stats
        print(f"{name}: median {stats['median_ms']:.2f} ms, p90 {stats['p90_ms']:.2f} ms, "
              f"mean {stats['mean_ms']:.2f} ms per {args.batch_size}-pair call "
              f"({len(times)} calls); scores at most {differences[name]:.2g} from {first}'s")
    th.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
