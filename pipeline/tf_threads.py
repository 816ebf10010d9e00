"""TensorFlow's thread pools for a serving or scoring process (`relkd serve`, `relkd score`)."""
from __future__ import annotations


def set_threads(intra_op: int, inter_op: int = 0) -> None:
    """Sets this process's pools (0 leaves TensorFlow's choice). They can only be set before
    TensorFlow runs its first op, so this comes before any model is loaded."""
    import tensorflow as tf

    threading_config = tf.config.threading
    for wanted, get, put in ((intra_op, threading_config.get_intra_op_parallelism_threads,
                              threading_config.set_intra_op_parallelism_threads),
                             (inter_op, threading_config.get_inter_op_parallelism_threads,
                              threading_config.set_inter_op_parallelism_threads)):
        if wanted and get() != wanted:
            put(wanted)


def threads_label(threads: int) -> str:
    return "TensorFlow's choice" if threads == 0 else str(threads)
