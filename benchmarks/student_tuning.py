"""Student settings compared on the Home Depot *eval* queries, the split meant for tuning.

`benchmarks/student_homedepot.py --work-dir DIR` leaves in DIR the teacher-labelled, graph-joined
examples, the neighbour tables and the title vectors (a work dir from before the TitleEncoder
gets them on first use). This script distils one student setting on them
(`trainer.student.run_fn`, as that benchmark does) and scores the `eval` split's judged pairs
(AUC with relevant = relevance >= 2.33, per-query AUC, NDCG@10) next to the teacher's scores of
the same pairs, and splits what separates the two into what lies between queries and what lies
within them (`benchmarks/gap_analysis.py`; the two models' correlation is also given on the train
split's logged pairs, the ones the student learnt). A student with title vectors is scored a
second time with only the train logs' titles in its table, as for items never logged (the cold
start of `student_homedepot.py`). The `test` split is never read, so the settings it helps pick
are still judged on queries nobody tuned on::

    .venv/bin/python benchmarks/student_tuning.py --work-dir runs/homedepot/benchmark \\
        --order 0 --set teacher_pointwise_weight=0.1 --out k0_pw01.json

Caveat: the student early-stops on the eval logs' teacher scores, so the eval split is not
untouched by training itself; it is the split the student's own run already looks at.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence

# As `relkd` does: TensorFlow's C++ start-up chatter (CUDA plugins on a CPU-only machine) and
# the libraries' deprecation notices would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import gap_analysis  # noqa: E402
from benchmarks import relevance_metrics as rm  # noqa: E402
from benchmarks import student_homedepot as sh  # noqa: E402
from benchmarks import teacher_homedepot as th  # noqa: E402

SCORE_BATCH = 256


def split_pairs(examples_dir: str, split: str = "eval") -> Dict[str, Any]:
    """A split's serialized examples, their queries, judgments (NaN where none) and teacher scores."""
    import numpy as np
    import tensorflow as tf

    serialized = sh.read_examples(os.path.join(examples_dir, f"Split-{split}", "*"))
    if not serialized:
        raise FileNotFoundError(f"no {split} examples under {examples_dir}/Split-{split}")
    decoded = [tf.train.Example.FromString(e).features.feature for e in serialized]
    relevance = np.array([f["relevance"].float_list.value[0] if f["relevance"].float_list.value
                          else np.nan for f in decoded])
    return {"serialized": serialized,
            "queries": [f["query"].bytes_list.value[0].decode("utf-8") for f in decoded],
            "relevance": relevance,  # float32 values: rm's labels compare at float32
            "teacher": np.array([f["teacher_score"].float_list.value[0] for f in decoded])}


def score_examples(model_dir: str, serialized: Sequence[bytes]):
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the student's tokeniser ops)

    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    return np.concatenate([serve(examples=tf.constant(serialized[i:i + SCORE_BATCH]))["score"].numpy()
                           for i in range(0, len(serialized), SCORE_BATCH)]).astype(float)


def score_with_unlogged_titles(model_dir: str, title_vectors_dir: str, train_serialized,
                               eval_serialized, out_dir: str):
    """The eval pairs scored as if the items shown only with eval queries were never logged: the
    student exported again with the train logs' titles alone in its table (the cold start of
    `student_homedepot`), so the others take the title path's fallback."""
    import tensorflow as tf

    from trainer import berm_serving

    titles = [tf.train.Example.FromString(e).features.feature["item_title"].bytes_list.value[0]
              .decode("utf-8") for e in train_serialized]
    scorer = berm_serving.load_scorer(model_dir)
    kept = sh.forget_unlogged_titles(scorer, title_vectors_dir, titles)
    berm_serving.export_serving_model(scorer, out_dir)
    return score_examples(out_dir, eval_serialized), kept


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True,
                        help="a benchmarks/student_homedepot.py --work-dir (student_examples/, "
                             "tables_all_logs/)")
    parser.add_argument("--order", type=int, default=1, help="the student's max_order")
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--no-title-vectors", dest="title_vectors", action="store_false",
                        help="a student without the title-vector path (by default it uses "
                             "--work-dir's title_vectors/, encoding them first if missing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a student custom_config setting (repeatable)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--name", default=None,
                        help="folder under --work-dir/tuning for the model (default from the order, seed "
                             "and settings, e.g. k1_seed42)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--rescore", action="store_true",
                        help="do not train: score again the model an earlier run of the same "
                             "--name (or order, seed and settings) left under --work-dir/tuning "
                             "(e.g. after a change to how items never logged are scored)")
    parser.add_argument("--level-features", action="store_true",
                        help="also ask whether the query levels the student misses can be told "
                             "from the query alone (gap_analysis.level_correction, cross-validated "
                             "over the eval queries): its word count, its words' coverage by the "
                             "titles, and the cosines to its nearest stored titles of the "
                             "pretrained encoder's vector of the whole query and of the student's "
                             "stand-in for it")
    args = parser.parse_args(argv)
    args.student_overrides = th.parse_overrides(parser, args.overrides)
    for sub in ("student_examples", "tables_all_logs"):
        if not os.path.isdir(os.path.join(args.work_dir, sub)):
            parser.error(f"{args.work_dir}/{sub} not found: run benchmarks/student_homedepot.py "
                         f"--work-dir {args.work_dir} first")
    return args


