"""A SavedModel signature run the way TF Serving runs one: in its own TF1 Session, with its own
thread settings (TF Serving's `--tensorflow_intra_op_parallelism` and
`--tensorflow_inter_op_parallelism`, `relkd serve`'s `--intra-op-threads` and `--inter-op-threads`).

The speed race holds the teacher and BERM-O in one process, yet each should run with the threads
its own server would give it. TensorFlow shares one intra-op thread pool among all the sessions of
a process unless TF_OVERRIDE_GLOBAL_THREADPOOL is set before it creates its first device (the
first session or eager op): a benchmark calls `own_thread_pools()` first thing.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Sequence


def own_thread_pools() -> None:
    """Gives every session (and the eager context) its own intra-op pool from here on; only
    takes effect when called before TensorFlow's first session or op in this process."""
    os.environ["TF_OVERRIDE_GLOBAL_THREADPOOL"] = "1"


def _drop_loader_deprecation(record: logging.LogRecord) -> bool:
    return "saved_model.loader_impl) is deprecated" not in record.getMessage()


class SessionSignature:
    """`signature` of the SavedModel in `model_dir`; calling it with numpy inputs by name returns
    the `output` tensor's value."""

    def __init__(self, model_dir: str, signature: str, output: str, intra_op_threads: int = 0,
                 inter_op_threads: int = 0):
        import tensorflow as tf

        self.intra_op_threads, self.inter_op_threads = intra_op_threads, inter_op_threads
        graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads,
                                          inter_op_parallelism_threads=inter_op_threads)
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        # The TF1 loader is what TF Serving's own C++ loader mirrors; its deprecation notice
        # ("use tf.saved_model.load") points at the eager loader, which is not what is measured.
        # Only that notice is dropped: anything else the load logs still shows.
        logger = tf.get_logger()
        logger.addFilter(_drop_loader_deprecation)
        try:
            with graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(
                    self._session, [tf.saved_model.SERVING], model_dir)
        finally:
            logger.removeFilter(_drop_loader_deprecation)
        if signature not in meta_graph.signature_def:
            raise ValueError(f"{model_dir} has no signature {signature!r} "
                             f"(it has {sorted(meta_graph.signature_def)})")
        spec = meta_graph.signature_def[signature]
        self._inputs: Dict[str, str] = {name: tensor.name for name, tensor in spec.inputs.items()}
        self._output = spec.outputs[output].name

    @property
    def input_names(self) -> Sequence[str]:
        return sorted(self._inputs)

    def __call__(self, **inputs):
        return self._session.run(self._output, {self._inputs[name]: value
                                                for name, value in inputs.items()})

    def close(self) -> None:
        self._session.close()