def default_name(order: int, seed: int, title_vectors: bool, overrides: Dict[str, Any]) -> str:
    """The model's folder under --work-dir/tuning: one per setting and seed, so that runs of
    several seeds keep their models side by side."""
    return "_".join([f"k{order}", f"seed{seed}"] + ([] if title_vectors else ["no_title_vectors"])
                    + [f"{k}={v}" for k, v in sorted(overrides.items())])


def earlier_student(run_dir: str, order: int) -> Dict[str, Any]:
    """What `train_student` returns, for the model an earlier run left in run_dir (--rescore)."""
    import json

    model_dir = os.path.join(run_dir, f"student_k{order}")
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        raise FileNotFoundError(f"--rescore: no student model in {model_dir}; run without "
                                "--rescore first (same --name, or order, seed and settings)")
    history_file = os.path.join(run_dir, f"student_k{order}_run", "history.json")
    val_loss = []
    if os.path.isfile(history_file):
        with open(history_file) as f:
            val_loss = json.load(f).get("val_loss", [])
    return {"model_dir": model_dir, "train_seconds": None, "epochs_run": len(val_loss) or None,
            "best_epoch": (min(range(len(val_loss)), key=val_loss.__getitem__) + 1
                           if val_loss else None)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import numpy as np

    args = parse_args(argv)
    name = args.name or default_name(args.order, args.seed, args.title_vectors, args.student_overrides)
    run_dir = os.path.join(args.work_dir, "tuning", name)
    examples_dir = os.path.join(args.work_dir, "student_examples")
    title_vectors = None
    if args.title_vectors:
        title_vectors = os.path.join(args.work_dir, sh.TITLE_VECTORS)
        if not os.path.isdir(title_vectors):  # A work dir from before the TitleEncoder existed.
            sh.log(f"title vectors: {title_vectors} not found, encoding them (once)...")
            sh.encode_title_vectors(examples_dir, title_vectors)
    if args.rescore:
        info = earlier_student(run_dir, args.order)
    else:
        info = sh.train_student(args, args.order, examples_dir,
                                os.path.join(args.work_dir, "tables_all_logs"), run_dir,
                                title_vectors_dir=title_vectors)
    pairs = split_pairs(examples_dir, "eval")
    student_scores = score_examples(info["model_dir"], pairs["serialized"])
    train = split_pairs(examples_dir, "train")
    train_logits = [gap_analysis.logits(s) for s in
                    (score_examples(info["model_dir"], train["serialized"]), train["teacher"])]
    result = {
        "benchmark": "student_tuning", "git_commit": th.git_commit(), "split": "eval",
        "rescored": args.rescore,
        "order": args.order, "settings": args.student_overrides, "title_vectors": title_vectors,
        "epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
        "train_seconds": info["train_seconds"],
        "teacher": rm.evaluate(pairs["queries"], pairs["teacher"], pairs["relevance"], k=sh.NDCG_K),
        "student": rm.evaluate(pairs["queries"], student_scores, pairs["relevance"], k=sh.NDCG_K),
        "gap": gap_analysis.analyse(pairs["queries"], student_scores, pairs["teacher"], pairs["relevance"]),
        "train_correlation": float(np.corrcoef(*train_logits)[0, 1]),
        "train_pairs": len(train["queries"]),
    }
    if title_vectors:
        cold_scores, kept = score_with_unlogged_titles(
            info["model_dir"], title_vectors, train["serialized"], pairs["serialized"],
            os.path.join(run_dir, "unlogged_titles_model"))
        result["student_unlogged_titles"] = dict(
            rm.evaluate(pairs["queries"], cold_scores, pairs["relevance"], k=sh.NDCG_K), **kept)
    if args.level_features:
        result["level_correction"] = level_correction(
            pairs, student_scores, os.path.join(args.work_dir, sh.TITLE_VECTORS), info["model_dir"])
    k = sh.NDCG_K
    for who in ("teacher", "student", "student_unlogged_titles"):
        if who not in result:
            continue
        m = result[who]
        print(f"{who:8s} eval AUC {m['auc']:.3f}  per-query AUC {m['per_query_auc']:.3f}  "
              f"NDCG@{k} {m[f'ndcg@{k}']:.3f}  ({m['pairs']} pairs, {m['queries']} queries)")
    gap = result["gap"]
    print(f"student vs teacher (logits): correlation {gap['correlation']:.3f} on the eval pairs, "
          f"{result['train_correlation']:.3f} on the train pairs it learnt")
    print(f"  between queries: {gap['between_query_share_teacher']:.0%} of the teacher's variance, "
          f"{gap['error_between_query_share']:.0%} of the student's error")
    print(f"  eval AUC of the query means alone: teacher {gap['teacher_query_level_auc']:.3f}, "
          f"student {gap['student_query_level_auc']:.3f}")
    print(f"  eval AUC of the teacher's query means + the student's order within queries "
          f"{gap['student_order_teacher_levels_auc']:.3f}; of the student's means + the teacher's "
          f"order {gap['teacher_order_student_levels_auc']:.3f}")
    for features, fit in result.get("level_correction", {}).items():
        print(f"  query levels told from {features}: eval AUC {fit['auc']:.3f} (the student "
              f"{fit['student_auc']:.3f}), predictions' correlation with the missed levels "
              f"{fit['correlation']:.2f}, cross-validated over {fit['queries']} queries")
    th.write_result(args.out, result)
    return result


def query_level_features(queries: Sequence[str], title_vectors_dir: str,
                         model_dir: Optional[str] = None) -> Dict[str, Any]:
    """Per pair, what the query alone tells: its word count, and how well the catalogue covers
    it: its words' title counts and WordPiece pieces (`catalogue_coverage`), or the mean cosine
    of a vector of the whole query to its 1 / 10 / 100 nearest stored title vectors. That vector is the pretrained encoder's, which costs an encoder pass per query, what
    BERM-O cannot pay per call (README, *Student on Home Depot*), or, where `model_dir` names the
    student, the stand-in it already computes: its query map of the query's WordPiece mean."""
    import numpy as np

    from trainer import sentence_vectors

    distinct = sorted(set(queries))
    position = {q: i for i, q in enumerate(distinct)}
    index = np.array([position[q] for q in queries])
    words = np.array([len(q.split()) for q in distinct], float)
    titles = sentence_vectors.read_sentence_vectors(title_vectors_dir).title_vectors
    features = {"word count": words[index, None],
                "word count + nearest titles": np.c_[
                    words, nearest_title_cosines(sentence_vectors.SentenceEncoder().encode(distinct),
                                                 titles)][index]}
    features["word count + catalogue coverage"] = np.c_[
        words, catalogue_coverage(distinct, sentence_vectors.read_sentence_vectors(
            title_vectors_dir).titles)][index]
    if model_dir:
        features["word count + the student's stand-in's nearest titles"] = np.c_[
            words, nearest_title_cosines(student_query_stand_ins(model_dir, distinct), titles)][index]
    return features


def catalogue_coverage(queries: Sequence[str], titles: Sequence[str]):
    """[Q, 6]: what a query's words say of how the catalogue knows them, no encoder needed: the
    share of its words in no title, log1p of the number of titles holding its rarest, its mean
    and its commonest word, and its WordPiece pieces per word (mean, max), which grow where a
    word is misspelt or run together ("vacume", "petscreen": the queries whose level the student
    misses most)."""
    import collections
    import math
    import re

    import numpy as np
    import tensorflow_text as text

    from trainer import bert_checkpoint

    def words(s):
        return re.findall(r"[a-z0-9]+", s.lower())

    frequency = collections.Counter(w for title in titles for w in set(words(title)))
    pieces = text.BertTokenizer(bert_checkpoint.vocab_file(), lower_case=True).tokenize(
        list(queries)).to_list() if queries else []
    rows = []
    for query, query_pieces in zip(queries, pieces):
        counts = [frequency.get(w, 0) for w in words(query)] or [0]
        per_word = [len(p) for p in query_pieces] or [1]
        logs = [math.log1p(c) for c in counts]
        rows.append([np.mean([c == 0 for c in counts]), min(logs), float(np.mean(logs)), max(logs),
                     float(np.mean(per_word)), max(per_word)])
    return np.asarray(rows, float).reshape(len(queries), 6)


def nearest_title_cosines(query_vectors, title_vectors, nearest=(1, 10, 100)):
    """[Q, len(nearest)]: each query's mean cosine to its n nearest titles, for each n."""
    import numpy as np

    unit = query_vectors / (np.linalg.norm(query_vectors, axis=1, keepdims=True) + 1e-9)
    cosines = -np.sort(-(unit @ title_vectors.T), axis=1)
    return np.stack([cosines[:, :n].mean(axis=1) for n in nearest], axis=1)


def student_query_stand_ins(model_dir: str, queries: Sequence[str]):
    """The student's stand-in for the encoder's vector of each query, as its title path computes
    it: the query's (weighted) pretrained WordPiece mean through the trained query map."""
    from trainer import berm_serving, student

    scorer = berm_serving.load_scorer(model_dir)
    match = student.sentence_match_layer(scorer)
    return student.static_means(scorer, queries, student.QUERY_WORDPIECE) @ match.query_map.numpy()


def level_correction(pairs: Dict[str, Any], student_scores, title_vectors_dir: str,
                     model_dir: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    return {name: gap_analysis.level_correction(pairs["queries"], student_scores, pairs["teacher"],
                                                features, pairs["relevance"])
            for name, features in query_level_features(pairs["queries"], title_vectors_dir,
                                                       model_dir).items()}


if __name__ == "__main__":
    main()
